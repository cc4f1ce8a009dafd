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


def _jpeg_with_exif_orientation(img, orientation):
    """JPEG bytes of ``img`` (BGR) with an EXIF APP1 segment holding only the Orientation tag."""
    import struct

    import cv2

    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    app1 = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:]


def _png_header_only(width, height):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_one_image_reader_for_library_and_cli(tmp_path):
    """geomfit.read_image, the CLI's image-size lookup for a .pts file and its depth-image reader all go
    through photo.decode_image: the same frame (EXIF orientation applied), the same errors."""
    import cv2

    from geomfit import cli
    from geomfit.photo import ImageReadError, decode_image, read_image

    img = np.zeros((40, 60, 3), np.uint8)
    img[:10, :, 2] = 255                       # a red band along the top (BGR)
    (tmp_path / "face.jpg").write_bytes(_jpeg_with_exif_orientation(img, 6))  # 6: shown rotated 90 deg cw
    rgb = read_image(tmp_path / "face.jpg")
    assert rgb.shape == (60, 40, 3) and rgb[:, -5:, 0].mean() > 0.9 and rgb[:, :5, 0].mean() < 0.1
    pts = np.full((68, 2), 10.0)
    assert cli._image_size_for(tmp_path / "face.pts", pts, None) == (60, 40)   # the frame read_image gives
    # a 16-bit depth PNG: stored counts, not [0, 1] floats
    depth = (np.arange(12 * 9).reshape(12, 9) * 500).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), depth)
    assert decode_image(tmp_path / "d.png").dtype == np.uint16
    np.testing.assert_array_equal(cli._load_depth(tmp_path / "d.png"), depth.astype(np.float64))
    # OpenCV's own refusal (a header claiming 4e10 pixels) is an ImageReadError naming the file
    (tmp_path / "huge.png").write_bytes(_png_header_only(200000, 200000))
    for bad, why in (("huge.png", "OpenCV could not decode"), ("empty.png", "empty")):
        (tmp_path / "empty.png").write_bytes(b"")
        with pytest.raises(ImageReadError, match=why) as e:
            read_image(tmp_path / bad)
        assert bad in str(e.value)
        with pytest.raises(cli.CLIError, match=why):
            cli._load_depth(tmp_path / bad)
