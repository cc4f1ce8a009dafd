"""Numba kernels of the coarse landmark fit (Wang et al. 2020, Eq. 1): one image per loop iteration.

Private compiled loops behind :func:`geomfit.fitting.fit_landmarks` (which validates input and
prepares the model tables). The kernel runs the whole fit of one image (initialisation,
Levenberg-Marquardt, final residual) in registers and small scratch arrays, the same algorithm
as the vectorised NumPy/CuPy path of :mod:`geomfit.fitting` (the reference it is tested
against). :func:`fit_batch` runs a batch (or a chunk of one) with the GIL released, so that the
wrapper can run chunks of a large batch on several threads (no ``prange``: the parallel
compilation took another half of the serial kernel's compile time, for the same speed).
:data:`CUDA` / :func:`fit_batch_cuda`: the same algorithm as a Numba CUDA kernel, one GPU
thread per image (tested under ``NUMBA_ENABLE_CUDASIM=1`` against the CPU kernel).

Written once: the per-image fit :func:`_fit_item` and what it calls in common (:func:`_lm`,
:func:`_affine_pose`, :func:`_evaluate`, :func:`_slot_shape`, :func:`_rodrigues_left`,
:func:`_absmax`; the tuple ``_SHARED``) are plain ``@njit`` functions on one image's arrays. The
CUDA kernel compiles the same Python source again as device functions (``_define_cuda``: a copy of
each function whose global names resolve to the device twins) and calls it on per-image views of
batch arrays whose image index is last. Only the linear algebra differs by target, behind the
same names and signatures: :func:`_normal_equations` (CPU: packed Gram tables; GPU: full
``J^T J``), :func:`_solve_damped` and :func:`_shape_step` (CPU: LAPACK Cholesky with a pivoted LU
fallback; GPU: in-kernel Cholesky, NaN step where not positive definite), and
:func:`_nearest_rows_svd` (the rank-deficient camera: SVD on the CPU, no camera on the GPU).

Reference: P. Wang, C. Lin, B. Xu, W. Che, Q. Wang, "Low-frequency guided self-supervised learning for
high-fidelity 3D face reconstruction in the wild", ICME 2020, Sec. 3.1, Eq. (1).

Layout of the model tables (``s`` = slots: fixed landmark vertices, then the right and the left
contour candidates; ``P`` = identity + expression coefficients):

- ``mean`` (S, 3), ``C`` (S, 3, P): mean and basis rows of every slot;
- ``G`` (3, 3, P, P): ``G[i, j] = sum_k C[k, i]^T C[k, j]`` over the fixed slots, so that the
  shape block of ``J^T J`` for the fixed landmarks is ``s^2 sum_ij (I - r3 r3^T)_ij G[i, j]``.
  The CPU kernel takes them as ``Gp`` (6, P (P + 1) / 2): packed upper triangles (row-major) of
  ``G_00, G_11, G_22, G_01 + G_10, G_02 + G_20, G_12 + G_21``; the CUDA kernel takes ``G``.

Per image, landmarks ``L`` (M, 2) are in the normalised, y-up frame of the wrapper, in residual
order (fixed, right jaw, left jaw); ``w`` (M,) their weights (0 = unused).
"""
from __future__ import annotations

import math
import types

import numpy as np
from numba import njit

from geomfit.camera import _rodrigues_coefficients
from geomfit.backend import LazyCuda, cuda_result, cuda_view, get_array_module

__all__ = ["fit_batch", "fit_one", "fit_batch_cuda", "CUDA"]

_rodrigues_ab = njit(cache=True)(_rodrigues_coefficients)  # the one Rodrigues formula, compiled for the CPU
_FM = {"reassoc", "contract"}  # vectorised reductions; NaN/inf semantics kept (isfinite tests work)
_TINY = 1e-26


@njit(cache=True, fastmath=_FM)
def _slot_shape(mean, C, coef, V):
    S, _, P = C.shape
    for k in range(S):
        for i in range(3):
            acc = 0.0
            for p in range(P):
                acc += C[k, i, p] * coef[p]
            V[k, i] = mean[k, i] + acc


@njit(cache=True, fastmath=_FM)
def _evaluate(mean, C, Mf, Mr, Ml, nr, nl, L, w, R, s, t, coef, reg, V, U, sel, r, Us):
    """Cost; fills residuals r (M, 2), chosen slots sel (M,), rotated chosen vertices Us (M, 3)."""
    S = C.shape[0]
    P = C.shape[2]
    _slot_shape(mean, C, coef, V)
    for k in range(S):
        for i in range(3):
            U[k, i] = R[i, 0] * V[k, 0] + R[i, 1] * V[k, 1] + R[i, 2] * V[k, 2]
    for k in range(Mf):
        sel[k] = k
    # sliding contour: nearest projected candidate of the landmark's side
    for side in range(2):
        m0 = Mf if side == 0 else Mf + Mr
        nm = Mr if side == 0 else Ml
        c0 = Mf if side == 0 else Mf + nr
        nc = nr if side == 0 else nl
        for j in range(nm):
            li = m0 + j
            best = c0
            bd = np.inf
            for c in range(c0, c0 + nc):
                dx = L[li, 0] - (s * U[c, 0] + t[0])
                dy = L[li, 1] - (s * U[c, 1] + t[1])
                d2 = dx * dx + dy * dy
                if d2 < bd or (c == c0 and not d2 >= bd):
                    bd = d2
                    best = c
            sel[li] = best
    M = L.shape[0]
    cost = 0.0
    for k in range(M):
        m = sel[k]
        for i in range(3):
            Us[k, i] = U[m, i]
        r0 = (s * U[m, 0] + t[0] - L[k, 0]) * w[k]
        r1 = (s * U[m, 1] + t[1] - L[k, 1]) * w[k]
        r[k, 0] = r0
        r[k, 1] = r1
        cost += r0 * r0 + r1 * r1
    for p in range(P):
        cost += coef[p] * coef[p] * reg[p]
    return cost


