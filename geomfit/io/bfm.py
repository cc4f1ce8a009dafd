"""Basel Face Model readers: BFM 2009 (``01_MorphableModel.mat``) and BFM 2017/2019 (``.h5``).

Conventions (documented in docs/models.md):

* BFM 2009 (Paysan et al., AVSS 2009): MATLAB v5 file with ``shapeMU`` (3N,1), ``shapePC`` (3N,K)
  orthonormal, ``shapeEV`` (K,1) **standard deviations** (not variances), ``texMU``/``texPC``/``texEV``
  likewise with colours in [0, 255], ``tl`` (F,3) 1-based triangles whose front faces are wound
  clockwise. geomfit converts: ``id_basis = shapePC * shapeEV``, colours / 255 (so in [0, 1] like
  the other models), ``faces = tl - 1`` with the last two columns swapped (counter-clockwise front
  faces). This matches eos's ``share/scripts/convert-bfm2009-to-eos.py``.
* BFM 2017/2019 (Gerig et al., FG 2018; statismo HDF5 layout): ``shape/model/mean`` (3N,),
  ``shape/model/pcaBasis`` (3N,K) with orthonormal columns, ``shape/model/pcaVariance`` (K,)
  **variances**, ``shape/representer/cells`` (3,F) 0-based, ``shape/representer/points`` (3,N);
  ``expression/model/*`` and ``color/model/*`` in the same layout. geomfit uses
  ``basis * sqrt(variance)``; the expression mean is added to the shape mean (as eos does for a PCA
  expression model). Colours are stored in [0, 1] and are not rescaled.

Coordinates are returned in the file's units, unconverted.
"""
from __future__ import annotations

import warnings

import numpy as np

from ._errors import build_model, file_error

__all__ = ["load_bfm2009", "load_bfm2017"]


