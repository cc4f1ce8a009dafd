"""geomfit.ibug, the one iBUG 68-point definition, against a hand-annotated photo and the modules
that use it."""
import numpy as np
import pytest

from geomfit import ibug


def test_regions_partition_the_68_points():
    pts = [i for r in ibug.REGIONS.values() for i in r]
    assert sorted(pts) == list(range(68))
    assert set(ibug.RIGHT_EYE) | set(ibug.LEFT_EYE) == set(ibug.EYES)
    assert set(ibug.OUTER_LIPS) | set(ibug.INNER_LIPS) == set(ibug.MOUTH)
    assert set(ibug.CONTOUR_RIGHT) | {ibug.CHIN} | set(ibug.CONTOUR_LEFT) == set(ibug.JAW)
    assert [ibug.number(i) for i in (0, 67)] == [1, 68] and ibug.index(37) == 36
    with pytest.raises(ValueError):
        ibug.number(68)
    with pytest.raises(ValueError):
        ibug.index(0)


def test_users_agree_with_the_definition():
    from geomfit import fitting, laplacian

    assert fitting._JAW_RIGHT == tuple(range(1, 9)) and fitting._JAW_LEFT == tuple(range(10, 18))
    assert {k: (r.start, r.stop) for k, r in laplacian.IBUG_REGIONS.items()} == {
        "jaw": (1, 18), "brows": (18, 28), "nose": (28, 37), "eyes": (37, 49), "mouth": (49, 69)}


def test_definition_matches_a_hand_annotated_face(data):
    from geomfit.io import read_pts

    f = data / "images" / "image_0010.pts"
    if not f.is_file():
        pytest.skip(f"{f} not found")
    L = read_pts(f)  # image coordinates, y down; a roughly frontal face
    eye_r, eye_l = L[list(ibug.RIGHT_EYE)], L[list(ibug.LEFT_EYE)]
    # the subject's right eye is on the image's left; the outer corners are the extreme eye points
    assert eye_r[:, 0].mean() < eye_l[:, 0].mean()
    assert L[ibug.OUTER_EYE_CORNERS[0], 0] == eye_r[:, 0].min()
    assert L[ibug.OUTER_EYE_CORNERS[1], 0] == eye_l[:, 0].max()
    # the chin is (next to) the lowest contour point (the head is slightly tilted); brows above the
    # eyes, eyes above the mouth
    assert abs(int(np.argmax(L[list(ibug.JAW), 1])) - ibug.CHIN) <= 1
    assert L[list(ibug.BROWS), 1].mean() < L[list(ibug.EYES), 1].mean() < L[list(ibug.MOUTH), 1].mean()
    assert L[list(ibug.CONTOUR_RIGHT), 0].mean() < L[ibug.CHIN, 0] < L[list(ibug.CONTOUR_LEFT), 0].mean()