@njit(cache=True, fastmath=_FM)
def _normal_equations(C, Gp, Mf, R, s, coef, r, Us, sel, w, reg, A, Hp, H, g, shape_only):
    """Gauss-Newton system: H (6+P, 6+P) = J^T J + diag(0, reg), g = J^T r + diag(0, reg) coef.

    The coefficient block is accumulated in ``Hp`` (packed upper triangle, row-major, P (P + 1) / 2)
    and unpacked into ``H`` at the end: the fixed landmarks (weight 1) through the packed Gram
    tables ``Gp`` (6, P (P + 1) / 2) as ``s^2 sum_ab (I - r3 r3^T)_ab G_ab`` (one long contiguous
    loop), the contour landmarks as a rank update with their Jacobian rows. Scratch ``A``
    (M, 2, P) receives the coefficient rows of J (rotated, scaled basis rows of the chosen slots);
    the pose rows and the pose-coefficient cross terms are accumulated landmark by landmark
    (axpy over the coefficients, skipping the structural zeros of the pose rows).
    ``shape_only`` fills only the coefficient block ``H[6:, 6:]`` and ``g[6:]``."""
    P = C.shape[2]
    M = r.shape[0]
    NP = Hp.shape[0]
    s2 = s * s
    used = False  # any contour landmark in use (not during the start-up alternation)
    for k in range(Mf, M):
        if w[k] != 0.0:
            used = True
    need_j = used or not shape_only
    if need_j:
        for k in range(M):
            m = sel[k]
            sw = s * w[k]
            cm0, cm1, cm2 = C[m, 0], C[m, 1], C[m, 2]
            for c in range(2):
                a0, a1, a2 = R[c, 0] * sw, R[c, 1] * sw, R[c, 2] * sw
                ak = A[k, c]
                for p in range(P):
                    ak[p] = a0 * cm0[p] + a1 * cm1[p] + a2 * cm2[p]
    # fixed landmarks (weight 1) through the Gram tables: s^2 sum_ab (I - r3 r3^T)_ab G_ab
    a00 = s2 * (1.0 - R[2, 0] * R[2, 0])
    a11 = s2 * (1.0 - R[2, 1] * R[2, 1])
    a22 = s2 * (1.0 - R[2, 2] * R[2, 2])
    a01 = -s2 * R[2, 0] * R[2, 1]
    a02 = -s2 * R[2, 0] * R[2, 2]
    a12 = -s2 * R[2, 1] * R[2, 2]
    if Mf > 0:
        t00, t11, t22, t01, t02, t12 = Gp[0], Gp[1], Gp[2], Gp[3], Gp[4], Gp[5]
        for i in range(NP):
            Hp[i] = (a00 * t00[i] + a11 * t11[i] + a22 * t22[i] + a01 * t01[i] + a02 * t02[i]
                     + a12 * t12[i])
    else:
        for i in range(NP):
            Hp[i] = 0.0
    # contour rows: rank update of the packed upper triangle, two landmarks (four rows) per pass
    if used:
        k = Mf
        while k < M:
            while k < M and w[k] == 0.0:
                k += 1
            if k >= M:
                break
            k2 = k + 1
            while k2 < M and w[k2] == 0.0:
                k2 += 1
            x0, y0 = A[k, 0], A[k, 1]
            if k2 < M:
                x1, y1 = A[k2, 0], A[k2, 1]
                off = 0
                for p in range(P):
                    b0, b1, b2, b3 = x0[p], y0[p], x1[p], y1[p]
                    hrow = Hp[off: off + P - p]
                    xs0, ys0, xs1, ys1 = x0[p:], y0[p:], x1[p:], y1[p:]
                    for q in range(P - p):
                        hrow[q] += b0 * xs0[q] + b1 * ys0[q] + b2 * xs1[q] + b3 * ys1[q]
                    off += P - p
            else:
                off = 0
                for p in range(P):
                    b0, b1 = x0[p], y0[p]
                    hrow = Hp[off: off + P - p]
                    xs0, ys0 = x0[p:], y0[p:]
                    for q in range(P - p):
                        hrow[q] += b0 * xs0[q] + b1 * ys0[q]
                    off += P - p
            k = k2 + 1
    # fixed landmarks whose weight is not 1 (missing ones): correct the Gram term
    for k in range(Mf):
        wk = w[k]
        if wk != 1.0:
            m = sel[k]
            f = s2 * (wk * wk - 1.0)
            for c in range(2):
                a0, a1, a2 = R[c, 0], R[c, 1], R[c, 2]
                off = 0
                for p in range(P):
                    ap = f * (a0 * C[m, 0, p] + a1 * C[m, 1, p] + a2 * C[m, 2, p])
                    for q in range(p, P):
                        Hp[off + q - p] += ap * (a0 * C[m, 0, q] + a1 * C[m, 1, q] + a2 * C[m, 2, q])
                    off += P - p
    off = 0
    for p in range(P):
        hp = Hp[off: off + P - p]
        h = H[6 + p]
        h[6 + p] = hp[0] + reg[p]
        for q in range(1, P - p):
            v = hp[q]
            h[6 + p + q] = v
            H[6 + p + q, 6 + p] = v
        off += P - p
    gs = g[6:]
    for p in range(P):
        gs[p] = reg[p] * coef[p]
    if shape_only and not need_j:
        # g = sum_k C_k^T (s w_k R2^T r_k): no Jacobian rows needed
        for k in range(M):
            sw = s * w[k]
            if sw == 0.0:
                continue
            m = sel[k]
            v0 = sw * (R[0, 0] * r[k, 0] + R[1, 0] * r[k, 1])
            v1 = sw * (R[0, 1] * r[k, 0] + R[1, 1] * r[k, 1])
            v2 = sw * (R[0, 2] * r[k, 0] + R[1, 2] * r[k, 1])
            cm0, cm1, cm2 = C[m, 0], C[m, 1], C[m, 2]
            for p in range(P):
                gs[p] += v0 * cm0[p] + v1 * cm1[p] + v2 * cm2[p]
        return
    if shape_only:
        for k in range(M):
            if w[k] == 0.0:
                continue
            ax, ay = A[k, 0], A[k, 1]
            r0, r1 = r[k, 0], r[k, 1]
            for p in range(P):
                gs[p] += r0 * ax[p] + r1 * ay[p]
        return
    # pose rows (omega, log s, t), rotation increment on the left of R:
    # row x: (0, u2, -u1, u0, w, 0); row y: (-u2, 0, u0, u1, 0, w) with u = s w (R v);
    # pose block, pose gradient and the pose-coefficient cross terms H[0:6, 6:], with g[6:]
    for i in range(6):
        g[i] = 0.0
        for j in range(6 + P):
            H[i, j] = 0.0
    h0, h1, h2, h3, h4, h5 = H[0, 6:], H[1, 6:], H[2, 6:], H[3, 6:], H[4, 6:], H[5, 6:]
    jx = np.empty(6)
    jy = np.empty(6)
    for k in range(M):
        wk = w[k]
        if wk == 0.0:
            continue
        sw = s * wk
        u0, u1, u2 = sw * Us[k, 0], sw * Us[k, 1], sw * Us[k, 2]
        r0, r1 = r[k, 0], r[k, 1]
        jx[0], jx[1], jx[2], jx[3], jx[4], jx[5] = 0.0, u2, -u1, u0, wk, 0.0
        jy[0], jy[1], jy[2], jy[3], jy[4], jy[5] = -u2, 0.0, u0, u1, 0.0, wk
        for i in range(6):
            g[i] += jx[i] * r0 + jy[i] * r1
            for j in range(i, 6):
                H[i, j] += jx[i] * jx[j] + jy[i] * jy[j]
        ax, ay = A[k, 0], A[k, 1]
        mu1 = -u1
        for p in range(P):
            x = ax[p]
            y = ay[p]
            h0[p] -= u2 * y
            h1[p] += u2 * x
            h2[p] += mu1 * x + u0 * y
            h3[p] += u0 * x + u1 * y
            h4[p] += wk * x
            h5[p] += wk * y
            gs[p] += r0 * x + r1 * y
    for i in range(6):
        for j in range(i + 1, 6):
            H[j, i] = H[i, j]
        for p in range(P):
            H[6 + p, i] = H[i, 6 + p]


