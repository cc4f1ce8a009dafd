"""Landmark detector adapters: dlib against hand annotation, face-alignment via a stand-in, errors."""
import sys
import types

import numpy as np
import pytest

from geomfit import landmarks as L
from geomfit.photo import read_image


def _parse_pts(path):
    # independent minimal reader for the test (iBUG .pts: header, '{', rows, '}')
    body = open(path).read().split("{")[1].split("}")[0].split()
    return np.array(body, dtype=float).reshape(-1, 2)


def _nme(pred, gt):
    return np.linalg.norm(pred - gt, axis=1).mean() / np.linalg.norm(gt[36] - gt[45])


needs_dlib = pytest.mark.skipif(not L.available_detectors()["dlib"], reason="dlib predictor not installed")


@pytest.fixture(scope="module")
def photo(data):
    return read_image(data / "images" / "image_0010.png"), _parse_pts(data / "images" / "image_0010.pts")


@needs_dlib
def test_dlib_matches_hand_annotation(photo):
    img, gt = photo
    pts, info = L.detect_landmarks(img, "dlib")
    assert info["detector"] == "dlib" and info["n_faces"] == 1
    assert pts.shape == (68, 2)
    assert _nme(pts, gt) < 0.06  # ENGINEERING.md: 3.96 % (pupil normalisation); outer corners ~2.9 %
    # the face box contains the annotated face centre
    x0, y0, x1, y1 = info["box"]
    c = gt.mean(0)
    assert x0 < c[0] < x1 and y0 < c[1] < y1


@needs_dlib
def test_dlib_gray_and_16bit_give_same_landmarks(photo):
    img, gt = photo
    crop = img[100:700, 450:1000]
    gray16 = np.round(crop.mean(2) * 65535).astype(np.uint16)
    p16, _ = L.detect_landmarks(gray16, "dlib")
    assert _nme(p16 + [450, 100], gt) < 0.06


@needs_dlib
def test_several_faces_picks_largest(photo):
    import cv2

    img, gt = photo
    face = img[100:650, 480:980]  # 500x550 crop around the face
    canvas = np.full((900, 1400, 3), 0.5)
    canvas[50:600, 50:550] = face  # large copy at (50, 50)
    small = cv2.resize(face, (250, 275), interpolation=cv2.INTER_AREA)
    canvas[600:875, 1000:1250] = small  # half-size copy
    pts, info = L.detect_landmarks(canvas, "dlib")
    assert info["n_faces"] == 2
    assert "largest" in info["message"]
    expected = gt - [480, 100] + [50, 50]
    assert _nme(pts, expected) < 0.06


@needs_dlib
def test_no_face_is_clear_error():
    rng = np.random.default_rng(0)
    img = np.full((200, 240, 3), 0.4) + 0.01 * rng.standard_normal((200, 240, 3))
    with pytest.raises(L.NoFaceError, match="no face found"):
        L.detect_landmarks(img, "dlib")


def test_detector_missing_messages(monkeypatch):
    monkeypatch.setattr(L, "dlib_predictor_path", lambda: None)
    monkeypatch.setattr(L, "fan_weights_present", lambda: False)
    with pytest.raises(L.DetectorUnavailableError, match="no landmark detector available"):
        L.detect_landmarks(np.zeros((50, 50, 3)), "auto")
    with pytest.raises(L.DetectorUnavailableError, match="face_recognition_models"):
        L.detect_landmarks(np.zeros((50, 50, 3)), "dlib")
    with pytest.raises(ValueError, match="unknown detector"):
        L.detect_landmarks(np.zeros((50, 50, 3)), "mtcnn")


class _FakeFA:
    """Stands in for face_alignment.FaceAlignment: records calls, returns two faces."""

    calls = []

    def __init__(self, landmarks_type, device="cpu", face_detector="sfd", compile=True, **kw):
        self.args = dict(landmarks_type=landmarks_type, device=device, face_detector=face_detector, compile=compile)

    def get_landmarks_from_image(self, image, detected_faces=None, return_bboxes=False, return_landmark_score=False):
        _FakeFA.calls.append((image.dtype, image.shape, self.args))
        rng = np.random.default_rng(1)
        small = rng.uniform(10, 30, (68, 2))
        big = rng.uniform(40, 90, (68, 2))
        return [small, big], None, [np.r_[small.min(0), small.max(0), 0.99], np.r_[big.min(0), big.max(0), 0.98]]


