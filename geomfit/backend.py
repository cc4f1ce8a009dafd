"""The one place where geomfit chooses between CPU and GPU.

Every solver takes arrays and calls :func:`get_array_module` on them: NumPy arrays run on the CPU
(NumPy/SciPy, Numba ``@njit`` kernels, CHOLMOD), CuPy arrays run on the GPU (CuPy, Numba CUDA
kernels).  Nothing else in geomfit branches on the backend; solvers written as ``xp = get_array_module(x)``
followed by array code serve both.

Where an algorithm has a compiled CPU implementation and a CUDA one, the pair is registered under
one name in :data:`KERNELS` (or with :func:`register_kernel`) and the solver calls
``kernel(name, *arrays)``, which returns the implementation for the arrays' target
(:func:`target`: ``"cuda"`` for CuPy input, else ``"cpu"``). ``with force("cuda"):`` runs every
dispatch inside the block on the CUDA implementation, NumPy arrays included (copied to the device
and back): on a GPU, or on the CPU under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``); this is
how the tests compare the two implementations.

CUDA kernels are defined one way: a kernel module writes ``def _define_cuda(cuda): ...`` returning
a namespace of ``@cuda.jit`` kernels and keeps ``CUDA = LazyCuda(_define_cuda)``; the kernels are
compiled on first use, never at import.

Sparse symmetric positive-definite systems go through :func:`factorize_spd`, which returns a
factor-once / solve-many object:

* CPU: CHOLMOD through scikit-sparse (both the 0.4 ``cholesky``/``Factor`` API and 0.5's
  ``CholeskyFactor``), falling back to SciPy's SuperLU when scikit-sparse is not installed.
* GPU: ``cholespy`` when installed, else Jacobi-preconditioned conjugate gradients on the device
  (warm-started from the previous solution).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
import warnings
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = [
    "get_array_module",
    "is_cupy",
    "cupy_or_none",
    "asnumpy",
    "to_device",
    "has_cholmod",
    "cuda_available",
    "numba_cuda",
    "sparse_module",
    "ndimage_module",
    "sparse_to_device",
    "sparse_on_device",
    "symmetric_from_csr",
    "target",
    "force",
    "kernel",
    "register_kernel",
    "KERNELS",
    "LazyCuda",
    "cuda_view",
    "cuda_result",
    "factorize_spd",
    "SPDFactor",
    "pcg",
]

_CUPY: Any = False  # False = not probed yet, None = unavailable


def cupy_or_none() -> Optional[ModuleType]:
    """Return the ``cupy`` module if it imports and sees a GPU, else ``None`` (probed once)."""
    global _CUPY
    if _CUPY is False:
        try:
            import cupy  # type: ignore

            cupy.cuda.runtime.getDeviceCount()
            _CUPY = cupy
        except Exception:  # ImportError, CUDARuntimeError, missing driver ...
            _CUPY = None
    return _CUPY


def is_cupy(x: Any) -> bool:
    """True when ``x`` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays: Any) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array (dense or sparse), else ``numpy``.

    The same rule as ``cupy.get_array_module``, usable where CuPy is not installed.
    """
    for a in arrays:
        if is_cupy(a):
            import cupy  # type: ignore

            return cupy
    return np


def asnumpy(x: Any) -> np.ndarray:
    """Copy ``x`` to host memory as a NumPy array (no copy for NumPy input)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def to_device(x: Any, xp: ModuleType) -> Any:
    """Move ``x`` to the array module ``xp`` (``numpy`` or ``cupy``); no copy when already there."""
    if xp is np:
        return asnumpy(x)
    return xp.asarray(x)


def sparse_module(xp: ModuleType) -> ModuleType:
    """``scipy.sparse`` for NumPy, ``cupyx.scipy.sparse`` for CuPy."""
    if xp is np:
        return sp
    return importlib.import_module("cupyx.scipy.sparse")


