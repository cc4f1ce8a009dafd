"""Rasterizer benchmark: geomfit's Numba z-buffer vs a plain vectorised NumPy rasterizer.

The Surrey reference face (``$GEOMFIT_DATA/sfm/sfm_reference.obj``, 845 vertices, 1610 faces) is
midpoint-subdivided 2 and 3 times (25,760 and 103,040 triangles, bracketing the issue's ~50k),
posed frontally and slightly turned, and rasterised at 512x512. Reports medians (ms) after JIT and
the ratio, and checks that both give the same triangle ids. Writes benchmarks/results/raster.json.

Run:  GEOMFIT_DATA=/work/shared/data python benchmarks/bench_raster.py
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
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


def median_ms(fn, reps):
    """(median wall, minimum wall, median thread CPU time) in ms.

    The thread CPU time (``time.thread_time``) excludes time the process waited for a core, which
    matters on a shared machine; the wall-clock numbers include it.
    """
    ts, cs = [], []
    for _ in range(reps):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        cs.append((time.thread_time() - c0) * 1e3)
    return float(np.median(ts)), float(np.min(ts)), float(np.median(cs))


def main():
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", "/work/shared/data"))
    obj = data / "sfm" / "sfm_reference.obj"
    if not obj.is_file():
        sys.exit(f"bench_raster: {obj} not found (set GEOMFIT_DATA)")
    m = trimesh.load(obj, process=False)
    v0, f0 = np.asarray(m.vertices, float), np.asarray(m.faces, np.int64)
    results = []
    for iters in (2, 3):
        v, f = subdivide(v0, f0, iters)
        ext = (v.max(0) - v.min(0))[:2].max()
        cam = ScaledOrthographic(0.9 * SIZE / ext, euler_to_matrix(0.25, 0.1, 0.0), [SIZE / 2, SIZE / 2])
        c = v.mean(0)
        scr = np.ascontiguousarray(cam.to_screen(v - c, SIZE))
        ras = rasterize(scr, f, SIZE, SIZE)  # JIT (or cache load)
        t_geo = median_ms(lambda: rasterize(scr, f, SIZE, SIZE), 50)
        t_ker = median_ms(lambda: K.rasterize_cpu(scr, f, SIZE, SIZE), 50)
        ref = numpy_rasterize(scr, f, SIZE, SIZE)
        t_np = median_ms(lambda: numpy_rasterize(scr, f, SIZE, SIZE), 5)
        agree = float((ref == ras.triangle_id).mean())
        row = dict(triangles=int(len(f)), vertices=int(len(v)), size=SIZE, covered_pixels=int(ras.mask.sum()),
                   geomfit_rasterize_ms=round(t_geo[0], 3), geomfit_rasterize_min_ms=round(t_geo[1], 3),
                   geomfit_rasterize_cpu_ms=round(t_geo[2], 3),
                   geomfit_kernel_only_ms=round(t_ker[0], 3), numpy_reference_ms=round(t_np[0], 3),
                   numpy_reference_min_ms=round(t_np[1], 3), numpy_reference_cpu_ms=round(t_np[2], 3), speedup_vs_numpy=round(t_np[0] / t_geo[0], 1),
                   triangle_id_agreement=agree)
        print(json.dumps(row))
        results.append(row)
    out = dict(benchmark="rasterize Surrey reference face, subdivided, 512x512, one CPU thread",
               machine=platform.processor() or platform.machine(), python=platform.python_version(),
               numpy=np.__version__, target_ms=5.0, load_average=list(os.getloadavg()), results=results)
    path = pathlib.Path(__file__).resolve().parent / "results" / "raster.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
