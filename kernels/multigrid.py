"""Numba kernels for screened-Poisson systems ``(diag(D) + L_w) x = b`` on an image grid.

``L_w`` is the weighted 5-point graph Laplacian with horizontal edge weights ``wx`` (H, W-1) and
vertical edge weights ``wy`` (H-1, W). Vectors are (H, W, C) float64 (channels last, C right-hand
sides sharing the matrix). ``dA`` is the matrix diagonal ``D + sum of incident weights`` and
``inv`` its reciprocal (0 where the diagonal is 0).

The multigrid hierarchy aggregates 2x2 pixel blocks with a piecewise-constant prolongation ``P``;
the Galerkin operator ``P^T A P`` of a screened 5-point Laplacian is again a screened 5-point
Laplacian (coarse ``D`` = block sums of ``D``, coarse edge weight = sum of the fine edges that join
the two blocks), so every level uses the same kernels.

CPU kernels are ``@njit(parallel=True)`` over rows; CUDA kernels (one thread per pixel) are
defined on first use (``CUDA``). :data:`AGGREGATION_CPU` and :data:`AGGREGATION_CUDA` give the
aggregation multigrid's kernels one signature on both targets (registered in
:data:`geomfit.backend.KERNELS` as ``"aggregation_mg"``).
"""
from __future__ import annotations

import math
import os
import types

import numpy as np
from numba import njit, prange

from geomfit.backend import LazyCuda, get_array_module

# ----------------------------------------------------------------------------------------------
# per-pixel maths of the aggregation multigrid, written once: inlined into the @njit kernels below
# and compiled as CUDA device functions in _define_cuda (identical arithmetic, identical results)
# ----------------------------------------------------------------------------------------------

def _diag_at(D, wx, wy, i, j):
    """The diagonal of ``diag(D) + L_w`` at pixel (i, j): ``D`` plus the incident edge weights."""
    H, W = D.shape
    s = D[i, j]
    if j > 0:
        s += wx[i, j - 1]
    if j < W - 1:
        s += wx[i, j]
    if i > 0:
        s += wy[i - 1, j]
    if i < H - 1:
        s += wy[i, j]
    return s


def _apply_at(dA, wx, wy, p, i, j, c):
    """``(A p)[i, j, c]`` for the 5-point operator with diagonal ``dA`` and edge weights wx, wy."""
    H, W = dA.shape
    v = dA[i, j] * p[i, j, c]
    if j > 0:
        v -= wx[i, j - 1] * p[i, j - 1, c]
    if j < W - 1:
        v -= wx[i, j] * p[i, j + 1, c]
    if i > 0:
        v -= wy[i - 1, j] * p[i - 1, j, c]
    if i < H - 1:
        v -= wy[i, j] * p[i + 1, j, c]
    return v


def _gauss_seidel_at(inv, wx, wy, x, b, i, j, c, zero_other):
    """The Gauss-Seidel value of ``x[i, j, c]``; neighbours taken as zero with ``zero_other``."""
    H, W = inv.shape
    v = b[i, j, c]
    if not zero_other:
        if j > 0:
            v += wx[i, j - 1] * x[i, j - 1, c]
        if j < W - 1:
            v += wx[i, j] * x[i, j + 1, c]
        if i > 0:
            v += wy[i - 1, j] * x[i - 1, j, c]
        if i < H - 1:
            v += wy[i, j] * x[i + 1, j, c]
    return v * inv[i, j]


def _block_sum_at(r, I, J, c):
    """Sum of ``r[:, :, c]`` over the 2x2 block (2I..2I+1, 2J..2J+1) (clipped at the border)."""
    H, W = r.shape[0], r.shape[1]
    s = 0.0
    for a in range(2):
        i = 2 * I + a
        if i < H:
            for bb in range(2):
                j = 2 * J + bb
                if j < W:
                    s += r[i, j, c]
    return s


def _coarse_d_at(D, I, J):
    """Coarse ``D`` of 2x2 aggregation: the block sum of ``D``."""
    H, W = D.shape
    s = 0.0
    for a in range(2):
        i = 2 * I + a
        if i < H:
            for bb in range(2):
                j = 2 * J + bb
                if j < W:
                    s += D[i, j]
    return s


def _coarse_wx_at(wx, I, J):
    """Coarse horizontal weight between blocks (I, J) and (I, J + 1): the fine edges 2J+1 -> 2J+2."""
    s = 0.0
    for a in range(2):
        i = 2 * I + a
        if i < wx.shape[0]:
            s += wx[i, 2 * J + 1]
    return s


def _coarse_wy_at(wy, I, J):
    """Coarse vertical weight between blocks (I, J) and (I + 1, J): the fine edges 2I+1 -> 2I+2."""
    s = 0.0
    for bb in range(2):
        j = 2 * J + bb
        if j < wy.shape[1]:
            s += wy[2 * I + 1, j]
    return s


_SHARED = (_diag_at, _apply_at, _gauss_seidel_at, _block_sum_at, _coarse_d_at, _coarse_wx_at, _coarse_wy_at)
_diag_c, _apply_c, _gs_c, _block_sum_c, _coarse_d_c, _coarse_wx_c, _coarse_wy_c = (
    njit(inline="always")(f) for f in _SHARED)


