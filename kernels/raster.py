"""Z-buffer triangle rasterisation kernels: Numba CPU (``@njit``) and Numba CUDA, same results.

Private compiled loops behind :func:`geomfit.render.rasterize` (which validates input).

Conventions
-----------
Screen coordinates: x = column, y = row (down), z = depth, larger = closer. Pixel ``p`` of row
``i`` and column ``j`` is sampled at its centre ``(j + 0.5, i + 0.5)``; flat pixel index
``i * W + j``.

Coverage: a pixel centre is inside a triangle when all three edge functions (normalised to the
triangle's orientation, so both windings render) are >= 0; a centre exactly on an edge belongs to
the triangle for which the edge, traversed in the triangle's positive orientation, has direction
``(dx, dy)`` with ``dy > 0`` or ``dy == 0 and dx > 0``. Two triangles sharing an edge traverse it
in opposite directions, so exactly one of them owns such a pixel (a top-left-style rule). The
edge function of an edge is always evaluated with its endpoints in ascending vertex-index order
(and negated as needed), so both triangles see bit-identical values. Degenerate (zero-area)
triangles never cover anything.

Visibility: the covering triangle with the largest depth wins; equal depths go to the larger
triangle id. CPU: triangles in order with ``z >= zbuf``. CUDA: one thread per triangle; pass 1
``atomic.max`` of the float64 depth, pass 2 ``atomic.max`` of the triangle id among triangles
whose depth equals the buffer, pass 3 one thread per pixel computes barycentrics, depth and the
nearest vertex. Depth and barycentrics come from the same device-agnostic functions on both
targets, so both give identical buffers.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from geomfit.backend import numba_cuda

__all__ = ["rasterize_cpu", "rasterize_cuda", "CUDA_KERNELS"]


# ------------------------------------------------------------------------------------------------
# shared math (compiled twice: CPU njit and CUDA device functions)
# ------------------------------------------------------------------------------------------------

def _edge_setup_py(ia, ib, xa, ya, xb, yb, s):
    """Edge a->b of a triangle with orientation sign s: (ax, ay, ex, ey, own).

    The edge is stored from its lower-index endpoint, and (ex, ey) is its direction times the sign
    that makes the inside positive, so that the edge value ``ex*(py-ay) - ey*(px-ax)`` seen from
    the neighbour across the edge is the exact negation. ``own``: whether centres exactly on the
    edge belong to this triangle (the oriented direction has ey > 0, or ey == 0 and ex > 0).
    """
    if ia < ib:
        ax, ay, ex, ey = xa, ya, s * (xb - xa), s * (yb - ya)
    else:
        ax, ay, ex, ey = xb, yb, -s * (xa - xb), -s * (ya - yb)
    own = ey > 0.0 or (ey == 0.0 and ex > 0.0)
    return ax, ay, ex, ey, own


def _edge_eval_py(ax, ay, ex, ey, own, px, py):
    """(value, covered) of one edge at p."""
    w = ex * (py - ay) - ey * (px - ax)
    return w, (w > 0.0) or (w == 0.0 and own)


def _bbox(x0, y0, x1, y1, x2, y2, H, W):
    """Rows/columns whose pixel centres can lie in the triangle's bounding box (inclusive)."""
    xmin = min(x0, min(x1, x2))
    xmax = max(x0, max(x1, x2))
    ymin = min(y0, min(y1, y2))
    ymax = max(y0, max(y1, y2))
    j0 = max(int(math.ceil(xmin - 0.5)), 0)
    j1 = min(int(math.floor(xmax - 0.5)), W - 1)
    r0 = max(int(math.ceil(ymin - 0.5)), 0)
    r1 = min(int(math.floor(ymax - 0.5)), H - 1)
    return r0, r1, j0, j1


def _sample_py(i0, i1, i2, x0, y0, z0, x1, y1, z1, x2, y2, z2, px, py):
    """(inside, w0, w1, w2, z) of pixel centre p in triangle (i0, i1, i2); b_k = w_k / sum(w).

    CUDA device function (the CPU kernel inlines the same arithmetic).
    """
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
    if not (area != 0.0):  # degenerate or NaN
        return False, 0.0, 0.0, 0.0, 0.0
    s = 1.0 if area > 0.0 else -1.0
    a0, c0, e0, f0, o0 = _setup_d(i1, i2, x1, y1, x2, y2, s)  # edge opposite vertex 0
    a1, c1, e1, f1, o1 = _setup_d(i2, i0, x2, y2, x0, y0, s)
    a2, c2, e2, f2, o2 = _setup_d(i0, i1, x0, y0, x1, y1, s)
    w0, in0 = _eval_d(a0, c0, e0, f0, o0, px, py)
    w1, in1 = _eval_d(a1, c1, e1, f1, o1, px, py)
    w2, in2 = _eval_d(a2, c2, e2, f2, o2, px, py)
    tot = w0 + w1 + w2
    if not (in0 and in1 and in2 and tot > 0.0):
        return False, 0.0, 0.0, 0.0, 0.0
    return True, w0, w1, w2, (w0 * z0 + w1 * z1 + w2 * z2) / tot