@njit(cache=True, fastmath=_FM)
def _potrf_loops(A):
    """In-place Cholesky factor of the row-major SPD matrix A: ``A = U^T U`` with U in the upper
    triangle (dot-product form on the lower triangle, then mirrored); False when A is not
    numerically positive definite."""
    n = A.shape[0]
    for i in range(n):
        ai = A[i]
        for j in range(i + 1):
            aj = A[j]
            sm = ai[j]
            for k in range(j):
                sm -= ai[k] * aj[k]
            if i == j:
                if not sm > 0.0 or not math.isfinite(sm):
                    return False
                ai[i] = math.sqrt(sm)
            else:
                ai[j] = sm / aj[j]
    for i in range(n):
        for j in range(i):
            A[j, i] = A[i, j]
    return True


try:  # LAPACK dpotrf through Numba's own binding (the one np.linalg.cholesky uses): cacheable
    from numba.core import types as _nbtypes
    from numba.np.linalg import _LAPACK, ensure_lapack

    ensure_lapack()
    _xxpotrf = _LAPACK().numba_xxpotrf(_nbtypes.float64)
    # 'L' on the column-major view = U in the upper triangle of our row-major array; measured
    # 10-20 % faster than 'U' for n = 69..75 (OpenBLAS 0.3.31)
    _KIND, _UPLO = ord("d"), ord("L")

    @njit(cache=True)
    def _potrf(A):
        """In-place Cholesky factor of the row-major SPD matrix A: ``A = U^T U`` with U in the
        upper triangle (LAPACK dpotrf 'L' on the column-major view); False when not positive
        definite."""
        n = A.shape[0]
        return _xxpotrf(_KIND, _UPLO, n, A.ctypes, n) == 0
except Exception:  # pragma: no cover - older/newer Numba without this binding
    _potrf = _potrf_loops


@njit(cache=True, fastmath=_FM)
def _cholesky_solve(A, b, x):
    """Solve A x = b for symmetric positive definite A (overwritten by its Cholesky factor
    ``A = U^T U``, U in the upper triangle). Returns False (x untouched) when A is not numerically
    positive definite."""
    n = A.shape[0]
    if not _potrf(A):
        return False
    # U^T y = b, column by column; then U x = y by rows (both over contiguous rows of U)
    for i in range(n):
        x[i] = b[i]
    for i in range(n):
        ai = A[i]
        xi = x[i] / ai[i]
        x[i] = xi
        for k in range(i + 1, n):
            x[k] -= xi * ai[k]
    for i in range(n - 1, -1, -1):
        ai = A[i]
        sm = x[i]
        for k in range(i + 1, n):
            sm -= ai[k] * x[k]
        x[i] = sm / ai[i]
    return True


@njit(cache=True, fastmath=_FM)
def _solve_damped(H, g, lam, d, work, rhs):
    """LM step: d = -(H + lam diag(max(diag H, 1e-12)))^{-1} g; Cholesky in ``work``, pivoted LU
    where the system is not numerically positive definite, NaN where not finite."""
    n = H.shape[0]
    finite = True
    for i in range(n):
        hi = H[i]
        wi = work[i]
        acc = 0.0
        for j in range(n):
            v = hi[j]
            wi[j] = v
            acc += v * 0.0  # NaN for an inf or NaN entry
        wi[i] += lam * max(hi[i], 1e-12)
        rhs[i] = -g[i]
        if not (acc == 0.0 and math.isfinite(rhs[i])):
            finite = False
    if not finite:
        for i in range(n):
            d[i] = np.nan
        return
    if _cholesky_solve(work, rhs, d):
        return
    for i in range(n):
        for j in range(n):
            work[i, j] = H[i, j]
        work[i, i] += lam * max(H[i, i], 1e-12)
    _lu_solve(work, rhs, d)


@njit(cache=True, fastmath=_FM)
def _solve_spd(A, b, x, work):
    """x = A^{-1} b: Cholesky; a system that is not positive definite falls back to pivoted LU;
    a non-finite one gives NaN."""
    n = A.shape[0]
    acc = 0.0
    for i in range(n):
        acc += b[i] * 0.0
        ai = A[i]
        wi = work[i]
        for j in range(n):
            v = ai[j]
            wi[j] = v
            acc += v * 0.0  # NaN for an inf or NaN entry
    if not acc == 0.0:
        for i in range(n):
            x[i] = np.nan
        return
    if _cholesky_solve(work, b, x):
        return
    work[:, :] = A
    _lu_solve(work, b, x)


