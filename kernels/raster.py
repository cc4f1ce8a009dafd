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

Attributes: with ``inv = 1 / |area|`` (one division per triangle) the barycentrics are
``b_k = w_k * inv`` and the depth is ``w0 * (z0 * inv) + w1 * (z1 * inv) + w2 * (z2 * inv)``
(evaluated left to right), identically on both targets. (Inside the triangle the three edge values
are >= 0 and at least one edge is not an owning edge, so their sum is > 0 without a test.)

Visibility: the covering triangle with the largest depth wins; equal depths go to the larger
triangle id. CPU: one pass over the triangles in order, replacing when ``not z < depth`` (depth
starts as NaN, so the first cover always writes); each bounding-box row is first scanned for its
covered span (the edge values are monotone in the column, even in floating point, so the covered
centres of a row are contiguous), then only the span's pixels are shaded, writing depth, id,
barycentrics and nearest vertex directly into the output buffers (no separate finishing pass).
CUDA: one thread per triangle; pass 1 ``atomic.max`` of the float64 depth, pass 2 ``atomic.max``
of the triangle id among triangles whose depth equals the buffer, pass 3 one thread per pixel
computes barycentrics, depth and the nearest vertex with the same arithmetic, so both give
identical buffers.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from geomfit.backend import LazyCuda, cuda_result, cuda_view, get_array_module

