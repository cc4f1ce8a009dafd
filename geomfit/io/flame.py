"""FLAME ``generic_model.pkl`` reader that does not need chumpy.

The official FLAME pickles (Li et al., SIGGRAPH Asia 2017) were written by Python 2 and hold chumpy
``Ch`` objects (``chumpy.ch.Ch``) for some arrays (``shapedirs``, sometimes ``v_template``), and a
SciPy sparse ``J_regressor``. A chumpy ``Ch`` pickles its ``__dict__`` (minus caches), whose ``'x'``
entry is the underlying ndarray. geomfit unpickles with a restricted ``Unpickler``: NumPy's array
reconstruction and a few harmless builtins are resolved normally; every other class (chumpy's,
SciPy's, anything else) becomes an inert stub that only records its pickled state, so no code from
the pickle runs and chumpy need not be installed. Arrays are then recovered from the stubs.

Model convention: the linear part of FLAME at zero pose (no neck/jaw/eye rotation, no pose
correctives, no skinning)::

    S = v_template + shapedirs[:, :, :n_shape] @ beta + shapedirs[:, :, n_shape:] @ psi

``shapedirs`` holds 300 identity then 100 expression directions (FLAME 2020/2023). Their columns are
already scaled so that ``beta`` and ``psi`` are in standard-deviation units (unit Gaussian prior):
FLAME's own fitting code (TF_FLAME, DECA) regularises them with a plain squared norm. geomfit uses
them unchanged as ``id_basis`` / ``exp_basis``. Units are metres.
"""
from __future__ import annotations

import pickle

import numpy as np

from ._errors import build_model, file_error, read_bytes

__all__ = ["load_flame", "read_flame_pickle"]

FLAME_N_SHAPE = 300

# (module, name) pairs resolved to the real object; everything else becomes a stub.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "float64"), ("numpy", "float32"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("_codecs", "encode"),
} | {(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar", "_frombuffer")} | {
    (m, n) for m in ("__builtin__", "builtins") for n in ("object", "set", "frozenset", "dict", "list", "tuple", "bytearray")
}


class PickleStub:
    """Inert stand-in for a class a pickle references (e.g. ``chumpy.ch.Ch``): keeps the state only."""

    _stub_origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        obj.__dict__["_stub_state"] = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_stub_state"] = state

    def __repr__(self):
        return f"<pickled {self._stub_origin}>"


_STUBS = {}


def _stub_class(module, name):
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (PickleStub,), {"_stub_origin": f"{module}.{name}", "__module__": __name__})
    return _STUBS[key]


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            if module.startswith("numpy.core"):
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        return _stub_class(module, name)


def _recover_array(path, key, obj):
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, PickleStub):
        st = obj._stub_state
        if isinstance(st, dict) and "x" in st:  # chumpy Ch: leaf value lives in 'x'
            return _recover_array(path, key, st["x"])
        raise file_error(path, f"{key}: cannot recover an array from a pickled {obj._stub_origin} "
                               "object (only plain chumpy Ch leaves are supported)")
    raise file_error(path, f"{key}: expected an array, got {type(obj).__name__}")


def read_flame_pickle(path) -> dict:
    """Unpickle a FLAME model file without chumpy (see the module notes); returns the raw dict,
    with chumpy objects still as :class:`PickleStub` instances."""
    data = read_bytes(path)
    import io

    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # truncated pickles raise EOFError / UnpicklingError / ValueError
        raise file_error(path, f"truncated or not a valid pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise file_error(path, f"not a FLAME model: the pickle holds a {type(obj).__name__}, expected a dict")
    return obj


def load_flame(path, dtype=np.float64, n_shape: int = FLAME_N_SHAPE):
    """Load a FLAME ``generic_model.pkl`` (or ``male_model.pkl``/``female_model.pkl``) as a linear model.

    Parameters
    ----------
    path : str or path-like
    dtype : numpy dtype
    n_shape : int, default 300
        Number of identity directions at the front of ``shapedirs``; the rest are expressions.

    Returns
    -------
    MorphableModel
        ``mean = v_template``, ``id_basis = shapedirs[..., :n_shape]``, ``exp_basis =
        shapedirs[..., n_shape:]`` (both already in standard-deviation units), ``faces = f``. Metres.

    Raises
    ------
    ValueError
        Not a pickle, truncated, missing keys, inconsistent shapes, or objects that are not arrays
        or chumpy leaves; naming the file.

    References
    ----------
    T. Li, T. Bolkart, M. J. Black, H. Li, J. Romero, "Learning a model of facial shape and
    expression from 4D scans", ACM TOG (SIGGRAPH Asia) 2017, Eq. 1-3 (shape and expression blendshapes).
    """
    d = read_flame_pickle(path)
    missing = [k for k in ("v_template", "shapedirs", "f") if k not in d]
    if missing:
        raise file_error(path, f"not a FLAME model: missing keys {missing}")
    v = np.asarray(_recover_array(path, "v_template", d["v_template"]))
    sd = np.asarray(_recover_array(path, "shapedirs", d["shapedirs"]))
    f = np.asarray(_recover_array(path, "f", d["f"]))
    if v.ndim != 2 or v.shape[1] != 3:
        raise file_error(path, f"v_template must have shape (N, 3), got {v.shape}")
    n = v.shape[0]
    if sd.ndim != 3 or sd.shape[:2] != (n, 3):
        raise file_error(path, f"shapedirs must have shape ({n}, 3, K), got {sd.shape}")
    for nm, a in (("v_template", v), ("shapedirs", sd)):
        if a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)):
            raise file_error(path, f"{nm} is not a finite numeric array")
    if f.ndim != 2 or f.shape[1] != 3 or f.dtype.kind not in "iu":
        raise file_error(path, f"f must be an integer array of shape (F, 3), got {f.dtype} {f.shape}")
    f = f.astype(np.int64)
    if f.size and (f.min() < 0 or f.max() >= n):
        raise file_error(path, f"f references vertices outside [0, {n})")
    k = min(int(n_shape), sd.shape[2])
    return build_model(path, mean=v.astype(dtype), id_basis=np.ascontiguousarray(sd[:, :, :k], dtype=dtype),
                       exp_basis=np.ascontiguousarray(sd[:, :, k:], dtype=dtype), faces=f, name=str(path))