def ndimage_module(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if xp is np:
        return importlib.import_module("scipy.ndimage")
    return importlib.import_module("cupyx.scipy.ndimage")


def sparse_to_device(A, xp: ModuleType):
    """A SciPy sparse matrix as CSR on the device of ``xp`` (SciPy for NumPy, cupyx for CuPy)."""
    return sparse_on_device(A.tocsr(), xp)


def symmetric_from_csr(values, indices, indptr, n: int, xp: ModuleType):
    """An ``n x n`` symmetric sparse matrix from CSR arrays, in the format ``factorize_spd`` and the
    device's products prefer: CSC on the CPU (the CSR arrays of a symmetric matrix are its CSC
    arrays, so nothing is copied), CSR in ``cupyx.scipy.sparse`` on the GPU."""
    if xp is np:
        return sp.csc_matrix((values, indices, indptr), shape=(n, n))
    return sparse_module(xp).csr_matrix((values, indices, indptr), shape=(n, n))


def sparse_on_device(A, xp: ModuleType):
    """A SciPy sparse matrix on the device of ``xp``: unchanged (any format) for NumPy, CSR in
    ``cupyx.scipy.sparse`` for CuPy. For solvers that factor on the CPU in CSC but solve on the GPU."""
    if xp is np:
        return A
    return sparse_module(xp).csr_matrix(A.tocsr())


def cuda_available() -> bool:
    """True when Numba CUDA kernels can run: a real GPU, or the simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    cuda = numba_cuda()
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def numba_cuda() -> Optional[ModuleType]:
    """The ``numba.cuda`` module (provided by ``numba-cuda`` on recent Numba), or ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from numba import cuda  # type: ignore
        return cuda
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# Targets, the test switch and the kernel registry
# ----------------------------------------------------------------------------------------------

TARGETS = ("cpu", "cuda")
_FORCED: contextvars.ContextVar = contextvars.ContextVar("geomfit_forced_target", default=None)


def target(*arrays: Any) -> str:
    """The target the arrays run on: ``"cuda"`` if any is a CuPy array, else ``"cpu"``.

    Inside ``with force(t):`` the answer is ``t`` whatever the arrays.
    """
    forced = _FORCED.get()
    if forced is not None:
        return forced
    return "cuda" if any(is_cupy(a) for a in arrays) else "cpu"


@contextlib.contextmanager
def force(name: str):
    """Context manager: every :func:`kernel` dispatch in the block uses target ``name``.

    ``force("cuda")`` runs the CUDA implementations on NumPy input too (arrays are copied to the
    device and results copied back): on a GPU, or on the CPU under ``NUMBA_ENABLE_CUDASIM=1``.
    The tests use it to compare each CUDA implementation with its CPU twin. ``force("cpu")`` runs
    the CPU implementations (CuPy input is then not accepted by most of them).

    Raises
    ------
    ValueError
        ``name`` is not ``"cpu"`` or ``"cuda"``.
    RuntimeError
        ``"cuda"`` while Numba CUDA can run neither on a GPU nor in the simulator.

    Examples
    --------
    >>> import numpy as np
    >>> from geomfit import backend
    >>> with backend.force("cpu"):
    ...     backend.target(np.zeros(3))
    'cpu'
    """
    if name not in TARGETS:
        raise ValueError(f"force: target must be one of {TARGETS}, got {name!r}")
    if name == "cuda" and not cuda_available():
        raise RuntimeError("force('cuda'): Numba CUDA has no GPU here; set NUMBA_ENABLE_CUDASIM=1 to run the "
                           "CUDA kernels in Numba's simulator")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


#: Built-in kernels: name -> (CPU implementation, CUDA implementation), each ``"module:attribute"``
#: (an attribute path may be dotted), imported on first use. Both implementations of a name take
#: the same arguments and give the same results (tested against each other under the simulator).
KERNELS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    # triangle rasterisation, flat buffers (geomfit.render.rasterize validates and packs)
    "rasterize": ("geomfit.kernels.raster:rasterize_cpu", "geomfit.kernels.raster:rasterize_cuda"),
    # the coarse landmark fit of a batch, one image per thread (geomfit.fitting.fit_landmarks)
    "landmark_fit": ("geomfit.fitting:_fit_kernel", "geomfit.fitting:_fit_cuda"),
    # screened-Poisson solve on an image grid (geomfit.multigrid.solve_screened_poisson)
    "screened_poisson": ("geomfit.multigrid:_solve_cpu", "geomfit.multigrid:_solve_cuda"),
    # the stencil kernels of the aggregation multigrid (geomfit.multigrid.GridMultigrid)
    "aggregation_mg": ("geomfit.kernels.multigrid:AGGREGATION_CPU", "geomfit.kernels.multigrid:AGGREGATION_CUDA"),
}

