"""``load_model``: one entry point for every morphable-model format geomfit reads."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from ..model import MorphableModel
from ._errors import build_model, file_error
from .eos import read_eos_blendshapes, read_eos_model
from .landmarks import read_contours, read_landmark_mapping

__all__ = ["load_model", "detect_format"]

_MAGIC = (
    (b"MATLAB ", "bfm2009"),
    (b"\x89HDF\r\n\x1a\n", "bfm2017"),
    (b"PK\x03\x04", "npz"),
)
_EXT = {".bin": "eos", ".npz": "npz", ".mat": "bfm2009", ".h5": "bfm2017", ".hdf5": "bfm2017", ".pkl": "flame"}


def detect_format(path) -> str:
    """Guess a model file's format from its first bytes, then its extension.

    Returns one of ``"eos"``, ``"npz"``, ``"bfm2009"``, ``"bfm2017"`` (also 2019), ``"flame"``.

    Raises
    ------
    ValueError
        Missing file or a format geomfit does not know, naming the file.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise file_error(p, "no such file" if not p.exists() else "not a regular file")
    with open(p, "rb") as f:
        head = f.read(128)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return "flame"
    ext = p.suffix.lower()
    if ext in _EXT:
        return _EXT[ext]
    raise file_error(p, f"unknown model format (extension {ext!r}, first bytes {head[:8]!r}); "
                        "expected eos .bin, geomfit .npz, BFM .mat/.h5 or FLAME .pkl")


def _from_eos(path, dtype) -> MorphableModel:
    f = read_eos_model(path)
    n = f.shape.mean.size // 3
    mean = f.shape.mean.reshape(n, 3).astype(dtype)
    id_basis = f.shape.rescaled_basis.reshape(n, 3, -1).astype(dtype)
    exp_basis = np.zeros((n, 3, 0), dtype)
    if f.expression_pca is not None:
        mean = mean + f.expression_pca.mean.reshape(n, 3).astype(dtype)
        exp_basis = f.expression_pca.rescaled_basis.reshape(n, 3, -1).astype(dtype)
    elif f.blendshapes is not None and f.blendshapes.size:
        exp_basis = f.blendshapes.reshape(n, 3, -1).astype(dtype)
    texcoords = None
    if len(f.texcoords) == n:  # eos stores v down (image rows); geomfit uses OBJ's v up
        texcoords = np.column_stack([f.texcoords[:, 0], 1.0 - f.texcoords[:, 1]]).astype(dtype)
    color_mean = color_basis = None
    if f.color.mean.size:
        color_mean = f.color.mean.reshape(n, 3).astype(dtype)
        color_basis = f.color.rescaled_basis.reshape(n, 3, -1).astype(dtype)
    m = build_model(path, mean=mean, id_basis=id_basis, exp_basis=exp_basis,
                       faces=f.shape.triangles.astype(np.int64), texcoords=texcoords,
                       color_mean=color_mean, color_basis=color_basis, name=os.fspath(path))
    return m, dict(f.landmark_definitions or {})


def _no_defs(loader):
    def wrapped(path, dtype):
        return loader(path, dtype), {}
    return wrapped


def _loaders():
    from . import bfm, flame, npz  # local import: optional dependencies (scipy, h5py) load lazily
    return {"eos": _from_eos, "npz": _no_defs(npz.load_npz), "bfm2009": _no_defs(bfm.load_bfm2009),
            "bfm2017": _no_defs(bfm.load_bfm2017), "flame": _no_defs(flame.load_flame)}


def _expressions(model: MorphableModel, path, dtype) -> MorphableModel:
    fmt = detect_format(path)
    if fmt == "eos":
        _, offsets = read_eos_blendshapes(path)
        exp = offsets.reshape(-1, 3, offsets.shape[1])
    elif fmt == "npz":
        from .npz import load_npz
        exp = load_npz(path, dtype).exp_basis
    else:
        raise file_error(path, f"expressions must be an eos blendshapes .bin or a geomfit .npz, got a {fmt} file")
    if exp.shape[0] != model.n_vertices:
        raise file_error(path, f"blendshapes have {exp.shape[0]} vertices but the model "
                               f"{model.name} has {model.n_vertices}")
    model.exp_basis = np.ascontiguousarray(exp, dtype=dtype)
    return model