_edge_setup = njit(cache=True, inline="always")(_edge_setup_py)
_edge_eval = njit(cache=True, inline="always")(_edge_eval_py)
_bbox_cpu = njit(cache=True)(_bbox)


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _zbuffer_cpu(verts, faces, H, W, zbuf, tid, bary):
    """Single pass: triangles in increasing order, ``z >= zbuf`` (ties go to the larger id)."""
    for t in range(faces.shape[0]):
        i0, i1, i2 = faces[t, 0], faces[t, 1], faces[t, 2]
        x0, y0, z0 = verts[i0, 0], verts[i0, 1], verts[i0, 2]
        x1, y1, z1 = verts[i1, 0], verts[i1, 1], verts[i1, 2]
        x2, y2, z2 = verts[i2, 0], verts[i2, 1], verts[i2, 2]
        r0, r1, j0, j1 = _bbox_cpu(x0, y0, x1, y1, x2, y2, H, W)
        if r1 < r0 or j1 < j0:  # no pixel centre in the bounding box (tiny or off-screen face)
            continue
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        if not (area != 0.0):
            continue
        s = 1.0 if area > 0.0 else -1.0
        a0, c0, e0, f0, o0 = _edge_setup(i1, i2, x1, y1, x2, y2, s)
        a1, c1, e1, f1, o1 = _edge_setup(i2, i0, x2, y2, x0, y0, s)
        a2, c2, e2, f2, o2 = _edge_setup(i0, i1, x0, y0, x1, y1, s)
        for r in range(r0, r1 + 1):
            py = r + 0.5
            for j in range(j0, j1 + 1):
                px = j + 0.5
                w0, in0 = _edge_eval(a0, c0, e0, f0, o0, px, py)
                if not in0:
                    continue
                w1, in1 = _edge_eval(a1, c1, e1, f1, o1, px, py)
                if not in1:
                    continue
                w2, in2 = _edge_eval(a2, c2, e2, f2, o2, px, py)
                tot = w0 + w1 + w2
                if not (in2 and tot > 0.0):
                    continue
                z = (w0 * z0 + w1 * z1 + w2 * z2) / tot
                p = r * W + j
                if z >= zbuf[p]:
                    zbuf[p] = z
                    tid[p] = t
                    bary[p, 0] = w0 / tot
                    bary[p, 1] = w1 / tot
                    bary[p, 2] = w2 / tot


@njit(cache=True, nogil=True)
def _finish_cpu(faces, tid, bary, zbuf, vidx):
    """Empty pixels -> NaN depth; nearest-vertex index map."""
    for p in range(tid.shape[0]):
        t = tid[p]
        if t < 0:
            zbuf[p] = np.nan
            continue
        b0, b1, b2 = bary[p, 0], bary[p, 1], bary[p, 2]
        if b0 >= b1 and b0 >= b2:
            vidx[p] = faces[t, 0]
        elif b1 >= b2:
            vidx[p] = faces[t, 1]
        else:
            vidx[p] = faces[t, 2]


def rasterize_cpu(verts, faces, H, W):
    """Run the CPU kernels. ``verts`` (N, 3) float64 C-contiguous, ``faces`` (F, 3) int64.

    Returns flat buffers ``tid`` (H*W,) int32 (-1 empty), ``bary`` (H*W, 3) float64 (0 empty),
    ``depth`` (H*W,) float64 (NaN empty), ``vidx`` (H*W,) int32 (-1 empty).
    """
    n = H * W
    zbuf = np.full(n, -np.inf)
    tid = np.full(n, -1, dtype=np.int32)
    bary = np.zeros((n, 3))
    vidx = np.full(n, -1, dtype=np.int32)
    _zbuffer_cpu(verts, faces, H, W, zbuf, tid, bary)
    _finish_cpu(faces, tid, bary, zbuf, vidx)
    return tid, bary, zbuf, vidx


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

cuda = numba_cuda()
CUDA_KERNELS = None