_RESOLVED: Dict[Tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def register_kernel(name: str, cpu=None, cuda=None) -> None:
    """Register (or replace) kernel ``name``: a CPU and a CUDA implementation with one signature.

    Each of ``cpu`` and ``cuda`` is a callable (or any object, e.g. a namespace of kernels), a
    ``"module:attribute"`` string imported on first use, or ``None`` (no implementation for that
    target). Solvers then call ``kernel(name, *arrays)``.
    """
    with _LOCK:
        KERNELS[name] = (cpu, cuda)
        for t in TARGETS:
            _RESOLVED.pop((name, t), None)


def _resolve(ref):
    if not isinstance(ref, str):
        return ref
    mod, _, attr = ref.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def kernel(name: str, *arrays: Any, on: Optional[str] = None):
    """The implementation of kernel ``name`` for the target of ``arrays`` (see :func:`target`).

    Parameters
    ----------
    name : str
        A key of :data:`KERNELS` (or a name given to :func:`register_kernel`).
    *arrays
        The arrays the kernel will run on; their device picks the target.
    on : {None, "cpu", "cuda"}
        Ask for a target explicitly instead.

    Raises
    ------
    KeyError
        Unknown kernel name.
    RuntimeError
        No implementation for the target, or the CUDA one cannot run here (no GPU, no simulator).
    """
    t = on if on is not None else target(*arrays)
    if t not in TARGETS:
        raise ValueError(f"kernel: target must be one of {TARGETS}, got {t!r}")
    key = (name, t)
    impl = _RESOLVED.get(key)
    if impl is not None:
        return impl
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(KERNELS)}")
    ref = KERNELS[name][TARGETS.index(t)]
    if ref is None:
        raise RuntimeError(f"kernel {name!r} has no {t} implementation")
    if t == "cuda" and not cuda_available():
        raise RuntimeError(f"kernel {name!r}: Numba CUDA has no GPU here (NUMBA_ENABLE_CUDASIM=1 runs it on the CPU)")
    impl = _resolve(ref)
    with _LOCK:
        _RESOLVED[key] = impl
    return impl


def cuda_view(a):
    """A Numba CUDA kernel argument for ``a``: a CuPy array as it is, a NumPy array copied to the device."""
    if is_cupy(a):
        return a
    return numba_cuda().to_device(np.ascontiguousarray(a))


def cuda_result(d, xp: ModuleType):
    """A kernel's output buffer ``d`` for array module ``xp``: copied to the host for NumPy, as is for CuPy."""
    if xp is np:
        return d.copy_to_host()
    return d


class LazyCuda:
    """The CUDA kernels of one kernel module, defined on first attribute access.

    ``factory(cuda)`` receives the ``numba.cuda`` module and returns a mapping or namespace of
    ``@cuda.jit`` kernels; it runs once. Kernel bodies must reach ``cuda.grid`` etc. through the
    module-level global ``cuda`` of their module (Numba's simulator swaps that global in), so a
    kernel module declares ``cuda = None`` at module level and this class binds it to ``numba.cuda``
    just before ``factory`` runs: ``numba.cuda`` (0.3-0.5 s to import) is imported only when a CUDA
    kernel is first used, never by importing a kernel module or running the CPU paths.
    """

    def __init__(self, factory: Callable[[ModuleType], Any]):
        self._factory = factory
        self._ns = None

    def _load(self):
        if self._ns is None:
            with _LOCK:
                if self._ns is None:
                    cu = numba_cuda()
                    if cu is None:
                        raise RuntimeError("Numba CUDA is not importable: install numba-cuda (geomfit[gpu])")
                    module_globals = getattr(self._factory, "__globals__", {})
                    if "cuda" in module_globals:
                        module_globals["cuda"] = cu
                    ns = self._factory(cu)
                    self._ns = SimpleNamespace(**ns) if isinstance(ns, dict) else ns
        return self._ns

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._load(), name)


# ----------------------------------------------------------------------------------------------
# Sparse SPD factorisation: factor once, solve many
# ----------------------------------------------------------------------------------------------

_CHOLMOD: Any = False


def _cholmod():
    global _CHOLMOD
    if _CHOLMOD is False:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _CHOLMOD = importlib.import_module("sksparse.cholmod")
        except Exception:
            _CHOLMOD = None
    return _CHOLMOD


_BLAS_CTL: Any = False  # False = not probed yet, None = threadpoolctl unavailable
_BLAS_CTL_MODULES = -1  # len(sys.modules) when the controller was built


def one_blas_thread():
    """Context manager that limits BLAS libraries to one thread (threadpoolctl; a no-op without it).

    Sparse triangular solves with a few right-hand sides are memory-bound chains of small BLAS
    calls; with a multi-threaded OpenBLAS beside Numba's worker threads they were measured here
    to take 25 ms or, at random, 90-130 ms (the same CHOLMOD solve of a 136k-unknown factor), and
    always 25 ms with one BLAS thread. Factorisations keep all threads.

    The controller (which lists the loaded BLAS libraries, about 1 ms) is cached and rebuilt when
    new modules have been imported since, so a BLAS loaded later is limited too.
    """
    global _BLAS_CTL, _BLAS_CTL_MODULES
    import sys

    if _BLAS_CTL is not None and len(sys.modules) != _BLAS_CTL_MODULES:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CTL = ThreadpoolController()
            _BLAS_CTL_MODULES = len(sys.modules)
        except Exception:  # ImportError, or a platform threadpoolctl cannot inspect
            _BLAS_CTL = None
    if _BLAS_CTL is None:
        import contextlib

        return contextlib.nullcontext()
    return _BLAS_CTL.limit(limits=1, user_api="blas")


