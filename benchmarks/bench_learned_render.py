"""Differentiable renderer benchmark: geomfit.learned.render vs a plain-torch renderer, forward + backward.

The Surrey Face Model's mean shape (3,448 vertices, 6,736 triangles, ``$GEOMFIT_DATA/sfm``), slightly
turned, fills about 80 % of the image height, and is rendered with a random 3-channel per-vertex colour at
224x224 and 512x512 (float32; the Surrey mesh is coarse, so the face covers about half of the pixels).
Each timed run is ``render`` + ``(img * w).sum().backward()`` with gradients for the vertices and the
colours. Peers in the same run:

* ``reference_render``: the same torch interpolation with visibility by a plain-torch vectorised z-buffer
  (every pixel centre of every triangle's bounding box, ``scatter_reduce(amax)``);
* the visibility alone (geomfit's Numba z-buffer) and the torch part alone, to show where time goes.

Reports medians (and min) of 15 runs after warm-up with torch on 2 threads, the load average, and that
the two renderers give the same image. Writes benchmarks/results/learned_render.json.

Run:  GEOMFIT_DATA=/work/shared/data nice -n 10 python benchmarks/bench_learned_render.py
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts)), float(np.min(ts))


def main(sizes=(224, 512), reps=15, out=None):
    import torch

    from geomfit.camera import euler_to_matrix
    from geomfit.data import resolve_model
    from geomfit.learned.diffrender import _ids, barycentric_interpolate, reference_render, render

    torch.set_num_threads(2)
    model = resolve_model("sfm")
    V = model.mean @ euler_to_matrix(*np.deg2rad([20.0, 10.0, 0.0])).T
    f = model.faces
    rng = np.random.default_rng(0)
    colours = torch.tensor(rng.random((len(V), 3)), dtype=torch.float32)
    rows = []
    for S in sizes:
        c = V.mean(0)
        s = 0.8 * S / np.ptp(V[:, 1])
        scr = np.stack([(V[:, 0] - c[0]) * s + S / 2, S / 2 - (V[:, 1] - c[1]) * s, V[:, 2] * s], 1)
        vt = torch.tensor(scr, dtype=torch.float32, requires_grad=True)
        at = colours.clone().requires_grad_(True)
        w = torch.tensor(rng.normal(size=(S, S, 3)), dtype=torch.float32)
        ft = torch.as_tensor(f, dtype=torch.int64)

        def step(fn):
            vt.grad = at.grad = None
            img, _ = fn(vt, f, at, (S, S))
            (img * w).sum().backward()

        a, ma = render(vt, f, at, (S, S))
        b, mb = reference_render(vt, f, at, (S, S))
        same = bool(torch.equal(ma, mb)) and float((a - b).abs().max()) < 1e-5
        for fn in (render, reference_render):
            step(fn)  # warm-up (JIT)
        ids = _ids(vt.detach()[None], ft, S, S)

        def torch_part():
            vt.grad = at.grad = None
            img, _ = barycentric_interpolate(vt[None], ft, at, ids)
            (img * w).sum().backward()

        load0 = os.getloadavg()[0]
        t_geo = _time(lambda: step(render), reps)
        t_ref = _time(lambda: step(reference_render), reps)
        t_vis = _time(lambda: _ids(vt.detach()[None], ft, S, S), reps)
        t_tor = _time(torch_part, reps)
        row = dict(size=S, covered_pixels=int(ma.sum()), same_image=same,
                   geomfit_fwd_bwd_ms=t_geo[0], geomfit_min_ms=t_geo[1],
                   plain_torch_fwd_bwd_ms=t_ref[0], plain_torch_min_ms=t_ref[1],
                   speedup=t_ref[0] / t_geo[0], visibility_only_ms=t_vis[0], torch_part_ms=t_tor[0],
                   load_before=load0, load_after=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row))
    res = dict(benchmark="learned_render", mesh="SFM 3448 mean shape, 6736 triangles", dtype="float32",
               torch=torch.__version__, threads=torch.get_num_threads(), reps=reps, machine=platform.machine(),
               cpus=os.cpu_count(), rows=rows)
    if out is None:
        out = pathlib.Path(__file__).resolve().parent / "results" / "learned_render.json"
    pathlib.Path(out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
