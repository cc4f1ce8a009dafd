"""68-point facial landmarks behind one interface: dlib, face-alignment (FAN) or a .pts file.

``detect_landmarks(image, detector="auto")`` returns the iBUG 68 points (continuous pixel
coordinates, origin at the top-left corner of the image, x to the right, y down, so the centre of
pixel (row i, column j) is (j + 0.5, i + 0.5): the convention of :mod:`geomfit.camera`; dlib's
integer pixel indices are shifted by 0.5) and an info dict saying which detector ran, how many
faces it found and which one it used.

Detectors
---------
``"dlib"``
    dlib's HOG frontal face detector and its 68-point shape predictor (Kazemi and Sullivan's
    regression trees), whose model file ships with the ``face_recognition_models`` package: works
    offline.  The predictor was trained on iBUG 300-W (non-commercial terms).  The default when
    installed.
``"fan"``
    face-alignment's 2D FAN with its S3FD face detector.  Its weights are downloaded by
    face-alignment on first use (into torch's hub cache); ``"auto"`` picks it only when dlib is
    missing and the weights are already present.
a path to a ``.pts`` file
    Landmarks annotated by hand or by another tool (iBUG .pts format).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import sys
from typing import Dict, Optional, Tuple

import numpy as np

from .photo import as_uint8_rgb, load_photo

__all__ = [
    "detect_landmarks",
    "check_landmarks",
    "available_detectors",
    "NoFaceError",
    "DetectorUnavailableError",
    "dlib_predictor_path",
    "fan_weights_present",
]

FAN_WEIGHT_FILES = ("2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth")

# HOG detection runs on a copy whose longest side is at most this (faster; boxes mapped back).
_DETECT_MAX_SIDE = 800


class NoFaceError(ValueError):
    """The detector found no face in the image."""


class DetectorUnavailableError(RuntimeError):
    """The requested landmark detector is not installed or has no weights."""


def _has(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- dlib -----------------------------------------------------------------------------------------
def dlib_predictor_path() -> Optional[pathlib.Path]:
    """Path of dlib's 68-point predictor inside ``face_recognition_models``, or None.

    Located with :func:`importlib.util.find_spec` so the package's ``__init__`` (which imports
    ``pkg_resources``) is never executed.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = pathlib.Path(loc) / "models" / "shape_predictor_68_face_landmarks.dat"
        if p.is_file():
            return p
    return None


def _dlib_available() -> bool:
    return _has("dlib") and dlib_predictor_path() is not None


@functools.lru_cache(maxsize=1)
def _dlib_models():
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(dlib_predictor_path()))


def _detect_dlib(rgb8: np.ndarray, upsample: int = 1):
    """All faces: list of (box (x0, y0, x1, y1) float, landmarks (68, 2))."""
    if not _has("dlib"):
        raise DetectorUnavailableError("dlib is not installed: pip install dlib-bin face_recognition_models")
    if dlib_predictor_path() is None:
        raise DetectorUnavailableError(
            "dlib's 68-point predictor was not found: pip install face_recognition_models"
        )
    import dlib

    detector, predictor = _dlib_models()
    h, w = rgb8.shape[:2]
    s = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    small = rgb8
    if s < 1.0:
        import cv2

        small = cv2.resize(rgb8, (int(round(w * s)), int(round(h * s))), interpolation=cv2.INTER_AREA)
    rects = detector(np.ascontiguousarray(small), int(upsample))
    faces = []
    for r in rects:
        box = np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64) / s
        full = dlib.rectangle(*[int(round(v)) for v in box])
        shape = predictor(np.ascontiguousarray(rgb8), full)
        # dlib's integer pixel indices -> continuous coordinates (pixel centre at index + 0.5)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) + 0.5
        faces.append((box, pts))
    return faces


# -- face-alignment (FAN) -------------------------------------------------------------------------
def _torch_hub_checkpoints() -> Optional[pathlib.Path]:
    if not _has("torch"):
        return None
    import torch.hub

    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def fan_weights_present() -> bool:
    """True when face-alignment's 2D-FAN and S3FD weight files are in torch's hub cache."""
    d = _torch_hub_checkpoints()
    return d is not None and all((d / f).is_file() for f in FAN_WEIGHT_FILES)