if cuda is not None:
    try:
        _setup_d = cuda.jit(device=True)(_edge_setup_py)
        _eval_d = cuda.jit(device=True)(_edge_eval_py)
        _sample_d = cuda.jit(device=True)(_sample_py)
        _bbox_d = cuda.jit(device=True)(_bbox)

        @cuda.jit
        def _k_depth(verts, faces, H, W, zbuf, tid, phase):
            """phase 0: atomic max of depth; phase 1: atomic max of triangle id at equal depth."""
            t = cuda.grid(1)
            if t >= faces.shape[0]:
                return
            i0, i1, i2 = faces[t, 0], faces[t, 1], faces[t, 2]
            x0, y0, z0 = verts[i0, 0], verts[i0, 1], verts[i0, 2]
            x1, y1, z1 = verts[i1, 0], verts[i1, 1], verts[i1, 2]
            x2, y2, z2 = verts[i2, 0], verts[i2, 1], verts[i2, 2]
            r0, r1, j0, j1 = _bbox_d(x0, y0, x1, y1, x2, y2, H, W)
            for r in range(r0, r1 + 1):
                for j in range(j0, j1 + 1):
                    inside, w0, w1, w2, z = _sample_d(i0, i1, i2, x0, y0, z0, x1, y1, z1, x2, y2, z2,
                                                      j + 0.5, r + 0.5)
                    if inside:
                        p = r * W + j
                        if phase == 0:
                            cuda.atomic.max(zbuf, p, z)
                        elif z == zbuf[p]:
                            cuda.atomic.max(tid, p, np.int32(t))

        @cuda.jit
        def _k_resolve(verts, faces, W, tid, bary, depth, vidx):
            p = cuda.grid(1)
            if p >= tid.shape[0]:
                return
            t = tid[p]
            if t < 0:
                return
            i0, i1, i2 = faces[t, 0], faces[t, 1], faces[t, 2]
            r = p // W
            j = p - r * W
            inside, w0, w1, w2, z = _sample_d(i0, i1, i2, verts[i0, 0], verts[i0, 1], verts[i0, 2],
                                              verts[i1, 0], verts[i1, 1], verts[i1, 2],
                                              verts[i2, 0], verts[i2, 1], verts[i2, 2], j + 0.5, r + 0.5)
            tot = w0 + w1 + w2
            b0 = w0 / tot
            b1 = w1 / tot
            b2 = w2 / tot
            bary[p, 0] = b0
            bary[p, 1] = b1
            bary[p, 2] = b2
            depth[p] = z
            if b0 >= b1 and b0 >= b2:
                vidx[p] = i0
            elif b1 >= b2:
                vidx[p] = i1
            else:
                vidx[p] = i2

        CUDA_KERNELS = (_k_depth, _k_resolve)
    except Exception:  # pragma: no cover - a broken CUDA toolchain must not break the CPU path
        CUDA_KERNELS = None


def rasterize_cuda(verts, faces, H, W, xp=None):
    """Run the CUDA kernels on device arrays (CuPy) or, under the simulator, NumPy arrays.

    ``xp`` is the array module of the outputs (``cupy`` on a GPU, ``numpy`` for the simulator).
    Returns the same flat buffers as :func:`rasterize_cpu`.
    """
    if CUDA_KERNELS is None:
        raise RuntimeError("Numba CUDA is not available: cannot run the CUDA rasterizer")
    k_depth, k_resolve = CUDA_KERNELS
    xp = np if xp is None else xp
    n = H * W
    zbuf = xp.full(n, -np.inf, dtype=np.float64)
    tid = xp.full(n, -1, dtype=np.int32)
    bary = xp.zeros((n, 3), dtype=np.float64)
    depth = xp.full(n, np.nan, dtype=np.float64)
    vidx = xp.full(n, -1, dtype=np.int32)
    F = faces.shape[0]
    if xp is np:  # simulator (or a GPU fed host arrays): explicit transfers
        d = {k: cuda.to_device(a) for k, a in dict(v=verts, f=faces, z=zbuf, t=tid, b=bary, d=depth, i=vidx).items()}
    else:
        d = dict(v=verts, f=faces, z=zbuf, t=tid, b=bary, d=depth, i=vidx)
    tpb = 128
    if F > 0:
        blocks = (F + tpb - 1) // tpb
        k_depth[blocks, tpb](d["v"], d["f"], H, W, d["z"], d["t"], 0)
        k_depth[blocks, tpb](d["v"], d["f"], H, W, d["z"], d["t"], 1)
        k_resolve[(n + tpb - 1) // tpb, tpb](d["v"], d["f"], W, d["t"], d["b"], d["d"], d["i"])
    if xp is np:
        return d["t"].copy_to_host(), d["b"].copy_to_host(), d["d"].copy_to_host(), d["i"].copy_to_host()
    return tid, bary, depth, vidx