@njit(cache=True)
def _lu_solve(A, b, x):
    """Gaussian elimination with partial pivoting (A overwritten): the fallback for systems that
    are not numerically positive definite. An exactly singular system gives NaN (the array path
    takes the pseudo-inverse there; LM rejects such a step and raises the damping)."""
    n = A.shape[0]
    y = b.copy()
    for c in range(n):
        piv = c
        for i in range(c + 1, n):
            if abs(A[i, c]) > abs(A[piv, c]):
                piv = i
        if not abs(A[piv, c]) > 0.0:
            for i in range(n):
                x[i] = np.nan
            return
        if piv != c:
            for j in range(n):
                A[c, j], A[piv, j] = A[piv, j], A[c, j]
            y[c], y[piv] = y[piv], y[c]
        ac = A[c]
        for i in range(c + 1, n):
            ai = A[i]
            f = ai[c] / ac[c]
            if f != 0.0:
                for j in range(c, n):
                    ai[j] -= f * ac[j]
                y[i] -= f * y[c]
    for i in range(n - 1, -1, -1):
        ai = A[i]
        sm = y[i]
        for k in range(i + 1, n):
            sm -= ai[k] * x[k]
        x[i] = sm / ai[i]


@njit(cache=True)
def _absmax(g):
    """max |g_i|; inf when any entry is NaN (so that a NaN gradient never passes a tolerance)."""
    m = 0.0
    for i in range(g.shape[0]):
        a = abs(g[i])
        if not a <= m:
            m = a if a == a else np.inf
            if m == np.inf:
                return m
    return m


@njit(cache=True)
def _rodrigues_left(w0, w1, w2, R, out):
    """out = exp([w]_x) @ R (Rodrigues' formula, :func:`geomfit.camera.rodrigues`), row by row of
    ``E = I + a K + b K K`` with ``K = [w]_x`` (no scratch array: shared with the CUDA kernel)."""
    a, b = _rodrigues_ab(w0 * w0 + w1 * w1 + w2 * w2)
    for i in range(3):
        k0 = 0.0 if i == 0 else (w2 if i == 1 else -w1)  # row i of K
        k1 = -w2 if i == 0 else (0.0 if i == 1 else w0)
        k2 = w1 if i == 0 else (-w0 if i == 1 else 0.0)
        e0 = (1.0 if i == 0 else 0.0) + a * k0 + b * (k0 * 0.0 + k1 * w2 + k2 * -w1)
        e1 = (1.0 if i == 1 else 0.0) + a * k1 + b * (k0 * -w2 + k1 * 0.0 + k2 * w0)
        e2 = (1.0 if i == 2 else 0.0) + a * k2 + b * (k0 * w1 + k1 * -w0 + k2 * 0.0)
        for j in range(3):
            out[i, j] = e0 * R[0, j] + e1 * R[1, j] + e2 * R[2, j]


@njit(cache=True)
def _nearest_rows_svd(Mc, R):
    """Rank-deficient fallback of :func:`_affine_pose` (CPU): R[:2] = U Vh of the SVD of Mc (2, 3);
    returns the mean singular value. (The CUDA twin has no SVD: NaN camera, the fit reports failure.)"""
    U, S, Vh = np.linalg.svd(Mc, full_matrices=False)
    for i in range(2):
        for j in range(3):
            R[i, j] = U[i, 0] * Vh[0, j] + U[i, 1] * Vh[1, j]
    return 0.5 * (S[0] + S[1])


def _nearest_rows_nan(Mc, R):
    """CUDA twin of :func:`_nearest_rows_svd`: no camera (NaN)."""
    for i in range(2):
        for j in range(3):
            R[i, j] = math.nan
    return math.nan


@njit(cache=True)
def _affine_pose(X, L, w, Mf, R, t, N, Mc):
    """Weighted affine camera X[k] (k < Mf, 3) -> L[k] (2), projected to the nearest scaled
    orthographic camera; fills R (3, 3) and t (2,), returns s. Scratch: N (4, 6) for the normal
    equations ``[N | rhs]`` (the affine camera overwrites the rhs), Mc (2, 3)."""
    for i in range(4):
        for j in range(6):
            N[i, j] = 0.0
    for k in range(Mf):
        wk = w[k]
        if wk == 0.0:
            continue
        x0, x1, x2 = X[k, 0], X[k, 1], X[k, 2]
        for i in range(4):
            xi = x0 if i == 0 else (x1 if i == 1 else (x2 if i == 2 else 1.0))
            for j in range(4):
                xj = x0 if j == 0 else (x1 if j == 1 else (x2 if j == 2 else 1.0))
                N[i, j] += wk * xi * xj
            N[i, 4] += wk * xi * L[k, 0]
            N[i, 5] += wk * xi * L[k, 1]
    for i in range(4):
        N[i, i] += 1e-12
    # Gaussian elimination with partial pivoting (4x4, two right-hand sides)
    ok = True
    for i in range(4):
        for j in range(6):
            if not math.isfinite(N[i, j]):
                ok = False
    if ok:
        for c in range(4):
            piv = c
            for i in range(c + 1, 4):
                if abs(N[i, c]) > abs(N[piv, c]):
                    piv = i
            if N[piv, c] == 0.0:
                ok = False
                break
            if piv != c:
                for j in range(6):
                    tmp = N[c, j]
                    N[c, j] = N[piv, j]
                    N[piv, j] = tmp
            for i in range(c + 1, 4):
                f = N[i, c] / N[c, c]
                for j in range(c, 6):
                    N[i, j] -= f * N[c, j]
    if not ok:  # singular or non-finite normal equations: no camera (the fit reports failure)
        for i in range(3):
            for j in range(3):
                R[i, j] = math.nan
        t[0] = math.nan
        t[1] = math.nan
        return math.nan
    for j in range(2):  # back substitution in place: the affine camera in N[:, 4:6]
        for i in range(3, -1, -1):
            sm = N[i, 4 + j]
            for k in range(i + 1, 4):
                sm -= N[i, k] * N[k, 4 + j]
            N[i, 4 + j] = sm / N[i, i]
    for i in range(2):
        for j in range(3):
            v = N[j, 4 + i]
            Mc[i, j] = v if math.isfinite(v) else 0.0
    # nearest orthonormal rows R2 = (Mc Mc^T)^(-1/2) Mc (= U Vh of the SVD), s = mean singular value;
    # closed form for the 2x2 inverse square root, the SVD where Mc is (nearly) rank deficient
    a = Mc[0, 0] * Mc[0, 0] + Mc[0, 1] * Mc[0, 1] + Mc[0, 2] * Mc[0, 2]
    b = Mc[0, 0] * Mc[1, 0] + Mc[0, 1] * Mc[1, 1] + Mc[0, 2] * Mc[1, 2]
    c = Mc[1, 0] * Mc[1, 0] + Mc[1, 1] * Mc[1, 1] + Mc[1, 2] * Mc[1, 2]
    det = a * c - b * b
    if det > 1e-8 * (a + c) * (a + c):
        dl = math.sqrt(det)
        tau = math.sqrt(a + c + 2.0 * dl)
        f = 1.0 / (dl * tau)
        i00, i01, i11 = f * (c + dl), -f * b, f * (a + dl)
        for j in range(3):
            m0, m1 = Mc[0, j], Mc[1, j]
            R[0, j] = i00 * m0 + i01 * m1
            R[1, j] = i01 * m0 + i11 * m1
        s = 0.5 * tau
    else:
        s = _nearest_rows_svd(Mc, R)
    R[2, 0] = R[0, 1] * R[1, 2] - R[0, 2] * R[1, 1]
    R[2, 1] = R[0, 2] * R[1, 0] - R[0, 0] * R[1, 2]
    R[2, 2] = R[0, 0] * R[1, 1] - R[0, 1] * R[1, 0]
    sw = 0.0
    t0 = 0.0
    t1 = 0.0
    for k in range(Mf):
        wk = w[k]
        if wk == 0.0:
            continue
        u0 = R[0, 0] * X[k, 0] + R[0, 1] * X[k, 1] + R[0, 2] * X[k, 2]
        u1 = R[1, 0] * X[k, 0] + R[1, 1] * X[k, 1] + R[1, 2] * X[k, 2]
        t0 += (L[k, 0] - s * u0) * wk
        t1 += (L[k, 1] - s * u1) * wk
        sw += wk
    t[0] = t0 / sw
    t[1] = t1 / sw
    return s