def _fan_available() -> bool:
    return _has("face_alignment")


@functools.lru_cache(maxsize=2)
def _fan_model(device: str):
    import face_alignment

    kw = dict(device=device, face_detector="sfd")
    try:
        return face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, compile=False, **kw)
    except TypeError:  # older face-alignment without the compile argument
        return face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kw)


def _detect_fan(rgb8: np.ndarray, device: str = "cpu"):
    if not _fan_available():
        raise DetectorUnavailableError("face-alignment is not installed: pip install face-alignment")
    try:
        fa = _fan_model(device)
    except Exception as e:  # network or weight errors surface from deep inside torch.hub
        raise DetectorUnavailableError(
            "face-alignment could not load its weights (they are downloaded on first use and need "
            f"network access; expected in {_torch_hub_checkpoints()}): {type(e).__name__}: {e}"
        ) from e
    out = fa.get_landmarks_from_image(np.ascontiguousarray(rgb8), return_bboxes=True)
    lms, _, boxes = out if isinstance(out, tuple) else (out, None, None)
    if lms is None:
        return []
    faces = []
    for i, pts in enumerate(lms):
        pts = np.asarray(pts, dtype=np.float64)[:, :2] + 0.5  # pixel indices -> continuous coordinates
        if boxes is not None and i < len(boxes):
            box = np.asarray(boxes[i], dtype=np.float64)[:4]
        else:
            box = np.r_[pts.min(0), pts.max(0)]
        faces.append((box, pts))
    return faces


# -- public ---------------------------------------------------------------------------------------
def available_detectors() -> Dict[str, bool]:
    """Which detectors can run here: ``{"dlib": bool, "fan": bool}`` (fan: package and weights present)."""
    return {"dlib": _dlib_available(), "fan": _fan_available() and fan_weights_present()}


def check_landmarks(landmarks, image_shape=None, name: str = "landmarks", margin: float = 0.25) -> np.ndarray:
    """Validate 68 landmarks (and that they belong to an image of ``image_shape``).

    Parameters
    ----------
    landmarks : array_like, shape (68, 2)
        NaN rows mark missing landmarks (at least 10 must be given).
    image_shape : tuple (H, W, ...), optional
        When given, every point must lie within the image enlarged by ``margin`` times its size on
        each side (jaw points of a face at the border may fall slightly outside), and at least half
        of the points inside it.
    name : str
        Used in error messages (e.g. the .pts file name).

    Returns
    -------
    ndarray, shape (68, 2), float64

    Raises
    ------
    ValueError
        Wrong shape, non-finite values, points outside the image.
    """
    a = np.asarray(landmarks, dtype=np.float64)
    if a.shape != (68, 2):
        raise ValueError(f"{name}: expected 68 landmarks of shape (68, 2), got shape {a.shape}")
    if np.isinf(a).any():
        raise ValueError(f"{name}: contains infinite coordinates")
    nan = np.isnan(a)
    if (nan[:, 0] != nan[:, 1]).any():
        raise ValueError(f"{name}: a landmark has one NaN coordinate (missing landmarks must be NaN in both)")
    if (~nan[:, 0]).sum() < 10:
        raise ValueError(f"{name}: only {(~nan[:, 0]).sum()} of 68 landmarks are given (NaN = missing); need at least 10")
    if image_shape is not None:
        a_all = a
        a = a[~nan[:, 0]]
        h, w = image_shape[:2]
        lo = np.array([-margin * w, -margin * h])
        hi = np.array([(1 + margin) * w, (1 + margin) * h])
        inside = ((a >= 0) & (a <= [w, h])).all(1)
        if ((a < lo) | (a > hi)).any() or inside.mean() < 0.5:
            raise ValueError(
                f"{name}: landmarks lie outside the {w}x{h} image (x in [{a[:, 0].min():.0f}, "
                f"{a[:, 0].max():.0f}], y in [{a[:, 1].min():.0f}, {a[:, 1].max():.0f}]); "
                "were they made for another image or another resolution?"
            )
        a = a_all
    return a