# ----------------------------------------------------------------------------------------------
# CPU kernels
# ----------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def diagonal(D, wx, wy, dA, inv):
    H, W = D.shape
    for i in prange(H):
        for j in range(W):
            s = _diag_c(D, wx, wy, i, j)
            dA[i, j] = s
            inv[i, j] = 1.0 / s if s > 0.0 else 0.0


@njit(cache=True, parallel=True)
def matvec_dot(dA, wx, wy, p, q, part):
    """q = A p; part[i, c] = sum_j p[i, j, c] q[i, j, c] (row partial sums of p.q)."""
    H, W, C = p.shape
    for i in prange(H):
        for c in range(C):
            part[i, c] = 0.0
        for j in range(W):
            for c in range(C):
                v = _apply_c(dA, wx, wy, p, i, j, c)
                q[i, j, c] = v
                part[i, c] += v * p[i, j, c]


@njit(cache=True, parallel=True)
def residual(dA, wx, wy, x, b, r, part):
    """r = b - A x; part[i, c] = row partial sums of r.r."""
    H, W, C = x.shape
    for i in prange(H):
        for c in range(C):
            part[i, c] = 0.0
        for j in range(W):
            for c in range(C):
                v = b[i, j, c] - _apply_c(dA, wx, wy, x, i, j, c)
                r[i, j, c] = v
                part[i, c] += v * v


@njit(cache=True, parallel=True)
def rb_sweep(inv, wx, wy, x, b, color, zero_other):
    """One red-black Gauss-Seidel half sweep: update pixels with (i + j) % 2 == color.

    With ``zero_other`` the other colour is taken as zero (first sweep from a zero start)."""
    H, W, C = x.shape
    for i in prange(H):
        j0 = (color + i) % 2
        for j in range(j0, W, 2):
            for c in range(C):
                x[i, j, c] = _gs_c(inv, wx, wy, x, b, i, j, c, zero_other)
            if zero_other and j + 1 < W:
                for c in range(C):
                    x[i, j + 1, c] = 0.0
        if zero_other and j0 == 1:
            for c in range(C):
                x[i, 0, c] = 0.0


@njit(cache=True, parallel=True)
def restrict_sum(r, rc):
    """rc[I, J] = sum of r over the 2x2 block (2I..2I+1, 2J..2J+1)."""
    Hc, Wc, C = rc.shape
    for I in prange(Hc):
        for J in range(Wc):
            for c in range(C):
                rc[I, J, c] = _block_sum_c(r, I, J, c)


@njit(cache=True, parallel=True)
def prolong_add(x, ec):
    H, W, C = x.shape
    for i in prange(H):
        I = i // 2
        for j in range(W):
            J = j // 2
            for c in range(C):
                x[i, j, c] += ec[I, J, c]


@njit(cache=True)
def coarsen(D, wx, wy, Dc, wxc, wyc):
    """Galerkin coarse operator of 2x2 aggregation (piecewise-constant prolongation)."""
    Hc, Wc = Dc.shape
    for I in range(Hc):
        for J in range(Wc):
            Dc[I, J] = _coarse_d_c(D, I, J)
    for I in range(Hc):
        for J in range(Wc - 1):
            wxc[I, J] = _coarse_wx_c(wx, I, J)
    for I in range(Hc - 1):
        for J in range(Wc):
            wyc[I, J] = _coarse_wy_c(wy, I, J)


@njit(cache=True, parallel=True)
def axpy2_dot(x, r, p, q, alpha, part):
    """x += alpha p; r -= alpha q (alpha per channel); part[i, c] = row sums of r.r."""
    H, W, C = x.shape
    for i in prange(H):
        for c in range(C):
            part[i, c] = 0.0
        for j in range(W):
            for c in range(C):
                a = alpha[c]
                x[i, j, c] += a * p[i, j, c]
                v = r[i, j, c] - a * q[i, j, c]
                r[i, j, c] = v
                part[i, c] += v * v


@njit(cache=True, parallel=True)
def dot_rows(a, b, part):
    H, W, C = a.shape
    for i in prange(H):
        for c in range(C):
            part[i, c] = 0.0
        for j in range(W):
            for c in range(C):
                part[i, c] += a[i, j, c] * b[i, j, c]


@njit(cache=True, parallel=True)
def xpby(z, p, beta):
    """p = z + beta p (beta per channel)."""
    H, W, C = p.shape
    for i in prange(H):
        for j in range(W):
            for c in range(C):
                p[i, j, c] = z[i, j, c] + beta[c] * p[i, j, c]


# ----------------------------------------------------------------------------------------------
# CUDA kernels (one thread per pixel); reductions are left to CuPy
# ----------------------------------------------------------------------------------------------

cuda = None  # module global bound to numba.cuda by LazyCuda on first use (not at import: 0.3-0.5 s); kernel
# bodies reach ``cuda.grid`` through it, and the simulator swaps it