def _landmarks(model: MorphableModel, path, defs) -> dict:
    mapping = read_landmark_mapping(path)
    out = {}
    for k, v in mapping.items():
        if isinstance(v, str):
            if v not in defs:
                raise file_error(path, f"landmark {k} maps to {v!r}, which the model {model.name} does not define")
            v = defs[v]
        if not 0 <= v < model.n_vertices:
            raise file_error(path, f"landmark {k} maps to vertex {v}, outside the model's "
                                   f"[0, {model.n_vertices}) ({model.name})")
        out[k] = int(v)
    return out


def _contours(model: MorphableModel, path) -> dict:
    c = read_contours(path)
    for side, vals in c.items():
        bad = [v for v in vals if v >= model.n_vertices]
        if bad:
            raise file_error(path, f"{side} contour references vertices {bad} outside the model's "
                                   f"[0, {model.n_vertices}) ({model.name})")
    return c


def load_model(path, expressions=None, landmarks=None, contours=None, *, format=None,
               dtype=np.float64) -> MorphableModel:
    """Load a linear 3D morphable model (Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition Letters 2021, Eq. 1) with its landmark annotations.

    Parameters
    ----------
    path : str or path-like
        The model file: eos ``.bin`` (e.g. the Surrey Face Model ``sfm_shape_3448.bin``), geomfit
        ``.npz`` (see :func:`save_model`), Basel Face Model 2009 ``01_MorphableModel.mat``, BFM
        2017/2019 ``.h5``, or FLAME ``generic_model.pkl``. The format is detected from the file's
        first bytes, then its extension.
    expressions : str or path-like, optional
        An eos blendshapes ``.bin`` (e.g. ``expression_blendshapes_3448.bin``) or a geomfit ``.npz``
        whose ``exp_basis`` is used. It replaces the model file's own expression basis.
    landmarks : str or path-like, optional
        eos TOML mapping (``ibug_to_*.txt``) -> ``model.landmarks`` ``{ibug number: vertex}``.
        The jaw-contour landmarks (iBUG 1-8, 10-17) are not in these files; they come from ``contours``.
    contours : str or path-like, optional
        eos contour JSON -> ``model.contours = {"right": [...], "left": [...]}``.
    format : str, optional
        Force a format (``"eos"``, ``"npz"``, ``"bfm2009"``, ``"bfm2017"``, ``"flame"``).
    dtype : numpy dtype, default float64
        Floating type of the model arrays. The values are the file's values converted exactly (all
        supported files store float32 or float64).

    Returns
    -------
    MorphableModel
        ``mean`` (N,3), ``id_basis`` (N,3,K) scaled by the standard deviations (for eos models
        ``id_basis[:, :, k] = orthonormal_basis[:, k] * sqrt(eigenvalue_k)`` computed in float32,
        which equals eos's ``get_rescaled_pca_basis()`` reshaped to (N,3,K)), ``exp_basis``
        (N,3,E), ``faces`` (F,3) int64, ``texcoords`` where the file has one per vertex.

    Raises
    ------
    ValueError
        A missing, truncated, corrupt or wrong-format file, blendshapes whose vertex count differs
        from the model's, or landmark/contour files referencing vertices the model does not have.
        The message names the offending file and the problem.

    References
    ----------
    Huber et al., "A Multiresolution 3D Morphable Face Model and Fitting Framework", VISAPP 2016
    (the Surrey Face Model and eos's file formats). Jin et al., Pattern Recognition Letters 2021, Eq. 1 (the linear model).
    """
    fmt = format or detect_format(path)
    loaders = _loaders()
    if fmt not in loaders:
        raise ValueError(f"load_model: unknown format {fmt!r}; expected one of {sorted(loaders)}")
    model, defs = loaders[fmt](path, dtype)
    if expressions is not None:
        model = _expressions(model, expressions, dtype)
    if landmarks is not None:
        model.landmarks = _landmarks(model, landmarks, defs)
    if contours is not None:
        model.contours = _contours(model, contours)
    return model