def _choose(detector: str) -> str:
    if detector != "auto":
        return detector
    if _dlib_available():
        return "dlib"
    if _fan_available() and fan_weights_present():
        return "fan"
    raise DetectorUnavailableError(
        "no landmark detector available: install dlib's predictor (pip install dlib-bin "
        "face_recognition_models), or face-alignment with its weights, or pass a .pts file"
    )


def detect_landmarks(image, detector: str = "auto", *, upsample: int = 1, device: str = "cpu"
                     ) -> Tuple[np.ndarray, dict]:
    """Find the iBUG 68 facial landmarks of the (largest) face in a photo.

    Parameters
    ----------
    image : ndarray or path
        Photo: (H, W), (H, W, 3) or (H, W, 4) array (uint8, uint16 or float in [0, 1]) or a file
        path (or ``skimage:NAME``).
    detector : {"auto", "dlib", "fan"} or path
        ``"auto"``: dlib when installed, else face-alignment when its weights are present.  A path to
        a ``.pts`` file returns its points (checked against the image size).
    upsample : int
        dlib HOG: times to upsample the (at most 800 px) detection copy; raise it for small faces.
    device : str
        face-alignment: torch device.

    Returns
    -------
    landmarks : ndarray, shape (68, 2)
        Pixel coordinates (x right, y down).
    info : dict
        ``detector``, ``n_faces`` (faces found), ``face_index`` (which one was used), ``box``
        (x0, y0, x1, y1) of that face, and ``message`` (a human-readable summary, e.g. that
        several faces were found and the largest was used).

    Raises
    ------
    NoFaceError
        No face was found.
    DetectorUnavailableError
        The detector is not installed or has no weights.
    ValueError
        Unknown detector, unreadable image or .pts file, landmarks outside the image.

    Notes
    -----
    Wang et al. (ICME 2020) and Jin et al. (Pattern Recognition Letters 2021) start from 68 detected
    landmarks (Wang et al. use FAN); the coarse fit
    (:func:`geomfit.fitting.fit_landmarks`) consumes them.
    """
    img = load_photo(image)
    src = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    if isinstance(detector, os.PathLike) or (isinstance(detector, str) and detector not in ("auto", "dlib", "fan")):
        p = pathlib.Path(detector)
        if p.suffix.lower() != ".pts" and not p.is_file():
            raise ValueError(f"unknown detector {detector!r}: use 'auto', 'dlib', 'fan' or a .pts file")
        pts = read_pts_checked(p, img.shape)
        return pts, {"detector": "pts", "file": str(p), "n_faces": 1, "face_index": 0,
                     "box": np.r_[pts.min(0), pts.max(0)].tolist(), "message": f"landmarks from {p}"}
    name = _choose(detector)
    rgb8 = as_uint8_rgb(img)
    if name == "dlib":
        faces = _detect_dlib(rgb8, upsample)
    else:
        faces = _detect_fan(rgb8, device)
    if not faces:
        raise NoFaceError(
            f"no face found in {src} by the {name} detector; try a larger or more frontal face, "
            "or pass landmarks as a .pts file"
        )
    areas = [max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) for b, _ in faces]
    i = int(np.argmax(areas))
    box, pts = faces[i]
    msg = f"{name}: 1 face found"
    if len(faces) > 1:
        msg = f"{name}: {len(faces)} faces found; using the largest (box {np.round(box).astype(int).tolist()})"
    info = {"detector": name, "n_faces": len(faces), "face_index": i, "box": [float(v) for v in box],
            "message": msg}
    return check_landmarks(pts, img.shape, name=f"{name} landmarks"), info


def read_pts_checked(path, image_shape=None) -> np.ndarray:
    """Read a .pts file (via :func:`geomfit.io.read_pts`) and check it has 68 points inside the image."""
    from .io import read_pts

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"landmark file not found: {p}")
    try:
        pts = read_pts(p)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read landmarks from {p}: {e}") from e
    return check_landmarks(pts, image_shape, name=str(p))