def has_cholmod() -> bool:
    """True when scikit-sparse's CHOLMOD wrapper is importable."""
    return _cholmod() is not None


class SPDFactor:
    """A factorisation of a sparse symmetric positive-definite matrix ``A``.

    Use :func:`factorize_spd` to build one. ``solve(b)`` accepts ``b`` of shape (n,) or (n, k) on the
    same device as ``A`` and returns an array of the same shape. ``update(C, subtract=False)``
    replaces ``A`` by ``A + C C^T`` (or ``A - C C^T``) cheaply where the backend supports it
    (CHOLMOD's rank-k update), and refactors otherwise. Built with ``last=rows``,
    ``solve_last(b[rows])`` solves for a ``b`` that is zero outside those rows in about half the time
    of ``solve`` (CHOLMOD with the rows eliminated last; see :func:`factorize_spd`).

    Attributes
    ----------
    method : str
        ``"cholmod"``, ``"superlu"``, ``"cholespy"`` or ``"cg"``.
    shape : tuple of int
    ordering : str or None
        The CHOLMOD ordering asked for (``None``: CHOLMOD's default).
    last : ndarray of int or None
        The rows given as ``last``.
    """

    def __init__(self, A, method: Optional[str] = None, tol: float = 1e-10, maxiter: Optional[int] = None,
                 ordering: Optional[str] = None, last=None):
        xp = get_array_module(A)
        self.ordering = ordering
        self._lastfast = None  # CHOLMOD data of the ``last`` fast path (see solve_last)
        self._f_perm = None  # p when the CHOLMOD factor is of A[p][:, p] (the ``last`` layout)
        self.last = None if last is None else np.asarray(asnumpy(last), dtype=np.int64).reshape(-1)
        if self.last is not None and (self.last.size == 0 or self.last.min() < 0 or self.last.max() >= A.shape[0]
                                      or np.unique(self.last).size != self.last.size):
            raise ValueError("factorize_spd: last must hold distinct row indices in [0, n)")
        self.xp = xp
        self.shape = A.shape
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"factorize_spd: matrix must be square, got shape {A.shape}")
        self.tol = tol
        self.maxiter = maxiter
        self._last = None
        if xp is np:
            A = sp.csc_matrix(A, dtype=np.float64)
            self.A = A
            if method is None:
                method = "cholmod" if has_cholmod() else "superlu"
            if method == "cholmod" and self.last is not None:
                self._factor_cholmod_last(A)
            elif method == "cholmod":
                self._factor_cholmod(A)
            elif method == "superlu":
                self._factor_superlu(A)
            else:
                raise ValueError(f"factorize_spd: unknown CPU method {method!r} (use 'cholmod' or 'superlu')")
        else:
            sparse = sparse_module(xp)
            A = sparse.csr_matrix(A, dtype=xp.float64)
            self.A = A
            if method is None:
                method = "cholespy" if importlib.util.find_spec("cholespy") is not None else "cg"
            if method == "cholespy":
                self._factor_cholespy(A)
            elif method == "cg":
                d = A.diagonal()
                if bool(xp.any(d <= 0)):
                    raise np.linalg.LinAlgError("factorize_spd: matrix has a non-positive diagonal: not SPD")
                self._inv_diag = 1.0 / d
            else:
                raise ValueError(f"factorize_spd: unknown GPU method {method!r} (use 'cholespy' or 'cg')")
        self.method = method

    # -- CPU ------------------------------------------------------------------------------------
    def _factor_cholmod(self, A):
        chol = _cholmod()
        try:
            if hasattr(chol, "cho_factor"):  # scikit-sparse >= 0.5: CholeskyFactor objects
                self._f = chol.cho_factor(sp.csc_array(A))
            else:
                # scikit-sparse 0.4: cholesky() returns a Factor. Supernodal LL^T, because the
                # simplicial LDL^T that "auto" picks for small matrices accepts indefinite ones.
                if self.ordering is None:
                    self._f = chol.cholesky(A, mode="supernodal")
                else:
                    self._f = chol.cholesky(A, mode="supernodal", ordering_method=self.ordering)
        except Exception as e:  # CholmodNotPositiveDefiniteError and friends
            raise np.linalg.LinAlgError(f"factorize_spd: CHOLMOD failed, matrix is not SPD ({e})") from e

    def _factor_cholmod_last(self, A):
        """CHOLMOD factor of ``A`` with the rows ``self.last`` eliminated last (scikit-sparse 0.4).

        The other rows are ordered by CHOLMOD's ``analyze`` of their submatrix, the ``last`` rows
        follow, and ``P A P^T = L L^T`` is factored in that order. Then a right-hand side that is zero
        outside ``last`` has a forward solve ``L y = P b`` that is zero outside the trailing block
        (only ancestors of those rows in the elimination tree are reached, and they all come last):
        :meth:`solve_last` does it with the dense trailing block of ``L`` and leaves CHOLMOD one
        backward solve ``L^T z = y``, about half the work of a full solve.
        """
        chol = _cholmod()
        if hasattr(chol, "cho_factor"):  # scikit-sparse >= 0.5: no constrained path, plain factor
            self._factor_cholmod(A)
            return
        n = A.shape[0]
        is_last = np.zeros(n, dtype=bool)
        is_last[self.last] = True
        rest = np.flatnonzero(~is_last)
        try:
            if rest.size:
                sub = A[rest][:, rest].tocsc()
                kw = {} if self.ordering is None else {"ordering_method": self.ordering}
                p_rest = rest[chol.analyze(sub, mode="supernodal", **kw).P()]
            else:
                p_rest = rest
            p = np.concatenate([p_rest, self.last])
            Ap = A[p][:, p].tocsc()
            Ap.sort_indices()
            self._f = chol.cholesky(Ap, mode="supernodal", ordering_method="natural")
        except Exception as e:
            raise np.linalg.LinAlgError(f"factorize_spd: CHOLMOD failed, matrix is not SPD ({e})") from e
        self._f_perm = p  # the matrix CHOLMOD holds is A[p][:, p]
        q = p[self._f.P()]  # A[q][:, q] = L L^T (CHOLMOD postorders the natural ordering)
        pos = np.empty(n, dtype=np.int64)
        pos[q] = np.arange(n)
        m = self.last.size
        if pos[self.last].min() < n - m:  # not expected (ancestors of last rows are last rows)
            return
        self._lastfast = {"q": q, "pos_last": pos[self.last] - (n - m)}
        self._extract_trailing()

    def _rows_in_last(self, C) -> bool:
        is_last = np.zeros(self.shape[0], dtype=bool)
        is_last[self.last] = True
        return bool(is_last[sp.coo_matrix(C).row].all())

    def _extract_trailing(self):
        """Dense trailing ``m x m`` block of the current CHOLMOD factor ``L`` (of ``L L^T``).

        ``Factor.L()`` turns the factor into a simplicial ``L L^T`` in place (cheaper than a copy;
        CHOLMOD's simplicial backward solve is as fast as the supernodal one here).
        """
        n, m = self.shape[0], self.last.size
        Lc = self._f.L().tocsc()[:, n - m:].tocsr()[n - m:]
        U = np.ascontiguousarray(Lc.toarray().T)  # U = L_HH^T, upper, rows contiguous
        self._lastfast["U"] = U  # trailing factor of the current A
        self._lastfast["U0"] = U  # trailing block of CHOLMOD's factor (differs after dense updates)

    def _factor_superlu(self, A):
        try:
            self._f = spla.splu(A, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
        except RuntimeError as e:
            raise np.linalg.LinAlgError(f"factorize_spd: matrix is singular ({e})") from e

    # -- GPU ------------------------------------------------------------------------------------
    def _factor_cholespy(self, A):
        import cholespy  # type: ignore

        xp = self.xp
        Acoo = A.tocoo()
        n = A.shape[0]
        self._f = cholespy.CholeskySolverD(
            n,
            Acoo.row.astype(xp.int32),
            Acoo.col.astype(xp.int32),
            Acoo.data.astype(xp.float64),
            cholespy.MatrixType.COO,
        )

    def _solve_cg(self, b):
        xp = self.xp
        from cupyx.scipy.sparse.linalg import LinearOperator, cg  # type: ignore

        n = self.shape[0]
        M = LinearOperator((n, n), matvec=lambda v: self._inv_diag * v, dtype=xp.float64)
        cols = b.reshape(n, -1)
        x0 = self._last if (self._last is not None and self._last.shape == cols.shape) else xp.zeros_like(cols)
        out = xp.empty_like(cols)
        bnorm = xp.linalg.norm(cols, axis=0)
        for j in range(cols.shape[1]):  # one right-hand side per CuPy CG call (columns, not pixels)
            if float(bnorm[j]) == 0.0:
                out[:, j] = 0.0
                continue
            out[:, j], _ = cg(self.A, cols[:, j], x0=x0[:, j], tol=self.tol, atol=0.0, M=M,
                              maxiter=self.maxiter or 10 * n)
        self._last = out
        return out.reshape(b.shape)

    # -- public ---------------------------------------------------------------------------------
    def solve(self, b):
        """Solve ``A x = b`` for ``b`` of shape (n,) or (n, k) (same device as ``A``)."""
        if self.method == "cholmod":
            with one_blas_thread():
                return self._solve(b)
        return self._solve(b)

    def _solve(self, b):
        xp = self.xp
        if get_array_module(b) is not xp:
            raise TypeError("SPDFactor.solve: right-hand side is on a different device than the matrix")
        if b.shape[0] != self.shape[0]:
            raise ValueError(f"SPDFactor.solve: right-hand side has {b.shape[0]} rows, matrix has {self.shape[0]}")
        b = b.astype(xp.float64, copy=False)
        if self.method == "cholmod" and self._lastfast is not None:  # A[q][:, q] = L L^T
            lf = self._lastfast
            q = lf["q"]
            if lf["U"] is lf["U0"]:
                z = self._f.solve_A(b[self._f_perm])  # the factor is of A[p][:, p]
                x = np.empty_like(z)
                x[self._f_perm] = z
                return x
            # CHOLMOD's L_II and L_HI are current, its L_HH is not: forward solve, then correct the
            # trailing part (y_H = L_HH^{-1} L_HH0 y0_H), backward through U and U0, CHOLMOD backward
            n, m = self.shape[0], self.last.size
            kern = _dense_kernels()
            y = np.asfortranarray(self._f.solve_L(b[q].reshape(n, -1), use_LDLt_decomposition=False))
            t = kern["matvec"](lf["U0"], np.ascontiguousarray(y[n - m:]), True)
            kern["fwd"](lf["U"], t)
            kern["bwd"](lf["U"], t)
            y[n - m:] = kern["matvec"](lf["U0"], t)
            z = self._f.solve_Lt(y, use_LDLt_decomposition=False)
            x = np.empty_like(z)
            x[q] = z
            return x.reshape(b.shape)
        if self.method == "cholmod" and self._f_perm is not None:  # factor of A[p][:, p]
            x = np.empty_like(b)
            x[self._f_perm] = self._f(b[self._f_perm])
            return x
        if self.method == "cholmod":
            return self._f.solve(b) if hasattr(self._f, "solve") else self._f(b)
        if self.method == "superlu":
            return self._f.solve(np.ascontiguousarray(b))
        if self.method == "cholespy":
            cols = xp.ascontiguousarray(b.reshape(self.shape[0], -1))
            x = xp.empty_like(cols)
            self._f.solve(cols, x)
            return x.reshape(b.shape)
        return self._solve_cg(b)

    __call__ = solve

    def refactor(self, A) -> "SPDFactor":
        """Factor a new matrix ``A`` with the sparsity pattern of the current one, in place.

        CHOLMOD (scikit-sparse 0.4) keeps its symbolic analysis (fill-reducing ordering and
        elimination tree) and redoes only the numeric factorisation; the other methods factor
        from scratch. ``A`` must be on the same device and hold no entry outside the pattern of
        the matrix this factor was built from (explicit zeros are fine). Returns ``self``.

        Raises
        ------
        numpy.linalg.LinAlgError
            If ``A`` is not positive definite (CHOLMOD) or singular (SuperLU).
        """
        xp = self.xp
        if A.shape != self.shape:
            raise ValueError(f"SPDFactor.refactor: matrix has shape {A.shape}, the factor {self.shape}")
        if xp is np:
            A = sp.csc_matrix(A, dtype=np.float64)
            self.A = A
            if self.method == "cholmod" and self.last is not None:  # the permuted ``last`` layout
                self._lastfast = self._f_perm = None
                self._factor_cholmod_last(A)
            elif self.method == "cholmod" and hasattr(self._f, "cholesky_inplace"):
                try:
                    self._f.cholesky_inplace(A)
                except Exception as e:
                    raise np.linalg.LinAlgError(f"factorize_spd: CHOLMOD failed, matrix is not SPD ({e})") from e
            elif self.method == "cholmod":
                self._factor_cholmod(A)
            else:
                self._factor_superlu(A)
        else:
            self.A = sparse_module(xp).csr_matrix(A, dtype=xp.float64)
            if self.method == "cholespy":
                self._factor_cholespy(self.A)
            else:
                d = self.A.diagonal()
                if bool(xp.any(d <= 0)):
                    raise np.linalg.LinAlgError("factorize_spd: matrix has a non-positive diagonal: not SPD")
                self._inv_diag = 1.0 / d
                self._last = None
        return self

    @property
    def exact(self) -> bool:
        """True when :meth:`solve` is a direct solve (not the iterative GPU fallback)."""
        return self.method != "cg"

    def solve_last(self, b_last):
        """Solve ``A x = b`` for a ``b`` that is zero outside the rows ``last`` given at factorisation.

        Parameters
        ----------
        b_last : array (m,) or (m, k)
            The rows ``b[last]`` (in the order of ``last``); every other row of ``b`` is zero.

        Returns
        -------
        array (n,) or (n, k)
            ``x = A^{-1} b``, the same as ``solve`` of the full ``b``.

        Raises
        ------
        ValueError
            When the factor was built without ``last`` or ``b_last`` has the wrong number of rows.

        Notes
        -----
        With CHOLMOD (scikit-sparse 0.4) the forward solve is a dense triangular solve with the
        trailing ``m x m`` block of the factor and CHOLMOD does only the backward solve; every other
        method builds the full ``b`` and calls :meth:`solve`.
        """
        if self.last is None:
            raise ValueError("SPDFactor.solve_last: the factor was built without last=")
        xp = self.xp
        m, n = self.last.size, self.shape[0]
        if b_last.shape[0] != m:
            raise ValueError(f"SPDFactor.solve_last: b_last has {b_last.shape[0]} rows, last has {m}")
        if self._lastfast is None:
            b = xp.zeros((n,) + tuple(b_last.shape[1:]), dtype=xp.float64)
            b[to_device(self.last, xp)] = b_last
            return self.solve(b)
        lf = self._lastfast
        bl = np.asarray(b_last, dtype=np.float64)
        cols = bl.reshape(m, -1)
        y_last = np.empty_like(cols)
        y_last[lf["pos_last"]] = cols
        kern = _dense_kernels()
        kern["fwd"](lf["U"], y_last)  # y_H = L_HH^{-1} b_H
        if lf["U"] is not lf["U0"]:  # L_HH was updated densely: z_H = L_HH^{-T} y_H, fed as U0 z_H
            kern["bwd"](lf["U"], y_last)
            y_last = kern["matvec"](lf["U0"], y_last)
        y = np.zeros((n, cols.shape[1]), order="F")
        y[n - m:] = y_last
        with one_blas_thread():
            z = self._f.solve_Lt(y, use_LDLt_decomposition=False)
        x = np.empty_like(z)
        x[lf["q"]] = z
        return x.reshape((n,) + bl.shape[1:])

    def update(self, C, subtract: bool = False) -> "SPDFactor":
        """Replace ``A`` by ``A + C C^T`` (``A - C C^T`` with ``subtract=True``), in place.

        ``C`` is a sparse (n, k) matrix (k small). CHOLMOD does a rank-k update of the existing
        factor; other methods refactor. Returns ``self``.
        """
        sign = -1.0 if subtract else 1.0
        if self.xp is not np:  # cholespy and the CG fallback have no update: refactor
            C = sparse_module(self.xp).csr_matrix(C)
            return self.refactor((self.A + sign * (C @ C.T)).tocsr())
        C = sp.csc_matrix(C, dtype=np.float64)
        A = (self.A + sign * (C @ C.T)).tocsc()
        if self.method == "cholmod" and self._lastfast is not None and self._rows_in_last(C):
            # only L_HH changes: dense rank-1 up/downdates of U = L_HH^T, CHOLMOD's factor kept
            lf = self._lastfast
            n, m = self.shape[0], self.last.size
            Cd = np.asarray(C.tocsr()[lf["q"][n - m:]].toarray())  # rows in trailing order
            U = lf["U"].copy() if lf["U"] is lf["U0"] else lf["U"]
            kern = _dense_kernels()
            for j in range(Cd.shape[1]):
                if not kern["rank1"](U, Cd[:, j].copy(), -1.0 if subtract else 1.0):
                    raise np.linalg.LinAlgError("SPDFactor.update: the downdate makes A indefinite")
            lf["U"] = U
            self.A = A
        elif self.method == "cholmod" and self._f_perm is None and hasattr(self._f, "update_inplace"):
            self._f.update_inplace(C, subtract=subtract)  # scikit-sparse 0.4
            self.A = A
        elif self.method == "cholmod" and self._f_perm is None and hasattr(self._f, "update"):
            try:  # scikit-sparse 0.5's CholeskyFactor.update
                self._f.update(sp.csc_array(C), update=not subtract)
                self.A = A
            except (AttributeError, TypeError):
                self.refactor(A)
        else:  # SuperLU, or the ``last`` layout with rows outside it: refactor (same layout)
            self.refactor(A)
        return self


def factorize_spd(A, method: Optional[str] = None, tol: float = 1e-10, maxiter: Optional[int] = None,
                  ordering: Optional[str] = None, last=None) -> SPDFactor:
    """Factor a sparse symmetric positive-definite matrix once, for many solves.

    Parameters
    ----------
    A : scipy.sparse matrix or cupyx.scipy.sparse matrix, shape (n, n)
        The matrix. Its type picks the backend.
    method : {None, "cholmod", "superlu", "cholespy", "cg"}
        Force a method. ``None`` picks CHOLMOD (else SuperLU) on the CPU and cholespy (else
        Jacobi-preconditioned CG) on the GPU.
    tol : float
        Relative residual tolerance of the iterative GPU fallback.
    maxiter : int, optional
        Iteration cap of the iterative GPU fallback (default ``10 n``).
    ordering : {None, "amd", "metis", "nesdis", "colamd", "best"}, optional
        CHOLMOD fill-reducing ordering (``ordering_method`` of scikit-sparse); ``None`` keeps
        CHOLMOD's default (AMD, and METIS only when AMD fills badly). Other methods ignore it.
    last : int array (m,), optional
        Rows to eliminate last, for right-hand sides that are zero outside them: see
        :meth:`SPDFactor.solve_last`. With CHOLMOD (scikit-sparse 0.4) the other rows are ordered by
        ``ordering`` and the ``last`` rows follow (a denser factor, but half the work per such
        solve); other methods ignore the ordering part.

    Returns
    -------
    SPDFactor

    Raises
    ------
    numpy.linalg.LinAlgError
        If the matrix is not positive definite (CHOLMOD) or singular (SuperLU).
    """
    return SPDFactor(A, method=method, tol=tol, maxiter=maxiter, ordering=ordering, last=last)


def pcg(A, b, precondition, tol: float = 1e-1, maxiter: int = 20, x0=None):
    """Preconditioned conjugate gradients for ``A x = b`` with ``A`` symmetric positive definite.

    Parameters
    ----------
    A : sparse matrix (SciPy or CuPy), shape (n, n)
    b : array (n,)
        Right-hand side, on the same device as ``A``.
    precondition : callable
        ``z = precondition(r)`` approximating ``A^{-1} r``; typically :meth:`SPDFactor.solve` of a
        nearby matrix (a factor reused from an earlier, similar system).
    tol : float
        Stop when ``||b - A x|| <= tol ||b||``.
    maxiter : int
        At most this many iterations (each one product with ``A`` and one preconditioner solve).
    x0 : array (n,), optional
        Start (default zero, which makes every iterate a descent direction for ``x^T A x / 2 - b^T x``).

    Returns
    -------
    x : array (n,)
        The last iterate.
    iterations : int
    converged : bool
        Whether the tolerance was reached.

    References
    ----------
    Hestenes and Stiefel 1952; Saad, "Iterative methods for sparse linear systems", 2nd ed., Alg. 9.1.
    """
    xp = get_array_module(b)
    bn = float(xp.linalg.norm(b))
    if bn == 0.0:
        return xp.zeros_like(b), 0, True
    x = xp.zeros_like(b) if x0 is None else x0.copy()
    r = b - A @ x if x0 is not None else b.copy()
    if float(xp.linalg.norm(r)) <= tol * bn:
        return x, 0, True
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    for k in range(1, int(maxiter) + 1):
        Ap = A @ p
        pAp = float(p @ Ap)
        if not pAp > 0:  # breakdown (A not SPD in floating point): stop with what we have
            return x, k - 1, False
        a = rz / pAp
        x += a * p
        r -= a * Ap
        if float(xp.linalg.norm(r)) <= tol * bn:
            return x, k, True
        z = precondition(r)
        rz_new = float(r @ z)
        p *= rz_new / rz
        p += z
        rz = rz_new
    return x, int(maxiter), False


def _dense_kernels() -> dict:
    """The dense trailing-block kernels of the ``last=`` layout (``geomfit.kernels.dense``)."""
    from .kernels import dense

    return {"fwd": dense.fwd, "bwd": dense.bwd, "matvec": dense.matvec, "rank1": dense.rank1}