def _fake_face_alignment_module():
    m = types.ModuleType("face_alignment")
    m.FaceAlignment = _FakeFA
    m.LandmarksType = types.SimpleNamespace(TWO_D="2D")
    return m


def test_fan_adapter_integration(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "face_alignment", _fake_face_alignment_module())
    L._fan_model.cache_clear()
    # weights absent: auto does not pick FAN; present (locally created files): it does
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(L, "dlib_predictor_path", lambda: None)
    assert not L.fan_weights_present()
    ck = tmp_path / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    for f in L.FAN_WEIGHT_FILES:
        (ck / f).write_bytes(b"x")
    assert L.fan_weights_present()
    assert L.available_detectors() == {"dlib": False, "fan": True}
    img = np.random.default_rng(0).uniform(size=(100, 120))  # grayscale float
    pts, info = L.detect_landmarks(img, "auto")
    L._fan_model.cache_clear()
    dtype, shape, args = _FakeFA.calls[-1]
    assert dtype == np.uint8 and shape == (100, 120, 3)
    assert args["device"] == "cpu" and args["compile"] is False and args["landmarks_type"] == "2D"
    assert info["detector"] == "fan" and info["n_faces"] == 2 and info["face_index"] == 1
    assert pts.min() >= 40  # the larger face


def test_fan_weight_failure_is_clear(monkeypatch):
    m = types.ModuleType("face_alignment")

    def boom(*a, **k):
        raise OSError("urlopen error [Errno -3] Temporary failure in name resolution")

    m.FaceAlignment = boom
    m.LandmarksType = types.SimpleNamespace(TWO_D="2D")
    monkeypatch.setitem(sys.modules, "face_alignment", m)
    L._fan_model.cache_clear()
    with pytest.raises(L.DetectorUnavailableError, match="network"):
        L.detect_landmarks(np.zeros((40, 40, 3)), "fan")
    L._fan_model.cache_clear()


def test_check_landmarks():
    rng = np.random.default_rng(0)
    pts = rng.uniform(10, 90, (68, 2))
    np.testing.assert_array_equal(L.check_landmarks(pts, (100, 100)), pts)
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        L.check_landmarks(pts[:10])
    bad = pts.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="one NaN"):
        L.check_landmarks(bad)
    bad[3] = np.nan  # a missing landmark is allowed
    np.testing.assert_array_equal(np.isnan(L.check_landmarks(bad, (100, 100))), np.isnan(bad))
    bad[:60] = np.nan
    with pytest.raises(ValueError, match="at least 10"):
        L.check_landmarks(bad)
    with pytest.raises(ValueError, match="infinite"):
        L.check_landmarks(np.full((68, 2), np.inf))
    with pytest.raises(ValueError, match="outside the 100x100 image"):
        L.check_landmarks(pts * 4, (100, 100))
    edge = pts.copy()
    edge[0] = [-5, 50]  # a jaw point slightly outside is fine
    L.check_landmarks(edge, (100, 100))


def test_pts_detector(data, tmp_path):
    io = pytest.importorskip("geomfit.io")
    if not hasattr(io, "read_pts"):
        pytest.skip("geomfit.io.read_pts not merged yet")
    img = read_image(data / "images" / "image_0010.png")
    pts, info = L.detect_landmarks(img, str(data / "images" / "image_0010.pts"))
    np.testing.assert_allclose(pts, _parse_pts(data / "images" / "image_0010.pts"))
    assert info["detector"] == "pts"
    with pytest.raises(ValueError, match="outside"):
        L.detect_landmarks(img[:200, :200], str(data / "images" / "image_0010.pts"))
    bad = tmp_path / "bad.pts"
    bad.write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    with pytest.raises(ValueError, match="bad.pts"):
        L.detect_landmarks(img, str(bad))
