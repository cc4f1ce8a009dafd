"""The one place where geomfit chooses between CPU and GPU.

Every solver takes arrays and calls :func:`get_array_module` on them: NumPy arrays run on the CPU
(NumPy/SciPy, Numba ``@njit`` kernels, CHOLMOD), CuPy arrays run on the GPU (CuPy, Numba CUDA
kernels).  Nothing else in geomfit branches on the backend; solvers written as ``xp = get_array_module(x)``
followed by array code serve both.

Sparse symmetric positive-definite systems go through :func:`factorize_spd`, which returns a
factor-once / solve-many object:

* CPU: CHOLMOD through scikit-sparse (both the 0.4 ``cholesky``/``Factor`` API and 0.5's
  ``CholeskyFactor``), falling back to SciPy's SuperLU when scikit-sparse is not installed.
* GPU: ``cholespy`` when installed, else Jacobi-preconditioned conjugate gradients on the device
  (warm-started from the previous solution).
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any, Optional

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


def cudasim_enabled() -> bool:
    """True when Numba's CUDA simulator is on (kernels run on the CPU, slowly)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


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


def has_cholmod() -> bool:
    """True when scikit-sparse's CHOLMOD wrapper is importable."""
    return _cholmod() is not None


class SPDFactor:
    """A factorisation of a sparse symmetric positive-definite matrix ``A``.

    Use :func:`factorize_spd` to build one. ``solve(b)`` accepts ``b`` of shape (n,) or (n, k) on the
    same device as ``A`` and returns an array of the same shape. ``update(C, subtract=False)``
    replaces ``A`` by ``A + C C^T`` (or ``A - C C^T``) cheaply where the backend supports it
    (CHOLMOD's rank-k update), and refactors otherwise.

    Attributes
    ----------
    method : str
        ``"cholmod"``, ``"superlu"``, ``"cholespy"`` or ``"cg"``.
    shape : tuple of int
    """

    def __init__(self, A, method: Optional[str] = None, tol: float = 1e-10, maxiter: Optional[int] = None):
        xp = get_array_module(A)
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
            if method == "cholmod":
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
                self._f = chol.cholesky(A, mode="supernodal")
        except Exception as e:  # CholmodNotPositiveDefiniteError and friends
            raise np.linalg.LinAlgError(f"factorize_spd: CHOLMOD failed, matrix is not SPD ({e})") from e

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
        xp = self.xp
        if get_array_module(b) is not xp:
            raise TypeError("SPDFactor.solve: right-hand side is on a different device than the matrix")
        if b.shape[0] != self.shape[0]:
            raise ValueError(f"SPDFactor.solve: right-hand side has {b.shape[0]} rows, matrix has {self.shape[0]}")
        b = b.astype(xp.float64, copy=False)
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
            if self.method == "cholmod" and hasattr(self._f, "cholesky_inplace"):
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

    def update(self, C, subtract: bool = False) -> "SPDFactor":
        """Replace ``A`` by ``A + C C^T`` (``A - C C^T`` with ``subtract=True``), in place.

        ``C`` is a sparse (n, k) matrix (k small). CHOLMOD does a rank-k update of the existing
        factor; other methods refactor. Returns ``self``.
        """
        sign = -1.0 if subtract else 1.0
        if self.xp is np:
            C = sp.csc_matrix(C, dtype=np.float64)
            self.A = (self.A + sign * (C @ C.T)).tocsc()
            if self.method == "cholmod" and hasattr(self._f, "update_inplace"):  # scikit-sparse 0.4
                self._f.update_inplace(C, subtract=subtract)
            elif self.method == "cholmod":
                try:  # scikit-sparse 0.5's CholeskyFactor.update
                    self._f.update(sp.csc_array(C), update=not subtract)
                except (AttributeError, TypeError):
                    self._factor_cholmod(self.A)
            else:
                self._factor_superlu(self.A)
        else:
            sparse = sparse_module(self.xp)
            C = sparse.csr_matrix(C)
            self.A = (self.A + sign * (C @ C.T)).tocsr()
            if self.method == "cholespy":
                self._factor_cholespy(self.A)
            else:
                self._inv_diag = 1.0 / self.A.diagonal()
        return self


def factorize_spd(A, method: Optional[str] = None, tol: float = 1e-10, maxiter: Optional[int] = None) -> SPDFactor:
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

    Returns
    -------
    SPDFactor

    Raises
    ------
    numpy.linalg.LinAlgError
        If the matrix is not positive definite (CHOLMOD) or singular (SuperLU).
    """
    return SPDFactor(A, method=method, tol=tol, maxiter=maxiter)


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