@njit(cache=True, fastmath=_FM)
def _lm(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, R, t, s, coef, reg, max_iter, ftol, xtol, gtol, lam0, hist, sel,
        scr):
    """Levenberg-Marquardt (Marquardt scaling, Nielsen's damping) from (R, t, s, coef), updated in
    place. Returns (s, cost, converged, iterations); hist[0..iterations] receives the costs, sel
    the chosen model slots. ``scr``: the image's scratch tuple (see :func:`_fit_item`)."""
    _, V, U, r, Us, A, Hp, H, g, Rn, tn, cn, seln, rn, Usn, Aw, d, negd, _, _, _ = scr
    P = C.shape[2]
    n = 6 + P
    cost = _evaluate(mean, C, Mf, Mr, Ml, nr, nl, L, w, R, s, t, coef, reg, V, U, sel, r, Us)
    _normal_equations(C, Gp, Mf, R, s, coef, r, Us, sel, w, reg, A, Hp, H, g, False)
    hist[0] = cost
    lam = lam0
    nu = 2.0
    conv = False
    gmax = _absmax(g)
    if not math.isfinite(cost):
        return s, cost, False, 0
    if gmax <= gtol or cost <= _TINY:
        return s, cost, True, 0
    it = 0
    while it < max_iter:
        it += 1
        _solve_damped(H, g, lam, d, Aw, negd)
        _rodrigues_left(d[0], d[1], d[2], R, Rn)
        sn = s * math.exp(d[3])
        tn[0] = t[0] + d[4]
        tn[1] = t[1] + d[5]
        for p in range(P):
            cn[p] = coef[p] + d[6 + p]
        cnew = _evaluate(mean, C, Mf, Mr, Ml, nr, nl, L, w, Rn, sn, tn, cn, reg, V, U, seln, rn, Usn)
        pred = 0.0
        dd = 0.0
        for i in range(n):
            hi = H[i]
            hd = 0.0
            for j in range(n):
                hd += hi[j] * d[j]
            pred += d[i] * hd + 2.0 * lam * d[i] * d[i] * max(H[i, i], 1e-12)
            dd += d[i] * d[i]
        fin = math.isfinite(cnew)
        acc = fin and cnew < cost
        rho = (cost - cnew) / pred if pred > 0 else 0.0
        th = math.log(s) ** 2 + t[0] * t[0] + t[1] * t[1]
        for p in range(P):
            th += coef[p] * coef[p]
        small_step = math.sqrt(dd) <= xtol * (xtol + math.sqrt(th))
        if acc:
            rel_dec = (cost - cnew) <= ftol * cost
            lam_new = lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            nu = 2.0
            for i in range(3):
                for j in range(3):
                    R[i, j] = Rn[i, j]
            s = sn
            t[0] = tn[0]
            t[1] = tn[1]
            for p in range(P):
                coef[p] = cn[p]
            cost = cnew
            for k in range(sel.shape[0]):
                sel[k] = seln[k]
                r[k, 0] = rn[k, 0]
                r[k, 1] = rn[k, 1]
                Us[k, 0] = Usn[k, 0]
                Us[k, 1] = Usn[k, 1]
                Us[k, 2] = Usn[k, 2]
            stop = rel_dec or small_step or cost <= _TINY
            if not stop:  # the system at the answer is only needed to go on (or for the gradient test)
                _normal_equations(C, Gp, Mf, R, s, coef, r, Us, sel, w, reg, A, Hp, H, g, False)
                stop = _absmax(g) <= gtol
        else:
            lam_new = lam * nu
            nu = nu * 2.0
            stop = fin and small_step
        lam = lam_new
        hist[it] = cost
        if stop:
            conv = True
            break
        if lam > 1e16:
            break
    return s, cost, conv and math.isfinite(cost), it


