"""geomfit.photo.as_float_image, the one image normalisation, against scikit-image's img_as_float
where the two agree by design, and the modules that delegate to it."""
import numpy as np
import pytest

from geomfit.photo import as_float_image, as_float_rgb


def test_matches_skimage_for_types_with_a_scale():
    skimage = pytest.importorskip("skimage")
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 256, (5, 6, 3)).astype(np.uint8), rng.integers(0, 65536, (5, 6)).astype(np.uint16),
              rng.random((4, 7)) > 0.5, rng.random((4, 7, 2)).astype(np.float32), rng.random((3, 3))):
        np.testing.assert_allclose(as_float_image(a), skimage.img_as_float(a).astype(np.float64), rtol=1e-7,
                                   err_msg=str(a.dtype))
        assert as_float_image(a).dtype == np.float64


def test_wide_integers_hold_8_or_16_bit_values():
    v8 = np.array([[0, 51], [255, 102]])
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64):
        if np.iinfo(dt).max < 255:
            continue
        np.testing.assert_allclose(as_float_image(v8.astype(dt)), v8 / 255.0, err_msg=str(dt))
    np.testing.assert_allclose(as_float_image(np.array([[0, 300], [65535, 7]])), [[0, 300 / 65535], [1, 7 / 65535]])
    with pytest.raises(ValueError, match="negative"):
        as_float_image(np.array([[-1, 3], [4, 5]]))
    with pytest.raises(ValueError, match="16 bits"):
        as_float_image(np.array([[0, 70000], [4, 5]]))


def test_bad_images():
    with pytest.raises(ValueError, match="shape"):
        as_float_image(np.zeros(5))
    with pytest.raises(ValueError, match="empty"):
        as_float_image(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN"):
        as_float_image(np.array([[0.0, np.inf]]))
    with pytest.raises(TypeError, match="numeric"):
        as_float_image(np.zeros((2, 2), complex))


def test_rgb_and_fine_stage_use_the_same_rule():
    from geomfit.fine import prepare_image

    v = np.array([[0, 64, 128], [255, 200, 1], [3, 4, 5]])
    rgb = as_float_rgb(v.astype(np.int64))
    np.testing.assert_allclose(rgb[..., 0], v / 255.0)
    np.testing.assert_allclose(prepare_image(v.astype(np.int64)), prepare_image(v.astype(np.uint8)))
