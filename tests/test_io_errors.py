"""Bad files -> ValueError naming the file and the problem."""
import re
import struct

import numpy as np
import pytest

from geomfit.io import load_model, read_contours, read_eos_blendshapes, read_eos_model, read_landmark_mapping, read_pts


def _raises(path, pattern, fn, *a, **k):
    with pytest.raises(ValueError) as ei:
        fn(*a, **k)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert re.search(pattern, msg), msg


@pytest.fixture(scope="module")
def sfm_bytes(sfm_dir):
    return (sfm_dir / "sfm_shape_3448.bin").read_bytes()


def test_missing_file(tmp_path):
    p = tmp_path / "nope.bin"
    _raises(p, "no such file", load_model, p)
    _raises(p, "no such file", read_pts, p)
    _raises(p, "no such file", read_landmark_mapping, p)
    _raises(tmp_path, "not a regular file", load_model, tmp_path)


@pytest.mark.parametrize("frac", [0.0001, 0.001, 0.3, 0.7, 0.99, 0.999999])
def test_truncated_model(tmp_path, sfm_bytes, frac):
    p = tmp_path / "trunc.bin"
    p.write_bytes(sfm_bytes[: int(len(sfm_bytes) * frac)])
    _raises(p, "truncated|too short", load_model, p)


def test_truncated_model_everywhere(tmp_path, sfm_bytes):
    """Every cut point in the structural fields (header, size tags, end) gives a ValueError."""
    n = len(sfm_bytes)
    cuts = list(range(0, 16)) + [n - k for k in range(1, 40)]
    cuts += list(np.random.default_rng(0).integers(16, n - 40, 30))
    p = tmp_path / "t.bin"
    for c in cuts:
        p.write_bytes(sfm_bytes[:c])
        _raises(p, "truncated|too short", read_eos_model, p)


def test_trailing_bytes(tmp_path, sfm_bytes):
    p = tmp_path / "long.bin"
    p.write_bytes(sfm_bytes + b"\0\0\0")
    _raises(p, "3 unexpected bytes", load_model, p)


def test_bad_version_and_wrong_format(tmp_path, sfm_bytes, sfm_dir):
    p = tmp_path / "v9.bin"
    p.write_bytes(struct.pack("<I", 9) + sfm_bytes[4:])
    _raises(p, "version field is 9", load_model, p)
    p = tmp_path / "text.bin"
    p.write_text("hello, this is not a model at all\n")
    _raises(p, "not an eos model file", load_model, p)
    # a blendshapes file given as the model
    bs = sfm_dir / "expression_blendshapes_3448.bin"
    _raises(bs, "not an eos model file", load_model, bs)
    p = tmp_path / "model.xyz"
    p.write_bytes(b"\x00\x01garbage")
    _raises(p, "unknown model format", load_model, p)
    # the model given as a blendshapes file
    _raises(sfm_dir / "sfm_shape_3448.bin", "truncated or corrupt", read_eos_blendshapes, sfm_dir / "sfm_shape_3448.bin")


def test_corrupt_sizes(tmp_path, sfm_bytes):
    # mean rows field (bytes 4-8) set to a huge value
    p = tmp_path / "huge.bin"
    p.write_bytes(sfm_bytes[:4] + struct.pack("<i", 2 ** 30) + sfm_bytes[8:])
    _raises(p, "truncated or corrupt: shape model mean", load_model, p)
    p.write_bytes(sfm_bytes[:4] + struct.pack("<i", -5) + sfm_bytes[8:])
    _raises(p, "negative size", load_model, p)


def test_negative_eigenvalue_and_nan(tmp_path, sfm_bytes):
    n3, k = 3448 * 3, 63
    off_ev = 4 + 8 + n3 * 4 + 8 + n3 * k * 4 + 8  # version, mean, basis, eigenvalue header
    assert struct.unpack("<ii", sfm_bytes[off_ev - 8:off_ev]) == (k, 1)
    b = bytearray(sfm_bytes)
    b[off_ev:off_ev + 4] = struct.pack("<f", -1.0)
    p = tmp_path / "neg.bin"
    p.write_bytes(bytes(b))
    _raises(p, "negative eigenvalues", load_model, p)
    b[off_ev:off_ev + 4] = struct.pack("<f", float("nan"))
    p.write_bytes(bytes(b))
    _raises(p, "NaN", load_model, p)