@njit(cache=True)
def _shape_step(H, g, coef, Sw):
    """The linear shape solve of the start-up alternation: coef -= (H_cc + 1e-10 I)^{-1} g_c on the
    coefficient block; CPU: Cholesky (LAPACK), pivoted LU where not positive definite; scratch
    ``Sw = (Hs (P, P), rhs (P,), x (P,), work (P, P))``."""
    Hs, rhs, x, workP = Sw
    P = coef.shape[0]
    for p in range(P):
        for q in range(P):
            Hs[p, q] = H[6 + p, 6 + q]
        Hs[p, p] += 1e-10
        rhs[p] = g[6 + p]
    _solve_spd(Hs, rhs, x, workP)
    for p in range(P):
        coef[p] -= x[p]


@njit(cache=True)
def _fit_item(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, lam0,
              two_phase, R, t, coef, hist0, hist1, sel, scr, Sw):
    """Whole fit of one image (both targets): fills R (3, 3), t (2,), coef (P,), hist0/hist1
    (max_iter + 1,: costs of the start-up and the final LM phase), sel (M,). Returns (s, cost,
    converged, it0, it1, rss) where rss is the unregularised sum of squared weighted residuals at
    the answer. ``scr``: this image's scratch arrays ``(wf (M,), V (S, 3), U (S, 3), r (M, 2),
    Us (M, 3), A, Hp, H (n, n), g (n,), Rn (3, 3), tn (2,), cn (P,), seln (M,), rn (M, 2), Usn (M, 3),
    Aw (n, n), d (n,), negd (n,), Naff (4, 6), Mc (2, 3), zero (P,) zeros)`` with n = 6 + P, where
    ``A``/``Hp`` are what the target's :func:`_normal_equations` takes (CPU: Jacobian rows (M, 2, P)
    and the packed triangle; GPU: ``J^T`` (n, 2M), unused); ``Sw``: the scratch of :func:`_shape_step`."""
    wf, V, U, r, Us, A, Hp, H, g, _, _, _, _, _, _, _, _, _, Naff, Mc, zero = scr
    P = C.shape[2]
    M = L.shape[0]
    for k in range(M):
        wf[k] = w[k] if k < Mf else 0.0
    # 1. affine camera from the mean shape's fixed landmarks
    s = _affine_pose(mean, L, w, Mf, R, t, Naff, Mc)
    for p in range(P):
        coef[p] = 0.0
    # 2. alternation on the fixed landmarks: linear shape solve, pose re-fit
    for _ in range(n_alt):
        if P > 0:
            _evaluate(mean, C, Mf, Mr, Ml, nr, nl, L, wf, R, s, t, coef, reg_init, V, U, sel, r, Us)
            _normal_equations(C, Gp, Mf, R, s, coef, r, Us, sel, wf, reg_init, A, Hp, H, g, True)
            _shape_step(H, g, coef, Sw)
        _slot_shape(mean, C, coef, V)
        s = _affine_pose(V, L, w, Mf, R, t, Naff, Mc)
    # 3. Levenberg-Marquardt (after a loose start-up phase under reg_init when reg is smaller)
    it0 = 0
    if two_phase:
        s, _, _, it0 = _lm(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, R, t, s, coef, reg_init, max_iter,
                           max(ftol, 1e-4), xtol, gtol, lam0, hist0, sel, scr)
    s, cost, conv, it1 = _lm(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, R, t, s, coef, reg, max_iter, ftol, xtol,
                             gtol, lam0, hist1, sel, scr)
    # final correspondences and unregularised residual
    rss = _evaluate(mean, C, Mf, Mr, Ml, nr, nl, L, w, R, s, t, coef, zero, V, U, sel, r, Us)
    return s, cost, conv, it0, it1, rss


