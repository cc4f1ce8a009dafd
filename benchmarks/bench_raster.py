"""Rasterizer benchmark: geomfit's Numba z-buffer vs a plain vectorised NumPy rasterizer.

The Surrey reference face (``$GEOMFIT_DATA/sfm/sfm_reference.obj``, 845 vertices, 1610 faces) is
midpoint-subdivided 2 and 3 times (25,760 and 103,040 triangles) and, for the issue's "about 50k
triangles" case, subdivided twice and then refined once more by :func:`pair_split` (a conforming
edge split of matched triangle pairs: 49,684 triangles, no T-junctions, same surface). Each mesh is
posed slightly turned and rasterised at 512x512 on one thread. Reports the median, minimum and
median CPU time (``time.process_time``) in ms after JIT, the load average before and after each
row, and checks that geomfit and the NumPy rasterizer give the same triangle ids. Writes
benchmarks/results/raster.json.

Run:  GEOMFIT_DATA=../shared/data python benchmarks/bench_raster.py [--reps 200] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

from _harness import ROOT, Timer, ratio, write_results  # noqa: E402
from geomfit.camera import ScaledOrthographic, euler_to_matrix  # noqa: E402
from geomfit.kernels import raster as K  # noqa: E402
from geomfit.mesh import subdivide  # noqa: E402
from geomfit.render import rasterize  # noqa: E402

SIZE = 512


def numpy_rasterize(v, f, H, W):
    """Plain vectorised NumPy z-buffer: enumerate (triangle, pixel) pairs of every bounding box,
    edge-function inside test, then keep the largest depth per pixel with a lexsort."""
    p0, p1, p2 = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    xs = np.stack([p0[:, 0], p1[:, 0], p2[:, 0]], 1)
    ys = np.stack([p0[:, 1], p1[:, 1], p2[:, 1]], 1)
    j0 = np.clip(np.ceil(xs.min(1) - 0.5), 0, W).astype(np.int64)
    j1 = np.clip(np.floor(xs.max(1) - 0.5), -1, W - 1).astype(np.int64)
    r0 = np.clip(np.ceil(ys.min(1) - 0.5), 0, H).astype(np.int64)
    r1 = np.clip(np.floor(ys.max(1) - 0.5), -1, H - 1).astype(np.int64)
    bw = np.maximum(j1 - j0 + 1, 0)
    cnt = bw * np.maximum(r1 - r0 + 1, 0)
    t = np.repeat(np.arange(len(f)), cnt)
    off = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    r = r0[t] + off // bw[t]
    j = j0[t] + off % bw[t]
    px, py = j + 0.5, r + 0.5
    a, b, c = p0[t], p1[t], p2[t]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    w0 = (c[:, 0] - b[:, 0]) * (py - b[:, 1]) - (c[:, 1] - b[:, 1]) * (px - b[:, 0])
    w1 = (a[:, 0] - c[:, 0]) * (py - c[:, 1]) - (a[:, 1] - c[:, 1]) * (px - c[:, 0])
    w2 = area - w0 - w1
    s = np.sign(area)
    inside = (s * w0 >= 0) & (s * w1 >= 0) & (s * w2 >= 0) & (area != 0)
    t, r, j = t[inside], r[inside], j[inside]
    area, w0, w1 = area[inside], w0[inside], w1[inside]
    z = (w0 * p0[t, 2] + w1 * p1[t, 2] + (area - w0 - w1) * p2[t, 2]) / area
    pix = r * W + j
    order = np.lexsort((t, z, pix))  # last entry per pixel = largest depth
    pix, t, z = pix[order], t[order], z[order]
    last = np.r_[pix[1:] != pix[:-1], True]
    tid = np.full(H * W, -1, np.int64)
    tid[pix[last]] = t[last]
    return tid.reshape(H, W)


def pair_split(v, f):
    """Conforming ~2x refinement: greedily match triangles across shared edges and split each
    matched pair's shared edge at its midpoint (the pair becomes four triangles); unmatched
    triangles stay. No T-junctions; the surface is unchanged; orientation is kept."""
    F = len(f)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # directed edges, edge k of face t at k*F+t
    key = np.sort(e, axis=1)
    uniq, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    first = np.searchsorted(inv[order], np.arange(len(uniq)))
    interior = np.nonzero(cnt == 2)[0]
    ea, eb = order[first[interior]], order[first[interior] + 1]  # the two directed edges of each interior edge
    ta, tb = ea % F, eb % F
    nbr = [[] for _ in range(F)]  # (neighbour, interior edge) lists; set-up only, not timed
    for k in range(len(interior)):
        nbr[ta[k]].append((tb[k], k))
        nbr[tb[k]].append((ta[k], k))
    used = np.zeros(F, bool)
    pairs = []
    # greedy matching, fewest free neighbours first (a face that loses its last neighbour stays whole)
    for t in sorted(range(F), key=lambda t: len(nbr[t])):
        if used[t]:
            continue
        free = [(sum(not used[u] for u, _ in nbr[o]), o, k) for o, k in nbr[t] if not used[o]]
        if free:
            _, o, k = min(free)
            used[t] = used[o] = True
            pairs.append(k)
    pairs = np.asarray(pairs)
    ue = interior[pairs]
    mid = 0.5 * (v[uniq[ue, 0]] + v[uniq[ue, 1]])
    mid_id = len(v) + np.arange(len(pairs))
    v2 = np.concatenate([v, mid])
    out = [f[~used]]
    for ed in (ea[pairs], eb[pairs]):
        t, k = ed % F, ed // F  # face t, local edge k = (f[t,k], f[t,(k+1)%3])
        p = f[t, k]; q = f[t, (k + 1) % 3]; r = f[t, (k + 2) % 3]
        out.append(np.stack([p, mid_id, r], 1))
        out.append(np.stack([mid_id, q, r], 1))
    return v2, np.concatenate(out)


def median_ms(fn, reps):
    """(median wall, minimum wall, median process CPU time) in ms.

    The CPU time (everything runs on one thread) excludes time the process waited for a core,
    which matters on a shared machine; the wall-clock numbers include it.
    """
    t = Timer(reps).run(fn)
    return t.median * 1e3, t.min * 1e3, t.cpu_median * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="timed calls per rasterizer (NumPy peer: 5)")
    ap.add_argument("--quick", action="store_true", help="only the first mesh (a check that the script runs)")
    args = ap.parse_args()
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", ROOT.parent / "shared" / "data"))
    obj = data / "sfm" / "sfm_reference.obj"
    if not obj.is_file():
        sys.exit(f"bench_raster: {obj} not found (set GEOMFIT_DATA)")
    m = trimesh.load(obj, process=False)
    v0, f0 = np.asarray(m.vertices, float), np.asarray(m.faces, np.int64)
    results = []
    v2, f2 = subdivide(v0, f0, 2)
    meshes = [("subdivided 2x", v2, f2), ("subdivided 2x + pair split", *pair_split(v2, f2)),
              ("subdivided 3x", *subdivide(v0, f0, 3))]
    if args.quick:
        meshes = meshes[:1]
    for label, v, f in meshes:
        load0 = os.getloadavg()[0]
        ext = (v.max(0) - v.min(0))[:2].max()
        cam = ScaledOrthographic(0.9 * SIZE / ext, euler_to_matrix(0.25, 0.1, 0.0), [SIZE / 2, SIZE / 2])
        c = v.mean(0)
        scr = np.ascontiguousarray(cam.to_screen(v - c, SIZE))
        ras = rasterize(scr, f, SIZE, SIZE)  # JIT (or cache load)
        t_geo = median_ms(lambda: rasterize(scr, f, SIZE, SIZE), args.reps)
        t_ker = median_ms(lambda: K.rasterize_cpu(scr, f, SIZE, SIZE), args.reps)
        ref = numpy_rasterize(scr, f, SIZE, SIZE)
        t_np = median_ms(lambda: numpy_rasterize(scr, f, SIZE, SIZE), 5)
        agree = float((ref == ras.triangle_id).mean())
        row = dict(mesh=label, triangles=int(len(f)), vertices=int(len(v)), size=SIZE, covered_pixels=int(ras.mask.sum()),
                   geomfit_rasterize_ms=round(t_geo[0], 3), geomfit_rasterize_min_ms=round(t_geo[1], 3),
                   geomfit_rasterize_cpu_ms=round(t_geo[2], 3),
                   geomfit_kernel_only_ms=round(t_ker[0], 3), geomfit_kernel_only_min_ms=round(t_ker[1], 3),
                   geomfit_kernel_only_cpu_ms=round(t_ker[2], 3), numpy_reference_ms=round(t_np[0], 3),
                   numpy_reference_min_ms=round(t_np[1], 3), numpy_reference_cpu_ms=round(t_np[2], 3), speedup_vs_numpy=round(ratio(t_np[0], t_geo[0]), 1),
                   triangle_id_agreement=agree, load_average_before=round(load0, 2),
                   load_average_after=round(os.getloadavg()[0], 2))
        print(json.dumps(row))
        results.append(row)
    out = dict(benchmark="rasterize Surrey reference face, subdivided, 512x512, one CPU thread", target_ms=5.0,
               results=results)
    print("wrote", write_results("raster" if not args.quick else "raster_quick", out))


if __name__ == "__main__":
    main()