__all__ = ["rasterize_cpu", "rasterize_cuda", "CUDA"]


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
    """(inside, b0, b1, b2, z) of pixel centre p in triangle (i0, i1, i2): barycentrics and depth.

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
    if not (in0 and in1 and in2):
        return False, 0.0, 0.0, 0.0, 0.0
    inv = 1.0 / abs(area)
    return True, w0 * inv, w1 * inv, w2 * inv, w0 * (z0 * inv) + w1 * (z1 * inv) + w2 * (z2 * inv)




# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------

_TINY = 5e-324  # smallest positive double: ``w >= _TINY`` is ``w > 0`` (no flush-to-zero on the CPU)


@njit(cache=True, nogil=True)
def _raster_cpu(verts, faces, H, W, depth, tid, bary, vidx):
    """One pass over the triangles in order; writes all four outputs (``depth`` starts as NaN).

    Same coverage, tie and attribute arithmetic as ``_sample_py`` (bit-identical results), written
    out without helper calls: per triangle, the bounding box, the canonical edges (anchored at the
    lower-index endpoint; direction ``s * (b - a)``, which equals ``-s * (a - b)`` exactly) and
    per-edge thresholds (0 for owning edges, ``_TINY`` otherwise); per bounding-box row, the
    row terms ``e * (py - c)`` once, a branch-free scan for the covered span, then the span.
    """
    Wm1 = W - 1
    Hm1 = H - 1
    for t in range(faces.shape[0]):
        i0 = faces[t, 0]
        i1 = faces[t, 1]
        i2 = faces[t, 2]
        x0 = verts[i0, 0]
        y0 = verts[i0, 1]
        x1 = verts[i1, 0]
        y1 = verts[i1, 1]
        x2 = verts[i2, 0]
        y2 = verts[i2, 1]
        # bounding box of pixel centres (same values as _bbox, written with selects)
        xmin = x0 if x0 < x1 else x1
        xmin = xmin if xmin < x2 else x2
        xmax = x0 if x0 > x1 else x1
        xmax = xmax if xmax > x2 else x2
        ymin = y0 if y0 < y1 else y1
        ymin = ymin if ymin < y2 else y2
        ymax = y0 if y0 > y1 else y1
        ymax = ymax if ymax > y2 else y2
        j0 = math.ceil(xmin - 0.5)
        j0 = j0 if j0 > 0 else 0
        j1 = math.floor(xmax - 0.5)
        j1 = j1 if j1 < Wm1 else Wm1
        r0 = math.ceil(ymin - 0.5)
        r0 = r0 if r0 > 0 else 0
        r1 = math.floor(ymax - 0.5)
        r1 = r1 if r1 < Hm1 else Hm1
        if r1 < r0 or j1 < j0:  # no pixel centre in the bounding box (tiny or off-screen face)
            continue
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        if not (area != 0.0):  # degenerate (or NaN)
            continue
        s = 1.0 if area > 0.0 else -1.0
        inv = 1.0 / abs(area)
        # edge k is opposite vertex k: (i1, i2), (i2, i0), (i0, i1)
        e0 = s * (x2 - x1)
        f0 = s * (y2 - y1)
        e1 = s * (x0 - x2)
        f1 = s * (y0 - y2)
        e2 = s * (x1 - x0)
        f2 = s * (y1 - y0)
        l0 = i1 < i2
        l1 = i2 < i0
        l2 = i0 < i1
        a0 = x1 if l0 else x2
        c0 = y1 if l0 else y2
        a1 = x2 if l1 else x0
        c1 = y2 if l1 else y0
        a2 = x0 if l2 else x1
        c2 = y0 if l2 else y1
        th0 = 0.0 if ((f0 > 0.0) | ((f0 == 0.0) & (e0 > 0.0))) else _TINY
        th1 = 0.0 if ((f1 > 0.0) | ((f1 == 0.0) & (e1 > 0.0))) else _TINY
        th2 = 0.0 if ((f2 > 0.0) | ((f2 == 0.0) & (e2 > 0.0))) else _TINY
        z0 = verts[i0, 2] * inv
        z1 = verts[i1, 2] * inv
        z2 = verts[i2, 2] * inv
        for r in range(r0, r1 + 1):
            py = r + 0.5
            A0 = e0 * (py - c0)
            A1 = e1 * (py - c1)
            A2 = e2 * (py - c2)
            # covered span [lo, hi] of this row (empty: lo > hi): first covered column and count
            # (the covered columns are contiguous). Written so that LLVM does not vectorise it: the
            # vector set-up costs more than it saves on rows of a few pixels.
            lo = j1 + 1
            cnt = 0
            for j in range(j0, j1 + 1):
                px = j + 0.5
                ins = (A0 - f0 * (px - a0) >= th0) & (A1 - f1 * (px - a1) >= th1) & (A2 - f2 * (px - a2) >= th2)
                lo = j if (ins & (cnt == 0)) else lo
                cnt += ins
            hi = lo + cnt - 1
            base = r * W
            for j in range(lo, hi + 1):
                px = j + 0.5
                w0 = A0 - f0 * (px - a0)
                w1 = A1 - f1 * (px - a1)
                w2 = A2 - f2 * (px - a2)
                z = w0 * z0 + w1 * z1 + w2 * z2
                p = base + j
                if (not (z < depth[p])) & (z == z):
                    depth[p] = z
                    tid[p] = t
                    b0 = w0 * inv
                    b1 = w1 * inv
                    b2 = w2 * inv
                    bary[p, 0] = b0
                    bary[p, 1] = b1
                    bary[p, 2] = b2
                    # nearest vertex, branch-free: i0 if b0 is the largest, else i1 if b1 >= b2, else i2
                    q = i2 + (i1 - i2) * (b1 >= b2)
                    vidx[p] = q + (i0 - q) * ((b0 >= b1) & (b0 >= b2))


def rasterize_cpu(verts, faces, H, W):
    """Run the CPU kernel. ``verts`` (N, 3) float64 C-contiguous, ``faces`` (F, 3) int64.

    Returns flat buffers ``tid`` (H*W,) int32 (-1 empty), ``bary`` (H*W, 3) float64 (0 empty),
    ``depth`` (H*W,) float64 (NaN empty), ``vidx`` (H*W,) int32 (-1 empty).
    """
    n = H * W
    depth = np.full(n, np.nan)
    tid = np.full(n, -1, dtype=np.int32)
    bary = np.zeros((n, 3))
    vidx = np.full(n, -1, dtype=np.int32)
    _raster_cpu(verts, faces, H, W, depth, tid, bary, vidx)
    return tid, bary, depth, vidx


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

cuda = None  # module global bound to numba.cuda by LazyCuda on first use (not at import: 0.3-0.5 s); kernel
# bodies reach ``cuda.grid`` through it, and the simulator swaps it


def _define_cuda(cu):
    """The CUDA kernels (defined on first use through :class:`geomfit.backend.LazyCuda`)."""
    global _setup_d, _eval_d, _sample_d, _bbox_d  # device functions call each other through module globals
    _setup_d = cu.jit(device=True)(_edge_setup_py)
    _eval_d = cu.jit(device=True)(_edge_eval_py)
    _sample_d = cu.jit(device=True)(_sample_py)
    _bbox_d = cu.jit(device=True)(_bbox)

    @cu.jit
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
                inside, b0, b1, b2, z = _sample_d(i0, i1, i2, x0, y0, z0, x1, y1, z1, x2, y2, z2,
                                                  j + 0.5, r + 0.5)
                if inside:
                    p = r * W + j
                    if phase == 0:
                        cuda.atomic.max(zbuf, p, z)
                    elif z == zbuf[p]:
                        cuda.atomic.max(tid, p, np.int32(t))

    @cu.jit
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
        inside, b0, b1, b2, z = _sample_d(i0, i1, i2, verts[i0, 0], verts[i0, 1], verts[i0, 2],
                                          verts[i1, 0], verts[i1, 1], verts[i1, 2],
                                          verts[i2, 0], verts[i2, 1], verts[i2, 2], j + 0.5, r + 0.5)
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

    return {"k_depth": _k_depth, "k_resolve": _k_resolve}


CUDA = LazyCuda(_define_cuda)


def rasterize_cuda(verts, faces, H, W):
    """The CUDA twin of :func:`rasterize_cpu`: the same flat buffers, on the device of ``verts``.

    CuPy input stays on the GPU; NumPy input (``backend.force("cuda")``, e.g. under the simulator)
    is copied to the device and the buffers are copied back.
    """
    xp = get_array_module(verts)
    k_depth, k_resolve = CUDA.k_depth, CUDA.k_resolve
    n = H * W
    bufs = dict(v=verts, f=faces, z=xp.full(n, -np.inf, dtype=np.float64), t=xp.full(n, -1, dtype=np.int32),
                b=xp.zeros((n, 3), dtype=np.float64), d=xp.full(n, np.nan, dtype=np.float64),
                i=xp.full(n, -1, dtype=np.int32))
    d = {k: cuda_view(a) for k, a in bufs.items()}
    F = faces.shape[0]
    tpb = 128
    if F > 0:
        blocks = (F + tpb - 1) // tpb
        k_depth[blocks, tpb](d["v"], d["f"], H, W, d["z"], d["t"], 0)
        k_depth[blocks, tpb](d["v"], d["f"], H, W, d["z"], d["t"], 1)
        k_resolve[(n + tpb - 1) // tpb, tpb](d["v"], d["f"], W, d["t"], d["b"], d["d"], d["i"])
    return tuple(cuda_result(d[k], xp) for k in "tbdi")
