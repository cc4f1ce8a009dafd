""".pts read/write, mapping and contour files."""
import numpy as np
import pytest

from geomfit.io import read_contour_landmarks, read_pts, write_pts


def test_read_real_pts(data):
    p = data / "images" / "image_0010.pts"
    pts = read_pts(p)
    lines = p.read_text().splitlines()
    ref = np.array([[float(t) for t in ln.split()] for ln in lines[3:-1]])
    assert pts.shape == (68, 2)
    np.testing.assert_array_equal(pts, ref)


def test_pts_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1000, (68, 2))
    p = tmp_path / "a.pts"
    write_pts(p, pts)
    back = read_pts(p)
    np.testing.assert_allclose(back, pts, atol=5e-7)
    assert p.read_text().startswith("version: 1\nn_points: 68\n{\n")
    assert [f.name for f in tmp_path.iterdir()] == ["a.pts"]  # no temp file left behind


def test_write_pts_rejects_bad_points(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_pts(tmp_path / "a.pts", np.zeros((68, 3)))
    with pytest.raises(ValueError, match="NaN"):
        write_pts(tmp_path / "a.pts", np.full((5, 2), np.nan))
    assert not list(tmp_path.iterdir())


def test_contour_landmarks_table(sfm_dir):
    c = read_contour_landmarks(sfm_dir / "ibug_to_sfm.txt")
    assert c == {"right": list(range(1, 9)), "left": list(range(10, 18))}