@njit(cache=True)
def fit_one(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, lam0,
            two_phase, R, t, coef, hist0, hist1, sel):
    """Whole fit of one image (:func:`_fit_item` with freshly allocated scratch). Fills R (3, 3),
    t (2,), coef (P,), hist0/hist1 (max_iter + 1,), sel (M,); returns (s, cost, converged, it0,
    it1, rss)."""
    S = C.shape[0]
    P = C.shape[2]
    M = L.shape[0]
    n = 6 + P
    scr = (np.empty(M), np.empty((S, 3)), np.empty((S, 3)), np.empty((M, 2)), np.empty((M, 3)),
           np.empty((M, 2, P)), np.empty(P * (P + 1) // 2), np.empty((n, n)), np.empty(n), np.empty((3, 3)),
           np.empty(2), np.empty(P), np.empty(M, dtype=np.int64), np.empty((M, 2)), np.empty((M, 3)),
           np.empty((n, n)), np.empty(n), np.empty(n), np.empty((4, 6)), np.empty((2, 3)), np.zeros(P))
    Sw = (np.empty((P, P)), np.empty(P), np.empty(P), np.empty((P, P)))
    return _fit_item(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, lam0,
                     two_phase, R, t, coef, hist0, hist1, sel, scr, Sw)


@njit(cache=True, nogil=True)
def fit_batch(mean, C, Gp, Mf, Mr, Ml, nr, nl, L, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol,
                     lam0, two_phase, R, t, coef, hist0, hist1, sel, s, cost, conv, it0, it1, rss):
    """:func:`fit_one` for every image of a batch (or of a chunk of one: the wrapper runs chunks
    on several threads; the GIL is released)."""
    for b in range(L.shape[0]):
        s[b], cost[b], conv[b], it0[b], it1[b], rss[b] = fit_one(
            mean, C, Gp, Mf, Mr, Ml, nr, nl, L[b], w[b], reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, lam0,
            two_phase, R[b], t[b], coef[b], hist0[b], hist1[b], sel[b])


# written once, compiled for both targets (the CUDA twins in _define_cuda)
_SHARED = (_rodrigues_left, _absmax, _slot_shape, _evaluate, _affine_pose, _lm, _fit_item)


# ------------------------------------------------------------------------------------------------
# CUDA: one thread per image, running _fit_item (the same source as the CPU) on per-image views
# of scratch arrays in global memory with the image index LAST, so that neighbouring threads touch
# neighbouring addresses. Linear systems are solved by an in-kernel Cholesky; a system that is not
# positive definite gives a NaN step (rejected by LM, which raises the damping) instead of the
# CPU's least-squares fallback.
# ------------------------------------------------------------------------------------------------
def _define_cuda(cu):
    # kernels reach the module through the global name ``cuda`` (the simulator swaps it in)
    dev = cu.jit(device=True)
    # the shared functions (written once above, compiled for the CPU with @njit) compiled again as
    # device functions; their callees resolve through ``env``: the device twins of the shared
    # functions, and the CUDA implementations of the target-specific ones defined below
    env = dict(globals())
    env["_rodrigues_ab"] = dev(_rodrigues_coefficients)
    env["_nearest_rows_svd"] = dev(_nearest_rows_nan)
    for f in _SHARED:
        py = f.py_func
        env[py.__name__] = dev(types.FunctionType(py.__code__, env, py.__name__, py.__defaults__, py.__closure__))

    @dev
    def normal_equations(C, G, Mf, R, s, coef, r, Us, sel, w, reg, JT, Hp, H, g, shape_only):
        """CUDA twin of :func:`_normal_equations` on one image's views (``JT`` (6+P, 2M): J^T;
        ``G`` (3, 3, P, P) unpacked; ``Hp`` unused); fills the whole system (no packed tables)."""
        P = C.shape[2]
        M = r.shape[0]
        M2 = 2 * M
        n = 6 + P
        s2 = s * s
        for k in range(M):
            m = sel[k]
            sw = s * w[k]
            for c in range(2):
                a0, a1, a2 = R[c, 0] * sw, R[c, 1] * sw, R[c, 2] * sw
                for p in range(P):
                    JT[6 + p, 2 * k + c] = a0 * C[m, 0, p] + a1 * C[m, 1, p] + a2 * C[m, 2, p]
        a00 = s2 * (1.0 - R[2, 0] * R[2, 0])
        a11 = s2 * (1.0 - R[2, 1] * R[2, 1])
        a22 = s2 * (1.0 - R[2, 2] * R[2, 2])
        a01 = -s2 * R[2, 0] * R[2, 1]
        a02 = -s2 * R[2, 0] * R[2, 2]
        a12 = -s2 * R[2, 1] * R[2, 2]
        used = False
        for k in range(Mf, M):
            if w[k] != 0.0:
                used = True
        for p in range(P):
            for q in range(p, P):
                acc = 0.0
                if Mf > 0:
                    acc = (a00 * G[0, 0, p, q] + a11 * G[1, 1, p, q] + a22 * G[2, 2, p, q]
                           + a01 * (G[0, 1, p, q] + G[1, 0, p, q]) + a02 * (G[0, 2, p, q] + G[2, 0, p, q])
                           + a12 * (G[1, 2, p, q] + G[2, 1, p, q]))
                if used:
                    for j in range(2 * Mf, M2):
                        acc += JT[6 + p, j] * JT[6 + q, j]
                H[6 + p, 6 + q] = acc
        for k in range(Mf):
            wk = w[k]
            if wk != 1.0:
                m = sel[k]
                f = s2 * (wk * wk - 1.0)
                for c in range(2):
                    a0, a1, a2 = R[c, 0], R[c, 1], R[c, 2]
                    for p in range(P):
                        ap = f * (a0 * C[m, 0, p] + a1 * C[m, 1, p] + a2 * C[m, 2, p])
                        for q in range(p, P):
                            H[6 + p, 6 + q] += ap * (a0 * C[m, 0, q] + a1 * C[m, 1, q] + a2 * C[m, 2, q])
        for p in range(P):
            H[6 + p, 6 + p] += reg[p]
            for q in range(p + 1, P):
                H[6 + q, 6 + p] = H[6 + p, 6 + q]
        for p in range(P):
            acc = 0.0
            for k in range(M):
                acc += JT[6 + p, 2 * k] * r[k, 0] + JT[6 + p, 2 * k + 1] * r[k, 1]
            g[6 + p] = acc + reg[p] * coef[p]
        if shape_only:
            return
        for k in range(M):
            wk = w[k]
            sw = s * wk
            u0, u1, u2 = sw * Us[k, 0], sw * Us[k, 1], sw * Us[k, 2]
            jx = 2 * k
            jy = jx + 1
            JT[0, jx] = 0.0
            JT[1, jx] = u2
            JT[2, jx] = -u1
            JT[3, jx] = u0
            JT[4, jx] = wk
            JT[5, jx] = 0.0
            JT[0, jy] = -u2
            JT[1, jy] = 0.0
            JT[2, jy] = u0
            JT[3, jy] = u1
            JT[4, jy] = 0.0
            JT[5, jy] = wk
        for i in range(6):
            acc = 0.0
            for k in range(M):
                acc += JT[i, 2 * k] * r[k, 0] + JT[i, 2 * k + 1] * r[k, 1]
            g[i] = acc
            for j in range(i, n):
                acc = 0.0
                for l in range(M2):
                    acc += JT[i, l] * JT[j, l]
                H[i, j] = acc
                H[j, i] = acc

    @dev
    def chol_solve(A, off, n, rhs, x):
        """Solve the SPD system A[off:off+n, off:off+n] x = rhs[off:off+n] (A overwritten by
        its lower Cholesky factor); not positive definite or not finite: x = NaN."""
        ok = True
        for i in range(off, off + n):
            for j in range(off, i + 1):
                sm = A[i, j]
                for k in range(off, j):
                    sm -= A[i, k] * A[j, k]
                if i == j:
                    if not sm > 0.0 or not math.isfinite(sm):
                        ok = False
                        break
                    A[i, i] = math.sqrt(sm)
                else:
                    A[i, j] = sm / A[j, j]
            if not ok:
                break
        if not ok:
            for i in range(off, off + n):
                x[i] = math.nan
            return
        for i in range(off, off + n):
            sm = rhs[i]
            for k in range(off, i):
                sm -= A[i, k] * x[k]
            x[i] = sm / A[i, i]
        for i in range(off + n - 1, off - 1, -1):
            sm = x[i]
            for k in range(i + 1, off + n):
                sm -= A[k, i] * x[k]
            x[i] = sm / A[i, i]

    @dev
    def solve_damped(H, g, lam, d, Aw, negd):
        """CUDA twin of :func:`_solve_damped`: in-kernel Cholesky; NaN step where the damped system
        is not positive definite or not finite."""
        n = H.shape[0]
        for i in range(n):
            for j in range(n):
                Aw[i, j] = H[i, j]
            Aw[i, i] += lam * max(H[i, i], 1e-12)
            negd[i] = -g[i]
        chol_solve(Aw, 0, n, negd, d)

    @dev
    def shape_step(H, g, coef, Sw):
        """CUDA twin of :func:`_shape_step` (in-kernel Cholesky on the coefficient block of ``Aw``;
        NaN where not positive definite); ``Sw = (Aw, d)``."""
        Aw, d = Sw
        P = coef.shape[0]
        for p in range(P):
            for q in range(P):
                Aw[6 + p, 6 + q] = H[6 + p, 6 + q]
            Aw[6 + p, 6 + p] += 1e-10
        chol_solve(Aw, 6, P, g, d)
        for p in range(P):
            coef[p] -= d[6 + p]

    env["_normal_equations"] = normal_equations
    env["_solve_damped"] = solve_damped
    env["_shape_step"] = shape_step
    fit_item = env["_fit_item"]

    @cu.jit
    def fit_batch_kernel(mean, C, G, Mf, Mr, Ml, nr, nl, L_all, w_in, reg, reg_init, n_alt, max_iter, ftol, xtol,
                         gtol, lam0, two_phase, R_out, t_out, coef_out, hist0, hist1, sel_out, s_out, cost_out,
                         conv_out, it0_out, it1_out, rss_out, zero, w_all, wf_all, V_all, U_all, sel_all, seln_all,
                         r_all, rn_all, Us_all, Usn_all, JT_all, H_all, Aw_all, g_all, d_all, negd_all, R_all,
                         Rn_all, t_all, tn_all, coef_all, cn_all):
        b = cuda.grid(1)
        if b >= L_all.shape[0]:
            return
        M = L_all.shape[1]
        P = C.shape[2]
        # this image's views of the scratch (image index last: neighbouring threads, neighbouring addresses)
        w, H, Aw, d = w_all[:, b], H_all[:, :, b], Aw_all[:, :, b], d_all[:, b]
        R, t, coef, sel = R_all[:, :, b], t_all[:, b], coef_all[:, b], sel_all[:, b]
        for k in range(M):
            w[k] = w_in[b, k]
        scr = (wf_all[:, b], V_all[:, :, b], U_all[:, :, b], r_all[:, :, b], Us_all[:, :, b], JT_all[:, :, b], H,
               H, g_all[:, b], Rn_all[:, :, b], tn_all[:, b], cn_all[:, b], seln_all[:, b], rn_all[:, :, b],
               Usn_all[:, :, b], Aw, d, negd_all[:, b], cuda.local.array((4, 6), dtype=np.float64),
               cuda.local.array((2, 3), dtype=np.float64), zero)
        s, cost, conv, it0, it1, rss = fit_item(mean, C, G, Mf, Mr, Ml, nr, nl, L_all[b], w, reg, reg_init, n_alt,
                                                max_iter, ftol, xtol, gtol, lam0, two_phase, R, t, coef, hist0[b],
                                                hist1[b], sel, scr, (Aw, d))
        for k in range(M):
            sel_out[b, k] = sel[k]
        for i in range(3):
            for j in range(3):
                R_out[b, i, j] = R[i, j]
        t_out[b, 0] = t[0]
        t_out[b, 1] = t[1]
        for p in range(P):
            coef_out[b, p] = coef[p]
        s_out[b] = s
        cost_out[b] = cost
        conv_out[b] = 1 if conv else 0
        it0_out[b] = it0
        it1_out[b] = it1
        rss_out[b] = rss

    return {"fit_batch_kernel": fit_batch_kernel}


cuda = None  # module global bound to numba.cuda by LazyCuda on first use (not at import: 0.3-0.5 s); kernel
# bodies reach ``cuda.grid`` through it, and the simulator swaps it
CUDA = LazyCuda(_define_cuda)


def fit_batch_cuda(mean, C, G, Mf, Mr, Ml, nr, nl, L, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, lam0,
                   two_phase, threads_per_block=64):
    """Run the CUDA kernel (one thread per image) on a batch. ``L`` (B, M, 2) and ``w`` (B, M) are
    CuPy arrays on a GPU, or NumPy arrays (copied to the device; the simulator). Returns
    ``(R, t, coef, hist0, hist1, sel, s, cost, conv, it0, it1, rss)`` as arrays of the module of
    ``L`` (NumPy: copied back to the host)."""
    kern = CUDA.fit_batch_kernel
    xp = get_array_module(L)
    B, M = L.shape[0], L.shape[1]
    S, _, P = C.shape
    n = 6 + P
    T = max_iter + 1
    f8 = np.float64

    def dev(shape, dtype=f8, fill=None):
        return cuda_view(xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype))

    def put(a):
        return cuda_view(xp.ascontiguousarray(xp.asarray(a)))

    outs = [dev((B, 3, 3)), dev((B, 2)), dev((B, P)), dev((B, T), fill=np.nan), dev((B, T), fill=np.nan),
            dev((B, M), np.int64), dev(B), dev(B), dev(B, np.int8), dev(B, np.int64, 0), dev(B, np.int64, 0),
            dev(B)]
    scratch = [dev((M, B)), dev((M, B)), dev((S, 3, B)), dev((S, 3, B)), dev((M, B), np.int64),
               dev((M, B), np.int64), dev((M, 2, B)), dev((M, 2, B)), dev((M, 3, B)), dev((M, 3, B)),
               dev((n, 2 * M, B)), dev((n, n, B)), dev((n, n, B)), dev((n, B)), dev((n, B)), dev((n, B)),
               dev((3, 3, B)), dev((3, 3, B)), dev((2, B)), dev((2, B)), dev((P, B)), dev((P, B))]
    blocks = (B + threads_per_block - 1) // threads_per_block
    kern[blocks, threads_per_block](put(mean), put(C), put(G), Mf, Mr, Ml, nr, nl, put(L), put(w), put(reg),
                                    put(reg_init), n_alt, max_iter, ftol, xtol, gtol, lam0, two_phase,
                                    *outs, dev(P, fill=0.0), *scratch)
    return tuple(cuda_result(o, xp) for o in outs)
