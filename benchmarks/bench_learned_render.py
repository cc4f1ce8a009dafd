"""Differentiable renderer benchmark: geomfit.learned.render vs a plain-torch renderer, forward + backward.

The Surrey Face Model's mean shape (3,448 vertices, 6,736 triangles, ``$GEOMFIT_DATA/sfm``), slightly
turned, fills about 80 % of the image height, and is rendered with a random 3-channel per-vertex colour at
224x224 and 512x512 (float32; the Surrey mesh is coarse, so the face covers about half of the pixels).
Each timed run is ``render`` + ``(img * w).sum().backward()`` with gradients for the vertices and the
colours. Peers in the same run:

* ``reference_render``: the same torch interpolation with visibility by a plain-torch vectorised z-buffer
  (every pixel centre of every triangle's bounding box, ``scatter_reduce(amax)``);
* the visibility alone (geomfit's Numba z-buffer) and the torch part alone, to show where time goes.

Reports medians (and min) of 15 runs after warm-up with torch on one thread (on a machine shared with
other jobs two threads were up to 20x slower from contention), the load average, and that
the two renderers give the same image. Writes benchmarks/results/learned_render.json.

With ``--fit`` it also times :func:`geomfit.learned.fit_photometric` (one torch thread) and records
its accuracy: on synthetic faces (``tests/test_learned_fit.py``'s generator: known identity, expression,
pose, albedo, SH light, 1 % noise, jaw landmarks missing) the aligned 3D shape error against
:func:`geomfit.fit_landmarks` on the same landmarks (peer in the same run), and on the shared photo
``image_0010`` the photometric error against the landmark fit's geometry with the same light and
texture optimisation. Writes benchmarks/results/learned_fit.json.

Run:  GEOMFIT_DATA=../shared/data nice -n 10 python benchmarks/bench_learned_render.py [--fit]
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from _harness import Timer, ratio, tests_module, write_results


def _time(fn, reps):
    t = Timer(repeats=reps).run(fn)
    return t.median * 1e3, t.min * 1e3


def main(sizes=(224, 512), reps=15, out=None, threads=1):
    import torch

    from geomfit.camera import euler_to_matrix
    from geomfit.data import resolve_model
    from geomfit.learned.diffrender import _ids, barycentric_interpolate, reference_render, render

    torch.set_num_threads(threads)
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
        same = bool(torch.equal(ma, mb)) and float((a - b).detach().abs().max()) < 1e-5
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
                   speedup=ratio(t_ref[0], t_geo[0]), visibility_only_ms=t_vis[0], torch_part_ms=t_tor[0],
                   load_before=load0, load_after=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row))
    res = dict(benchmark="learned_render", mesh="SFM 3448 mean shape, 6736 triangles", dtype="float32",
               torch=torch.__version__, threads=torch.get_num_threads(), reps=reps, rows=rows)
    write_results("learned_render", res, out)
    return res


def fit_section(seeds=(1, 2, 3, 4), sizes=(128, 256), out=None):
    import torch

    T = tests_module("test_learned_fit")
    shape_error, synthetic_face = T.shape_error, T.synthetic_face

    from geomfit.data import data_dir, resolve_model
    from geomfit.fitting import fit_landmarks
    from geomfit.io import read_pts
    from geomfit.learned import fit_photometric
    from geomfit.photo import read_image, srgb_to_linear

    torch.set_num_threads(1)
    model = resolve_model("sfm")
    rows = []
    for size in sizes:
        for seed in seeds:
            img, L, V, _ = synthetic_face(model, seed, size=size)
            t0 = time.perf_counter()
            lf = fit_landmarks(model, L, img.shape[:2])
            t_lm = time.perf_counter() - t0
            load0 = os.getloadavg()[0]
            pf = fit_photometric(model, img, L, landmark_fit=lf, max_side=None)
            e0, e1 = shape_error(lf.vertices, V), shape_error(pf.vertices, V)
            row = dict(kind="synthetic", size=size, seed=seed, landmark_fit_mm=e0, photometric_mm=e1, ratio=e1 / e0,
                       photometric_error=pf.photometric_error, fit_s=pf.seconds, landmark_fit_s=t_lm,
                       iterations=len(pf.loss_history) - 1, load=load0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    d = data_dir()
    if d is not None and (d / "images" / "image_0010.png").is_file():
        img = srgb_to_linear(read_image(d / "images" / "image_0010.png"))
        L = read_pts(d / "images" / "image_0010.pts")
        lf = fit_landmarks(model, L, img.shape[:2])
        for ms in (256, 512):
            load0 = os.getloadavg()[0]
            fixed = fit_photometric(model, img, L, landmark_fit=lf, fit_geometry=False, max_side=ms)
            full = fit_photometric(model, img, L, landmark_fit=lf, max_side=ms)
            both = fixed.mask & full.mask
            from geomfit.learned.photometric import _prep_image

            im, _ = _prep_image(img, ms)
            row = dict(kind="image_0010", max_side=ms, landmark_geometry_error=fixed.photometric_error,
                       photometric_fit_error=full.photometric_error,
                       landmark_geometry_error_common_mask=float(abs(fixed.rendered - im)[both].mean()),
                       photometric_fit_error_common_mask=float(abs(full.rendered - im)[both].mean()),
                       face_pixels=int(full.mask.sum()), fit_s=full.seconds, fixed_s=fixed.seconds, load=load0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = dict(benchmark="learned_fit", torch=torch.__version__, threads=1, rows=rows)
    write_results("learned_fit", res, out)
    return res


if __name__ == "__main__":
    if "--quick" in sys.argv:  # smoke run: small sizes, few repeats, results not kept
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            main(sizes=(64,), reps=2, out=os.path.join(d, "r.json"))
    else:
        main()
        if "--fit" in sys.argv:
            fit_section()