def _check_pca(path, what, mean, basis, scale):
    """Validate a flat PCA model; returns (mean (N,3), basis (N,3,K) scaled by ``scale`` (K,))."""
    mean = np.asarray(mean).reshape(-1)
    scale = np.asarray(scale).reshape(-1)
    basis = np.asarray(basis)
    if basis.ndim != 2:
        raise file_error(path, f"{what} PCA basis must be 2-D (3N, K), got shape {basis.shape}")
    if mean.size == 0 or mean.size % 3:
        raise file_error(path, f"{what} mean has {mean.size} values, not a positive multiple of 3")
    if basis.shape[0] != mean.size:
        raise file_error(path, f"{what} PCA basis has {basis.shape[0]} rows, the mean has {mean.size} values")
    if basis.shape[1] != scale.size:
        raise file_error(path, f"{what} PCA basis has {basis.shape[1]} columns but {scale.size} variances")
    for nm, a in (("mean", mean), ("PCA basis", basis), ("variances", scale)):
        if a.dtype.kind not in "fiu":
            raise file_error(path, f"{what} {nm} has non-numeric dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise file_error(path, f"{what} {nm} contains NaN or infinite values")
    if np.any(scale < 0):
        raise file_error(path, f"{what} has negative variances / standard deviations")
    n = mean.size // 3
    return (mean.astype(np.float64).reshape(n, 3),
            basis.astype(np.float64).reshape(n, 3, -1) * scale.astype(np.float64)[None, None, :])


def _check_faces(path, faces, n):
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise file_error(path, f"triangles must have shape (F, 3), got {faces.shape}")
    if faces.dtype.kind == "f":
        if not np.all(np.isfinite(faces)) or np.any(faces != np.round(faces)):
            raise file_error(path, "triangle indices are not integers")
    elif faces.dtype.kind not in "iu":
        raise file_error(path, f"triangle indices have dtype {faces.dtype}")
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise file_error(path, f"triangles reference vertices outside [0, {n})")
    return faces


def load_bfm2009(path, dtype=np.float64):
    """Load the Basel Face Model 2009 ``01_MorphableModel.mat`` (MATLAB v5, read with SciPy).

    Parameters
    ----------
    path : str or path-like
    dtype : numpy dtype

    Returns
    -------
    MorphableModel
        ``id_basis = shapePC * shapeEV`` (the file's EV are standard deviations); faces 0-based and
        counter-clockwise; colour model scaled to [0, 1]; no expression basis (E = 0).

    Raises
    ------
    ValueError
        Unreadable or truncated file, missing variables, inconsistent sizes; naming the file.

    References
    ----------
    P. Paysan, R. Knothe, B. Amberg, S. Romdhani, T. Vetter, "A 3D Face Model for Pose and
    Illumination Invariant Face Recognition", AVSS 2009.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5)
        raise file_error(path, f"MATLAB v7.3 files are not supported, re-save with -v7 ({e})") from None
    except Exception as e:  # scipy raises ValueError/TypeError/OSError/EOFError on corrupt files
        raise file_error(path, f"truncated or not a valid MATLAB v5 file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("shapeMU", "shapePC", "shapeEV", "tl") if k not in mat]
    if missing:
        raise file_error(path, f"not a BFM 2009 model: missing variables {missing}")
    mean, id_basis = _check_pca(path, "shape", mat["shapeMU"], mat["shapePC"], mat["shapeEV"])
    n = mean.shape[0]
    tl = _check_faces(path, mat["tl"], n + 1)
    if tl.size and tl.min() < 1:
        raise file_error(path, "tl must hold 1-based vertex indices (found 0)")
    faces = (tl - 1)[:, [0, 2, 1]]
    color_mean = color_basis = None
    if all(k in mat for k in ("texMU", "texPC", "texEV")):
        cm, cb = _check_pca(path, "texture", mat["texMU"], mat["texPC"], np.asarray(mat["texEV"], np.float64) / 255.0)
        if cm.shape[0] != n:
            raise file_error(path, f"texture model has {cm.shape[0]} vertices, shape model {n}")
        color_mean, color_basis = (cm / 255.0).astype(dtype), cb.astype(dtype)
    return build_model(path, mean=mean.astype(dtype), id_basis=id_basis.astype(dtype),
                       exp_basis=np.zeros((n, 3, 0), dtype), faces=faces,
                       color_mean=color_mean, color_basis=color_basis, name=str(path))


def _h5_pca(path, f, group, required):
    names = ("mean", "pcaBasis", "pcaVariance")
    keys = [f"{group}/model/{k}" for k in names]
    present = [k in f for k in keys]
    if not all(present):
        if required or any(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise file_error(path, f"not a BFM 2017/2019 (statismo) model: missing datasets {missing}")
        return None
    try:
        mean, basis, var = (np.asarray(f[k][()]) for k in keys)
    except Exception as e:  # h5py raises OSError/KeyError on damaged data
        raise file_error(path, f"cannot read {group}/model ({type(e).__name__}: {e})") from None
    if basis.ndim == 2 and basis.shape[1]:
        norms = np.sqrt((np.asarray(basis, np.float64) ** 2).sum(axis=0))
        if np.max(np.abs(norms - 1.0)) > 1e-2:
            warnings.warn(f"{path}: {group}/model/pcaBasis columns are not unit length (norms "
                          f"{norms.min():.4g}..{norms.max():.4g}); geomfit assumes statismo's orthonormal "
                          "basis and scales it by sqrt(pcaVariance)", stacklevel=3)
    return _check_pca(path, group, mean, basis, np.sqrt(np.asarray(var, np.float64)) if np.all(np.asarray(var) >= 0) else var)


def load_bfm2017(path, dtype=np.float64):
    """Load a Basel Face Model 2017 or 2019 ``.h5`` file (statismo layout, read with h5py).

    Parameters
    ----------
    path : str or path-like
        e.g. ``model2017-1_bfm_nomouth.h5``, ``model2017-1_face12_nomouth.h5``,
        ``model2019_fullHead.h5``.
    dtype : numpy dtype

    Returns
    -------
    MorphableModel
        ``id_basis = pcaBasis * sqrt(pcaVariance)``; ``exp_basis`` likewise from ``expression/``
        (whose mean is added to ``mean``); colour model from ``color/`` where present.

    Raises
    ------
    ValueError
        Not an HDF5 file, truncated, missing datasets, inconsistent sizes; naming the file.

    References
    ----------
    T. Gerig, A. Morel-Forster, C. Blumer, B. Egger, M. Lüthi, S. Schönborn, T. Vetter,
    "Morphable Face Models - An Open Framework", FG 2018.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise file_error(path, f"truncated or not a valid HDF5 file ({type(e).__name__}: {e})") from None
    with f:
        mean, id_basis = _h5_pca(path, f, "shape", True)
        n = mean.shape[0]
        if "shape/representer/cells" not in f:
            raise file_error(path, "not a BFM 2017/2019 model: missing dataset shape/representer/cells")
        try:
            cells = np.asarray(f["shape/representer/cells"][()])
        except Exception as e:
            raise file_error(path, f"cannot read shape/representer/cells ({type(e).__name__}: {e})") from None
        if cells.ndim != 2 or cells.shape[0] != 3:
            raise file_error(path, f"shape/representer/cells must have shape (3, F), got {cells.shape}")
        faces = _check_faces(path, cells.T, n)
        if "shape/representer/points" in f:
            pts = f["shape/representer/points"]
            if pts.shape != (3, n):
                raise file_error(path, f"shape/representer/points has shape {pts.shape}, expected (3, {n})")
        exp = _h5_pca(path, f, "expression", False)
        exp_basis = np.zeros((n, 3, 0))
        if exp is not None:
            if exp[0].shape[0] != n:
                raise file_error(path, f"expression model has {exp[0].shape[0]} vertices, shape model {n}")
            mean = mean + exp[0]
            exp_basis = exp[1]
        col = _h5_pca(path, f, "color", False)
        color_mean = color_basis = None
        if col is not None:
            if col[0].shape[0] != n:
                raise file_error(path, f"color model has {col[0].shape[0]} vertices, shape model {n}")
            color_mean, color_basis = col[0].astype(dtype), col[1].astype(dtype)
    return build_model(path, mean=mean.astype(dtype), id_basis=id_basis.astype(dtype),
                       exp_basis=exp_basis.astype(dtype), faces=faces,
                       color_mean=color_mean, color_basis=color_basis, name=str(path))