def test_triangle_out_of_range(tmp_path, sfm_bytes):
    n3, k = 3448 * 3, 63
    off_tri = 4 + 8 + n3 * 4 + 8 + n3 * k * 4 + 8 + k * 4 + 8  # first triangle's first index
    b = bytearray(sfm_bytes)
    b[off_tri:off_tri + 4] = struct.pack("<i", 5000)
    p = tmp_path / "tri.bin"
    p.write_bytes(bytes(b))
    _raises(p, "triangles reference vertices outside", load_model, p)


def test_blendshapes_vertex_count_mismatch(tmp_path, sfm_dir):
    eos = pytest.importorskip("eos")
    p = tmp_path / "bs5.bin"
    eos.morphablemodel.save_blendshapes(
        [eos.morphablemodel.Blendshape("x", np.zeros(15, np.float32))], str(p))
    assert read_eos_blendshapes(p)[1].shape == (15, 1)
    _raises(p, "5 vertices but the model", load_model, sfm_dir / "sfm_shape_3448.bin", expressions=p)


def test_truncated_blendshapes(tmp_path, sfm_dir):
    b = (sfm_dir / "expression_blendshapes_3448.bin").read_bytes()
    p = tmp_path / "bs.bin"
    for c in (3, 12, 20, len(b) // 2, len(b) - 1):
        p.write_bytes(b[:c])
        _raises(p, "truncated|too short", read_eos_blendshapes, p)


def test_mapping_out_of_range_and_bad(tmp_path, sfm_dir):
    model = sfm_dir / "sfm_shape_3448.bin"
    p = tmp_path / "map.txt"
    p.write_text("[landmark_mappings]\n31 = 114\n34 = 3448\n")
    _raises(p, "landmark 34 maps to vertex 3448, outside", load_model, model, landmarks=p)
    p.write_text("[landmark_mappings]\n31 = \"nose.tip\"\n")
    _raises(p, "does not define", load_model, model, landmarks=p)
    p.write_text("[landmark_mappings]\nnose = 3\n")
    _raises(p, "not an integer landmark number", read_landmark_mapping, p)
    p.write_text("[landmark_mappings]\n31 = -3\n")
    _raises(p, "negative vertex", read_landmark_mapping, p)
    p.write_text("[landmark_mappings\n31 = 3\n")
    _raises(p, "not a valid TOML", read_landmark_mapping, p)
    p.write_text("[other]\n31 = 3\n")
    _raises(p, "no \\[landmark_mappings\\] table", read_landmark_mapping, p)
    # the BFM mapping on the (smaller) SFM model
    bfm = sfm_dir / "ibug_to_bfm2009.txt"
    _raises(bfm, "outside the model", load_model, model, landmarks=bfm)


def test_contours_bad(tmp_path, sfm_dir):
    model = sfm_dir / "sfm_shape_3448.bin"
    bfmc = sfm_dir / "bfm2009_model_contours.json"
    _raises(bfmc, "right contour references vertices", load_model, model, contours=bfmc)
    p = tmp_path / "c.json"
    p.write_text('{"model_contour": {"right_contour": [1, 2], ')
    _raises(p, "not valid JSON", read_contours, p)
    p.write_text('{"model_contour": {"right_contour": [1, 2]}}')
    _raises(p, "left_contour is missing", read_contours, p)
    p.write_text('{"model_contour": {"right_contour": [1, -2], "left_contour": [3]}}')
    _raises(p, "non-negative integers", read_contours, p)
    p.write_text('[1, 2]')
    _raises(p, "no 'model_contour'", read_contours, p)


def test_pts_bad(tmp_path):
    p = tmp_path / "a.pts"
    good = "version: 1\nn_points: 3\n{\n1 2\n3 4\n5 6\n}\n"
    p.write_text(good)
    np.testing.assert_array_equal(read_pts(p), [[1, 2], [3, 4], [5, 6]])
    p.write_text(good.replace("}\n", ""))
    _raises(p, "no closing", read_pts, p)
    p.write_text(good.replace("n_points: 3", "n_points: 4"))
    _raises(p, "n_points is 4 but 3", read_pts, p)
    p.write_text(good.replace("3 4", "3 x"))
    _raises(p, "point 2", read_pts, p)
    p.write_text(good.replace("3 4", "3 nan"))
    _raises(p, "NaN", read_pts, p)
    p.write_text("1 2\n3 4\n")
    _raises(p, "not a .pts file", read_pts, p)
    p.write_bytes(b"\xff\xfe\x00garbage")
    _raises(p, "UTF-8", read_pts, p)
