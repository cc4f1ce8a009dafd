"""geomfit's own ``.npz`` model format: a NumPy zip archive of plain arrays (no pickles).

Keys: ``geomfit_model_format`` (int, 1), ``mean`` (N,3), ``id_basis`` (N,3,K), ``exp_basis``
(N,3,E), ``faces`` (F,3), optional ``texcoords`` (N,2), ``color_mean`` (N,3), ``color_basis``
(N,3,Kc), ``landmark_ibug`` / ``landmark_vertex`` (L,) int64, ``contour_right`` / ``contour_left``
int64, ``name`` (0-d unicode string).
"""
from __future__ import annotations

import zipfile

import numpy as np

from ..model import MorphableModel
from ._errors import atomic_write, build_model, file_error

__all__ = ["save_model", "load_npz", "NPZ_FORMAT_VERSION"]

NPZ_FORMAT_VERSION = 1
_REQUIRED = ("mean", "id_basis", "exp_basis", "faces")
_OPTIONAL = ("texcoords", "color_mean", "color_basis")


def save_model(path, model: MorphableModel, compress: bool = False) -> None:
    """Save a :class:`~geomfit.model.MorphableModel` as a geomfit ``.npz`` file, atomically.

    The file is written to a temporary file in the same folder, then moved over ``path`` with
    ``os.replace``, so an interrupted save never leaves a half-written model. Load it back with
    :func:`geomfit.io.load_model`. Arrays are stored in their own dtype (CuPy arrays are copied to the
    host); no Python objects are pickled.

    Parameters
    ----------
    path : str or path-like
        Target file; written exactly as named (no ``.npz`` suffix is appended).
    model : MorphableModel
    compress : bool, default False
        Use zip deflate (smaller, slower to load).

    Raises
    ------
    TypeError
        ``model`` is not a MorphableModel.
    ValueError
        The target folder does not exist.
    """
    from ..backend import asnumpy

    if not isinstance(model, MorphableModel):
        raise TypeError(f"save_model: expected a MorphableModel, got {type(model).__name__}")
    arrays = {"geomfit_model_format": np.array(NPZ_FORMAT_VERSION, np.int64)}
    for k in _REQUIRED + _OPTIONAL:
        v = getattr(model, k)
        if v is not None:
            arrays[k] = np.ascontiguousarray(asnumpy(v))
    keys, verts = model.landmark_arrays()
    arrays["landmark_ibug"], arrays["landmark_vertex"] = keys, verts
    for side in ("right", "left"):
        arrays[f"contour_{side}"] = np.asarray(model.contours.get(side, []), dtype=np.int64)
    arrays["name"] = np.array(str(model.name))
    saver = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: saver(f, **arrays))


def load_npz(path, dtype=np.float64) -> MorphableModel:
    """Load a geomfit ``.npz`` model (see :func:`save_model`); use :func:`geomfit.io.load_model`.

    Raises
    ------
    ValueError
        Not a zip/npz file, truncated, not written by geomfit, missing arrays, or inconsistent shapes;
        the message names the file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if "geomfit_model_format" not in files:
                raise file_error(path, "not a geomfit model .npz (no 'geomfit_model_format' entry)")
            ver = int(z["geomfit_model_format"])
            if ver != NPZ_FORMAT_VERSION:
                raise file_error(path, f"geomfit model format version {ver}, this geomfit reads {NPZ_FORMAT_VERSION}")
            missing = [k for k in _REQUIRED if k not in files]
            if missing:
                raise file_error(path, f"missing arrays {missing}")
            a = {k: z[k] for k in files}
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise file_error(path, f"truncated or not a valid .npz file ({type(e).__name__}: {e})") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise file_error(path, f"corrupt .npz file: {e}") from None
    for k in ("mean", "id_basis", "exp_basis") + _OPTIONAL:
        if k in a:
            if a[k].dtype.kind != "f":
                raise file_error(path, f"{k} has dtype {a[k].dtype}, expected floating point")
            if not np.all(np.isfinite(a[k])):
                raise file_error(path, f"{k} contains NaN or infinite values")
            a[k] = np.ascontiguousarray(a[k], dtype=dtype)
    if a["faces"].dtype.kind not in "iu":
        raise file_error(path, f"faces has dtype {a['faces'].dtype}, expected integers")
    li, lv = a.get("landmark_ibug", np.zeros(0, np.int64)), a.get("landmark_vertex", np.zeros(0, np.int64))
    if li.shape != lv.shape or li.ndim != 1:
        raise file_error(path, f"landmark_ibug {li.shape} and landmark_vertex {lv.shape} differ")
    contours = {s: [int(v) for v in a[f"contour_{s}"]] for s in ("right", "left")
                if f"contour_{s}" in a and a[f"contour_{s}"].size}
    n = a["mean"].shape[0] if a["mean"].ndim == 2 else -1
    for s, vals in contours.items():
        if vals and not (0 <= min(vals) and max(vals) < n):
            raise file_error(path, f"{s} contour references vertices outside [0, {n})")
    name = str(a["name"]) if "name" in a else str(path)
    return build_model(
        path, mean=a["mean"], id_basis=a["id_basis"], exp_basis=a["exp_basis"],
        faces=a["faces"].astype(np.int64), texcoords=a.get("texcoords"),
        landmarks={int(k): int(v) for k, v in zip(li, lv)}, contours=contours,
        color_mean=a.get("color_mean"), color_basis=a.get("color_basis"), name=name)