def _define_cuda(cu):
    """The CUDA kernels of the aggregation multigrid, one thread per pixel (defined on first use).

    Their per-pixel maths is the CPU kernels' (the shared functions above as device functions).
    """
    diag_at, apply_at, gs_at, block_sum_at, coarse_d_at, coarse_wx_at, coarse_wy_at = (
        cu.jit(device=True)(f) for f in _SHARED)

    @cu.jit
    def cu_diagonal(D, wx, wy, dA, inv):
        i, j = cuda.grid(2)
        if i < D.shape[0] and j < D.shape[1]:
            s = diag_at(D, wx, wy, i, j)
            dA[i, j] = s
            inv[i, j] = 1.0 / s if s > 0.0 else 0.0

    @cu.jit
    def cu_matvec(dA, wx, wy, p, q):
        i, j = cuda.grid(2)
        if i < p.shape[0] and j < p.shape[1]:
            for c in range(p.shape[2]):
                q[i, j, c] = apply_at(dA, wx, wy, p, i, j, c)

    @cu.jit
    def cu_rb_sweep(inv, wx, wy, x, b, color, zero_other):
        i, j = cuda.grid(2)
        if i < x.shape[0] and j < x.shape[1]:
            if (i + j) % 2 == color:
                for c in range(x.shape[2]):
                    x[i, j, c] = gs_at(inv, wx, wy, x, b, i, j, c, zero_other)
            elif zero_other:
                for c in range(x.shape[2]):
                    x[i, j, c] = 0.0

    @cu.jit
    def cu_restrict_sum(r, rc):
        I, J = cuda.grid(2)
        if I < rc.shape[0] and J < rc.shape[1]:
            for c in range(rc.shape[2]):
                rc[I, J, c] = block_sum_at(r, I, J, c)

    @cu.jit
    def cu_prolong_add(x, ec):
        i, j = cuda.grid(2)
        if i < x.shape[0] and j < x.shape[1]:
            for c in range(x.shape[2]):
                x[i, j, c] += ec[i // 2, j // 2, c]

    @cu.jit
    def cu_coarsen(D, wx, wy, Dc, wxc, wyc):
        I, J = cuda.grid(2)
        Hc, Wc = Dc.shape
        if I < Hc and J < Wc:
            Dc[I, J] = coarse_d_at(D, I, J)
            if J < Wc - 1:
                wxc[I, J] = coarse_wx_at(wx, I, J)
            if I < Hc - 1:
                wyc[I, J] = coarse_wy_at(wy, I, J)

    return {"cu_diagonal": cu_diagonal, "cu_matvec": cu_matvec, "cu_rb_sweep": cu_rb_sweep,
            "cu_restrict_sum": cu_restrict_sum, "cu_prolong_add": cu_prolong_add, "cu_coarsen": cu_coarsen}


CUDA = LazyCuda(_define_cuda)


def cu_launch(kernel, shape, *args):
    """Launch ``kernel`` with one thread per (row, column) of ``shape``."""
    tpb = (4, 4) if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1" else (8, 32)
    bpg = (math.ceil(shape[0] / tpb[0]), math.ceil(shape[1] / tpb[1]))
    kernel[bpg, tpb](*args)


# ----------------------------------------------------------------------------------------------
# Operator-dependent ("black box", Dendy 1982) multigrid on the CPU: 9-point coarse stencils
# S[a + 1, b + 1, i, j] = A[(i, j), (i + a, j + b)]; standard coarsening, coarse points (2I, 2J);
# Pw[i, j, ci, cj] = P[(i, j), (i // 2 + ci, j // 2 + cj)].
# ----------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def stencil_from_5pt(dA, wx, wy, S):
    H, W = dA.shape
    for i in prange(H):
        for j in range(W):
            for a in range(3):
                for b in range(3):
                    S[a, b, i, j] = 0.0
            S[1, 1, i, j] = dA[i, j]
            if j > 0:
                S[1, 0, i, j] = -wx[i, j - 1]
            if j < W - 1:
                S[1, 2, i, j] = -wx[i, j]
            if i > 0:
                S[0, 1, i, j] = -wy[i - 1, j]
            if i < H - 1:
                S[2, 1, i, j] = -wy[i, j]


@njit(cache=True, parallel=True)
def interpolation(S, Pw):
    """Dendy's operator-dependent prolongation weights from a 9-point stencil S."""
    H, W = S.shape[2], S.shape[3]
    for i in prange(H):
        for j in range(W):
            for ci in range(2):
                for cj in range(2):
                    Pw[i, j, ci, cj] = 0.0
            ie = i % 2 == 0
            je = j % 2 == 0
            if ie and je:
                Pw[i, j, 0, 0] = 1.0
            elif ie:  # between coarse points (i, j - 1) and (i, j + 1)
                dem = S[1, 1, i, j] + S[0, 1, i, j] + S[2, 1, i, j]
                if dem > 0.0:
                    Pw[i, j, 0, 0] = -(S[0, 0, i, j] + S[1, 0, i, j] + S[2, 0, i, j]) / dem
                    if j + 1 < W:
                        Pw[i, j, 0, 1] = -(S[0, 2, i, j] + S[1, 2, i, j] + S[2, 2, i, j]) / dem
            elif je:  # between coarse points (i - 1, j) and (i + 1, j)
                dem = S[1, 1, i, j] + S[1, 0, i, j] + S[1, 2, i, j]
                if dem > 0.0:
                    Pw[i, j, 0, 0] = -(S[0, 0, i, j] + S[0, 1, i, j] + S[0, 2, i, j]) / dem
                    if i + 1 < H:
                        Pw[i, j, 1, 0] = -(S[2, 0, i, j] + S[2, 1, i, j] + S[2, 2, i, j]) / dem
    for i in prange(H):
        if i % 2 == 1:
            for j in range(1, W, 2):
                d = S[1, 1, i, j]
                if d <= 0.0:
                    continue
                for ci in range(2):
                    si = 2 * ci - 1  # -1 (up) or +1 (down)
                    if i + si >= H:
                        continue
                    for cj in range(2):
                        sj = 2 * cj - 1
                        if j + sj >= W:
                            continue
                        v = -S[1 + si, 1 + sj, i, j]
                        v -= S[1 + si, 1, i, j] * Pw[i + si, j, 0, cj]  # (even, odd) neighbour
                        v -= S[1, 1 + sj, i, j] * Pw[i, j + sj, ci, 0]  # (odd, even) neighbour
                        Pw[i, j, ci, cj] = v / d


@njit(cache=True, parallel=True)
def galerkin(S, Pw, Sc):
    """Sc = P^T A P (9-point coarse stencil)."""
    H, W = S.shape[2], S.shape[3]
    Hc, Wc = Sc.shape[2], Sc.shape[3]
    for I in prange(Hc):
        for J in range(Wc):
            for a in range(3):
                for b in range(3):
                    Sc[a, b, I, J] = 0.0
            for da in range(-1, 2):
                ki = 2 * I + da
                if ki < 0 or ki >= H:
                    continue
                ci = I - ki // 2
                if ci < 0 or ci > 1:
                    continue
                for db in range(-1, 2):
                    kj = 2 * J + db
                    if kj < 0 or kj >= W:
                        continue
                    cj = J - kj // 2
                    if cj < 0 or cj > 1:
                        continue
                    pk = Pw[ki, kj, ci, cj]
                    if pk == 0.0:
                        continue
                    for a in range(-1, 2):
                        li = ki + a
                        if li < 0 or li >= H:
                            continue
                        for b in range(-1, 2):
                            lj = kj + b
                            if lj < 0 or lj >= W:
                                continue
                            akl = S[a + 1, b + 1, ki, kj]
                            if akl == 0.0:
                                continue
                            f = pk * akl
                            for ci2 in range(2):
                                for cj2 in range(2):
                                    pl = Pw[li, lj, ci2, cj2]
                                    if pl == 0.0:
                                        continue
                                    dI = li // 2 + ci2 - I
                                    dJ = lj // 2 + cj2 - J
                                    if -1 <= dI <= 1 and -1 <= dJ <= 1:
                                        Sc[dI + 1, dJ + 1, I, J] += f * pl


@njit(cache=True, parallel=True)
def residual9(S, x, b, r):
    H, W, C = x.shape
    for i in prange(H):
        for j in range(W):
            for c in range(C):
                v = b[i, j, c]
                for a in range(-1, 2):
                    ii = i + a
                    if ii < 0 or ii >= H:
                        continue
                    for bb in range(-1, 2):
                        jj = j + bb
                        if jj < 0 or jj >= W:
                            continue
                        v -= S[a + 1, bb + 1, i, j] * x[ii, jj, c]
                r[i, j, c] = v


@njit(cache=True, parallel=True)
def restrict_p(Pw, r, rc):
    """rc = P^T r."""
    H, W, C = r.shape
    Hc, Wc = rc.shape[0], rc.shape[1]
    for I in prange(Hc):
        for J in range(Wc):
            for c in range(C):
                rc[I, J, c] = 0.0
            for da in range(-1, 2):
                ki = 2 * I + da
                if ki < 0 or ki >= H:
                    continue
                ci = I - ki // 2
                if ci < 0 or ci > 1:
                    continue
                for db in range(-1, 2):
                    kj = 2 * J + db
                    if kj < 0 or kj >= W:
                        continue
                    cj = J - kj // 2
                    if cj < 0 or cj > 1:
                        continue
                    p = Pw[ki, kj, ci, cj]
                    if p != 0.0:
                        for c in range(C):
                            rc[I, J, c] += p * r[ki, kj, c]


@njit(cache=True, parallel=True)
def prolong_p(Pw, x, ec):
    """x += P ec."""
    H, W, C = x.shape
    Hc, Wc = ec.shape[0], ec.shape[1]
    for i in prange(H):
        for j in range(W):
            for ci in range(2):
                I = i // 2 + ci
                if I >= Hc:
                    continue
                for cj in range(2):
                    J = j // 2 + cj
                    if J >= Wc:
                        continue
                    p = Pw[i, j, ci, cj]
                    if p != 0.0:
                        for c in range(C):
                            x[i, j, c] += p * ec[I, J, c]


# ----------------------------------------------------------------------------------------------
# serial twins: small grids (coarse levels) run single-threaded, since a parallel region costs
# more to start than the work on a few thousand pixels (and much more on a loaded machine)
# ----------------------------------------------------------------------------------------------

PARALLEL_MIN_PIXELS = 1 << 16


def _serial_twin(kernel):
    """Single-threaded twin of the ``parallel=True`` kernel ``kernel`` (``prange`` runs as ``range``).

    Compiled from a copy of the Python function under its own name (``<name>_serial``): a twin of
    the same function object would share the parallel kernel's on-disk cache entry (Numba keys the
    cache by qualified name, line and signature, not by the parallel flag), and whichever was
    compiled last would be loaded for both, silently making the parallel kernels single-threaded.
    """
    f = kernel.py_func
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"
    g.__module__ = f.__module__
    return njit(cache=True)(g)


_PAR = {}
_SER = {}
for _name in ("diagonal", "matvec_dot", "residual", "rb_sweep", "restrict_sum", "prolong_add", "axpy2_dot",
              "dot_rows", "xpby", "stencil_from_5pt", "interpolation", "galerkin", "residual9",
              "restrict_p", "prolong_p"):
    _PAR[_name] = globals()[_name]
    _SER[_name] = _serial_twin(globals()[_name])
_SER["coarsen"] = _PAR["coarsen"] = coarsen


def kernel(name, npix):
    """The compiled kernel ``name``: the multithreaded one for grids of at least
    ``PARALLEL_MIN_PIXELS`` pixels, else its single-threaded twin."""
    return _PAR[name] if npix >= PARALLEL_MIN_PIXELS else _SER[name]


@njit(cache=True)
def dense_cholesky(A):
    """In-place lower Cholesky factor of a small dense symmetric positive semi-definite matrix.

    A pivot below 1e-13 times the largest diagonal entry zeroes its column (the row/column of a
    zero row of the grid operator): the matching unknown is solved as 0."""
    n = A.shape[0]
    dmax = 0.0
    for i in range(n):
        dmax = max(dmax, A[i, i])
    tiny = 1e-13 * dmax
    for j in range(n):
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        if s <= tiny:
            for i in range(j, n):
                A[i, j] = 0.0
            continue
        d = math.sqrt(s)
        A[j, j] = d
        for i in range(j + 1, n):
            v = A[i, j]
            for k in range(j):
                v -= A[i, k] * A[j, k]
            A[i, j] = v / d
    for i in range(n):
        for j in range(i + 1, n):
            A[i, j] = 0.0


@njit(cache=True)
def dense_cho_solve(L, b, x):
    """x = A^+ b for the factor of :func:`dense_cholesky` (b, x of shape (n, C))."""
    n, C = b.shape
    for c in range(C):
        for i in range(n):
            v = b[i, c]
            for k in range(i):
                v -= L[i, k] * x[k, c]
            x[i, c] = v / L[i, i] if L[i, i] > 0.0 else 0.0
        for i in range(n - 1, -1, -1):
            v = x[i, c]
            for k in range(i + 1, n):
                v -= L[k, i] * x[k, c]
            x[i, c] = v / L[i, i] if L[i, i] > 0.0 else 0.0


# ----------------------------------------------------------------------------------------------
# Line relaxation with pre-factored tridiagonal lines: the LU factors of every row and column line
# (cp = super-diagonal / pivot, inv = 1 / pivot) depend only on the matrix, so they are computed
# once per level and each sweep only runs the two substitutions, writing straight into x.
# ----------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def line_factors5(dA, wx, wy, rcp, rinv, ccp, cinv):
    H, W = dA.shape
    for i in prange(H):  # rows: sub/super diagonals -wx
        cprev = 0.0
        for j in range(W):
            m = dA[i, j]
            if j > 0:
                m += wx[i, j - 1] * cprev  # m = d - lo * cp with lo = -wx
            iv = 1.0 / m if m > 0.0 else 0.0
            c = -wx[i, j] * iv if j < W - 1 else 0.0
            rinv[i, j] = iv
            rcp[i, j] = c
            cprev = c
    for j in prange(W):  # columns: sub/super diagonals -wy
        cprev = 0.0
        for i in range(H):
            m = dA[i, j]
            if i > 0:
                m += wy[i - 1, j] * cprev
            iv = 1.0 / m if m > 0.0 else 0.0
            c = -wy[i, j] * iv if i < H - 1 else 0.0
            cinv[i, j] = iv
            ccp[i, j] = c
            cprev = c


@njit(cache=True, parallel=True)
def line_factors9(S, rcp, rinv, ccp, cinv):
    H, W = S.shape[2], S.shape[3]
    for i in prange(H):
        cprev = 0.0
        for j in range(W):
            m = S[1, 1, i, j]
            if j > 0:
                m -= S[1, 0, i, j] * cprev
            iv = 1.0 / m if m > 0.0 else 0.0
            c = S[1, 2, i, j] * iv if j < W - 1 else 0.0
            rinv[i, j] = iv
            rcp[i, j] = c
            cprev = c
    for j in prange(W):
        cprev = 0.0
        for i in range(H):
            m = S[1, 1, i, j]
            if i > 0:
                m -= S[0, 1, i, j] * cprev
            iv = 1.0 / m if m > 0.0 else 0.0
            c = S[2, 1, i, j] * iv if i < H - 1 else 0.0
            cinv[i, j] = iv
            ccp[i, j] = c
            cprev = c


@njit(cache=True, parallel=True)
def rows5_f(dA, wx, wy, rcp, rinv, x, b, parity):
    """Zebra line GS along rows i % 2 == parity, 5-point operator, pre-factored lines."""
    H, W, C = x.shape
    n = (H - parity + 1) // 2
    for t in prange(n):
        i = parity + 2 * t
        for j in range(W):
            iv = rinv[i, j]
            for c in range(C):
                v = b[i, j, c]
                if i > 0:
                    v += wy[i - 1, j] * x[i - 1, j, c]
                if i < H - 1:
                    v += wy[i, j] * x[i + 1, j, c]
                if j > 0:
                    v += wx[i, j - 1] * x[i, j - 1, c]
                x[i, j, c] = v * iv
        for j in range(W - 2, -1, -1):
            cp = rcp[i, j]
            for c in range(C):
                x[i, j, c] -= cp * x[i, j + 1, c]


@njit(cache=True, parallel=True)
def cols5_f(dA, wx, wy, ccp, cinv, x, b, parity, nblk):
    """Zebra line GS along columns j % 2 == parity, 5-point operator, pre-factored lines."""
    H, W, C = x.shape
    ncol = (W - parity + 1) // 2
    nblk = max(1, min(nblk, ncol))
    bw = (ncol + nblk - 1) // nblk  # columns per block: blocks are eliminated row by row
    for blk in prange(nblk):
        j0 = parity + 2 * blk * bw
        j1 = min(W, j0 + 2 * bw)
        for i in range(H):
            for j in range(j0, j1, 2):
                iv = cinv[i, j]
                for c in range(C):
                    v = b[i, j, c]
                    if j > 0:
                        v += wx[i, j - 1] * x[i, j - 1, c]
                    if j < W - 1:
                        v += wx[i, j] * x[i, j + 1, c]
                    if i > 0:
                        v += wy[i - 1, j] * x[i - 1, j, c]
                    x[i, j, c] = v * iv
        for i in range(H - 2, -1, -1):
            for j in range(j0, j1, 2):
                cp = ccp[i, j]
                for c in range(C):
                    x[i, j, c] -= cp * x[i + 1, j, c]


@njit(cache=True, parallel=True)
def rows9_f(S, rcp, rinv, x, b, parity):
    """Zebra line GS along rows, 9-point operator, pre-factored lines."""
    H, W, C = x.shape
    n = (H - parity + 1) // 2
    for t in prange(n):
        i = parity + 2 * t
        for j in range(W):
            iv = rinv[i, j]
            for c in range(C):
                v = b[i, j, c]
                for a in (-1, 1):
                    ii = i + a
                    if ii < 0 or ii >= H:
                        continue
                    for bb in range(-1, 2):
                        jj = j + bb
                        if 0 <= jj < W:
                            v -= S[a + 1, bb + 1, i, j] * x[ii, jj, c]
                if j > 0:
                    v -= S[1, 0, i, j] * x[i, j - 1, c]
                x[i, j, c] = v * iv
        for j in range(W - 2, -1, -1):
            cp = rcp[i, j]
            for c in range(C):
                x[i, j, c] -= cp * x[i, j + 1, c]


@njit(cache=True, parallel=True)
def cols9_f(S, ccp, cinv, x, b, parity, nblk):
    """Zebra line GS along columns, 9-point operator, pre-factored lines."""
    H, W, C = x.shape
    ncol = (W - parity + 1) // 2
    nblk = max(1, min(nblk, ncol))
    bw = (ncol + nblk - 1) // nblk  # columns per block: blocks are eliminated row by row
    for blk in prange(nblk):
        j0 = parity + 2 * blk * bw
        j1 = min(W, j0 + 2 * bw)
        for i in range(H):
            for j in range(j0, j1, 2):
                iv = cinv[i, j]
                for c in range(C):
                    v = b[i, j, c]
                    for bb in (-1, 1):
                        jj = j + bb
                        if jj < 0 or jj >= W:
                            continue
                        for a in range(-1, 2):
                            ii = i + a
                            if 0 <= ii < H:
                                v -= S[a + 1, bb + 1, i, j] * x[ii, jj, c]
                    if i > 0:
                        v -= S[0, 1, i, j] * x[i - 1, j, c]
                    x[i, j, c] = v * iv
        for i in range(H - 2, -1, -1):
            for j in range(j0, j1, 2):
                cp = ccp[i, j]
                for c in range(C):
                    x[i, j, c] -= cp * x[i + 1, j, c]


for _name in ("line_factors5", "line_factors9", "rows5_f", "cols5_f", "rows9_f", "cols9_f", "dense_cholesky",
              "dense_cho_solve"):
    _PAR[_name] = globals()[_name]
    _SER[_name] = _serial_twin(globals()[_name]) if _name.startswith(("line", "rows", "cols")) \
        else globals()[_name]


def column_blocks(npix):
    """Number of column blocks for the column line sweeps: one per thread on large grids."""
    if npix < PARALLEL_MIN_PIXELS:
        return 1
    import numba

    return max(1, int(numba.get_num_threads()))


@njit(cache=True, parallel=True)
def dot2_rows(z, r, q, part_rz, part_qz):
    """Row partial sums of r.z and q.z (flexible CG)."""
    H, W, C = z.shape
    for i in prange(H):
        for c in range(C):
            part_rz[i, c] = 0.0
            part_qz[i, c] = 0.0
        for j in range(W):
            for c in range(C):
                part_rz[i, c] += r[i, j, c] * z[i, j, c]
                part_qz[i, c] += q[i, j, c] * z[i, j, c]


_PAR["dot2_rows"] = dot2_rows
_SER["dot2_rows"] = _serial_twin(dot2_rows)


@njit(cache=True, parallel=True)
def interpolation5(dA, wx, wy, Pw):
    """:func:`interpolation` for the 5-point finest level, straight from (dA, wx, wy)."""
    H, W = dA.shape
    for i in prange(H):
        for j in range(W):
            for ci in range(2):
                for cj in range(2):
                    Pw[i, j, ci, cj] = 0.0
            ie = i % 2 == 0
            je = j % 2 == 0
            if ie and je:
                Pw[i, j, 0, 0] = 1.0
            elif ie:
                dem = dA[i, j]
                if i > 0:
                    dem -= wy[i - 1, j]
                if i < H - 1:
                    dem -= wy[i, j]
                if dem > 0.0:
                    Pw[i, j, 0, 0] = wx[i, j - 1] / dem
                    if j + 1 < W:
                        Pw[i, j, 0, 1] = wx[i, j] / dem
            elif je:
                dem = dA[i, j]
                if j > 0:
                    dem -= wx[i, j - 1]
                if j < W - 1:
                    dem -= wx[i, j]
                if dem > 0.0:
                    Pw[i, j, 0, 0] = wy[i - 1, j] / dem
                    if i + 1 < H:
                        Pw[i, j, 1, 0] = wy[i, j] / dem
    for i in prange(H):
        if i % 2 == 1:
            for j in range(1, W, 2):
                d = dA[i, j]
                if d <= 0.0:
                    continue
                for ci in range(2):
                    si = 2 * ci - 1
                    if i + si >= H:
                        continue
                    wv = wy[i - 1, j] if si < 0 else wy[i, j]
                    for cj in range(2):
                        sj = 2 * cj - 1
                        if j + sj >= W:
                            continue
                        wh = wx[i, j - 1] if sj < 0 else wx[i, j]
                        Pw[i, j, ci, cj] = (wv * Pw[i + si, j, 0, cj] + wh * Pw[i, j + sj, ci, 0]) / d


@njit(cache=True, parallel=True)
def galerkin5(dA, wx, wy, Pw, Sc):
    """:func:`galerkin` for the 5-point finest level, straight from (dA, wx, wy)."""
    H, W = dA.shape
    Hc, Wc = Sc.shape[2], Sc.shape[3]
    for I in prange(Hc):
        for J in range(Wc):
            for a in range(3):
                for b in range(3):
                    Sc[a, b, I, J] = 0.0
            for da in range(-1, 2):
                ki = 2 * I + da
                if ki < 0 or ki >= H:
                    continue
                ci = I - ki // 2
                if ci < 0 or ci > 1:
                    continue
                for db in range(-1, 2):
                    kj = 2 * J + db
                    if kj < 0 or kj >= W:
                        continue
                    cj = J - kj // 2
                    if cj < 0 or cj > 1:
                        continue
                    pk = Pw[ki, kj, ci, cj]
                    if pk == 0.0:
                        continue
                    for n in range(5):
                        if n == 0:
                            li, lj, akl = ki, kj, dA[ki, kj]
                        elif n == 1:
                            if kj == 0:
                                continue
                            li, lj, akl = ki, kj - 1, -wx[ki, kj - 1]
                        elif n == 2:
                            if kj == W - 1:
                                continue
                            li, lj, akl = ki, kj + 1, -wx[ki, kj]
                        elif n == 3:
                            if ki == 0:
                                continue
                            li, lj, akl = ki - 1, kj, -wy[ki - 1, kj]
                        else:
                            if ki == H - 1:
                                continue
                            li, lj, akl = ki + 1, kj, -wy[ki, kj]
                        f = pk * akl
                        bi = li // 2 - I
                        bj = lj // 2 - J
                        for ci2 in range(2):
                            dI = bi + ci2
                            if dI < -1 or dI > 1:
                                continue
                            for cj2 in range(2):
                                dJ = bj + cj2
                                if dJ < -1 or dJ > 1:
                                    continue
                                pl = Pw[li, lj, ci2, cj2]
                                if pl != 0.0:
                                    Sc[dI + 1, dJ + 1, I, J] += f * pl


for _name in ("interpolation5", "galerkin5"):
    _PAR[_name] = globals()[_name]
    _SER[_name] = _serial_twin(globals()[_name])


@njit(cache=True, parallel=True)
def residual5_z(dA, wx, wy, x, b, r, zero_parity):
    """r = b - A x (5-point) on the columns j % 2 != zero_parity; r = 0 on the others, where a
    zebra line sweep along those columns has just made the residual exactly zero."""
    H, W, C = x.shape
    for i in prange(H):
        for j in range(W):
            if j % 2 == zero_parity:
                for c in range(C):
                    r[i, j, c] = 0.0
                continue
            for c in range(C):
                v = dA[i, j] * x[i, j, c]
                if j > 0:
                    v -= wx[i, j - 1] * x[i, j - 1, c]
                if j < W - 1:
                    v -= wx[i, j] * x[i, j + 1, c]
                if i > 0:
                    v -= wy[i - 1, j] * x[i - 1, j, c]
                if i < H - 1:
                    v -= wy[i, j] * x[i + 1, j, c]
                r[i, j, c] = b[i, j, c] - v


@njit(cache=True, parallel=True)
def residual9_z(S, x, b, r, zero_parity):
    """:func:`residual9` with r = 0 on the columns j % 2 == zero_parity (see :func:`residual5_z`)."""
    H, W, C = x.shape
    for i in prange(H):
        for j in range(W):
            if j % 2 == zero_parity:
                for c in range(C):
                    r[i, j, c] = 0.0
                continue
            for c in range(C):
                v = b[i, j, c]
                for a in range(-1, 2):
                    ii = i + a
                    if ii < 0 or ii >= H:
                        continue
                    for bb in range(-1, 2):
                        jj = j + bb
                        if jj < 0 or jj >= W:
                            continue
                        v -= S[a + 1, bb + 1, i, j] * x[ii, jj, c]
                r[i, j, c] = v


for _name in ("residual5_z", "residual9_z"):
    _PAR[_name] = globals()[_name]
    _SER[_name] = _serial_twin(globals()[_name])


# ----------------------------------------------------------------------------------------------
# the aggregation multigrid's kernels with one signature on both targets
# ----------------------------------------------------------------------------------------------

def _part(x):
    return np.empty((x.shape[0], x.shape[2]))


#: CPU: the multithreaded kernels on large grids, their serial twins on small ones.
AGGREGATION_CPU = types.SimpleNamespace(
    diagonal=lambda D, wx, wy, dA, inv: kernel("diagonal", D.size)(D, wx, wy, dA, inv),
    coarsen=lambda D, wx, wy, Dc, wxc, wyc: kernel("coarsen", D.size)(D, wx, wy, Dc, wxc, wyc),
    matvec=lambda dA, wx, wy, p, q: kernel("matvec_dot", dA.size)(dA, wx, wy, p, q, _part(p)),
    residual=lambda dA, wx, wy, x, b, r: kernel("residual", dA.size)(dA, wx, wy, x, b, r, _part(x)),
    rb_sweep=lambda inv, wx, wy, x, b, color, zero: kernel("rb_sweep", inv.size)(inv, wx, wy, x, b, color, zero),
    restrict_sum=lambda r, rc: kernel("restrict_sum", r.shape[0] * r.shape[1])(r, rc),
    prolong_add=lambda x, ec: kernel("prolong_add", x.shape[0] * x.shape[1])(x, ec),
    coarse_setup=lambda L, xp: L,
    coarse_solve=lambda L, b, x: dense_cho_solve(L, b, x),
)


def _cuda_residual(dA, wx, wy, x, b, r):
    cu_launch(CUDA.cu_matvec, dA.shape, dA, wx, wy, x, r)
    get_array_module(r).subtract(b, r, out=r)


def _cuda_coarse_setup(L, xp):
    """The GPU applies an explicit inverse of the coarsest matrix (one matrix product)."""
    n = L.shape[0]
    Ainv = np.empty((n, n))
    dense_cho_solve(L, np.eye(n), Ainv)
    return xp.asarray(Ainv)


def _cuda_coarse_solve(Ainv, b, x):
    x[...] = Ainv @ b


#: CUDA: one thread per pixel (NumPy arguments are copied to the device by Numba).
AGGREGATION_CUDA = types.SimpleNamespace(
    diagonal=lambda D, wx, wy, dA, inv: cu_launch(CUDA.cu_diagonal, D.shape, D, wx, wy, dA, inv),
    coarsen=lambda D, wx, wy, Dc, wxc, wyc: cu_launch(CUDA.cu_coarsen, Dc.shape, D, wx, wy, Dc, wxc, wyc),
    matvec=lambda dA, wx, wy, p, q: cu_launch(CUDA.cu_matvec, dA.shape, dA, wx, wy, p, q),
    residual=_cuda_residual,
    rb_sweep=lambda inv, wx, wy, x, b, color, zero: cu_launch(CUDA.cu_rb_sweep, inv.shape, inv, wx, wy, x, b,
                                                              color, zero),
    restrict_sum=lambda r, rc: cu_launch(CUDA.cu_restrict_sum, rc.shape[:2], r, rc),
    prolong_add=lambda x, ec: cu_launch(CUDA.cu_prolong_add, x.shape[:2], x, ec),
    coarse_setup=_cuda_coarse_setup,
    coarse_solve=_cuda_coarse_solve,
)
