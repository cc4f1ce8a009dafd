"""Small dense triangular kernels on the trailing block of a sparse Cholesky factor (Numba CPU).

Private loops behind :meth:`geomfit.backend.SPDFactor.solve_last` and the dense up/downdates of
:meth:`geomfit.backend.SPDFactor.update` in the ``last=`` layout. ``U = L_HH^T`` is the upper
triangular transpose of the trailing ``m x m`` block of ``L`` (C order, rows contiguous); ``y`` holds
``k`` right-hand sides as columns (``m x k``).

Plain loops rather than BLAS: a threaded ``trsm`` of this size (m = 1000) took 8 ms with two
OpenBLAS threads on a busy machine against 0.3 ms on one core.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["fwd", "bwd", "matvec", "rank1"]


@njit(cache=True, nogil=True)
def fwd(U, y):
    """``y <- U^{-T} y`` in place (forward substitution with ``L = U^T``)."""
    m, k = y.shape
    for i in range(m):
        for c in range(k):
            y[i, c] /= U[i, i]
        for j in range(i + 1, m):
            u = U[i, j]
            for c in range(k):
                y[j, c] -= u * y[i, c]


@njit(cache=True, nogil=True)
def bwd(U, y):
    """``y <- U^{-1} y`` in place (back substitution)."""
    m, k = y.shape
    for i in range(m - 1, -1, -1):
        for c in range(k):
            acc = y[i, c]
            for j in range(i + 1, m):
                acc -= U[i, j] * y[j, c]
            y[i, c] = acc / U[i, i]


@njit(cache=True, nogil=True)
def matvec(U, y, trans=False):
    """``U y`` (``trans``: ``U^T y``) for upper triangular ``U``."""
    m, k = y.shape
    out = np.zeros((m, k))
    for i in range(m):
        for j in range(i, m):
            u = U[i, j]
            if trans:
                for c in range(k):
                    out[j, c] += u * y[i, c]
            else:
                for c in range(k):
                    out[i, c] += u * y[j, c]
    return out


@njit(cache=True, nogil=True)
def rank1(U, x, sign):
    """``U^T U + sign x x^T = U'^T U'`` in place (``x`` is overwritten); False when a downdate
    (``sign = -1``) loses positive definiteness. Givens-style rank-1 Cholesky update
    (Golub and Van Loan, Matrix Computations, 4th ed., Sec. 6.5.4)."""
    m = x.shape[0]
    for i in range(m):
        d = U[i, i]
        r2 = d * d + sign * x[i] * x[i]
        if not r2 > 0.0:
            return False
        r = np.sqrt(r2)
        c = r / d
        s = x[i] / d
        U[i, i] = r
        for j in range(i + 1, m):
            U[i, j] = (U[i, j] + sign * s * x[j]) / c
            x[j] = c * x[j] - s * U[i, j]
    return True
