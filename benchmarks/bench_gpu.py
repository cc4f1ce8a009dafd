"""GPU benchmark: the issues' GPU targets in one short run, each against the CPU path in the same run.

One script for a session that is lent a GPU (the device machine has CuPy, Numba and numba-cuda but no
CHOLMOD, trimesh or data folder), so every input is synthetic (built here or by the tests' helpers):

==========  ==========================================================  =============================
section     what is timed (GPU = CuPy arrays in, CuPy arrays out)        issue target on a GPU
==========  ==========================================================  =============================
sh          ``fit_sh_lighting``, 1024 x 1024 x 3                         (#5: tens of ms on CPU)
rtv         ``rtv_smooth`` of a 1024 x 1024 colour image, 4 iterations   #5: under 0.1 s per megapixel
fine        ``fine_stage`` on ``synthetic_scene(512)``, exact LM steps    #5: well under a second
laplacian   ``LaplacianDeformer`` on a 228 x 228 grid (51,984 vertices), #4: further solve under 1 ms
            1,000 handles: set-up + first solve, further solves, batch
raster      ``rasterize`` of a 49,298-triangle grid mesh at 512 x 512     (#2: CPU target 5 ms)
fitting     ``fit_landmarks`` on a batch of 10,000 landmark sets of a     #3: 100k fits per second
            random model of the Surrey model's size (3,448 vertices,
            63 identity, 6 expression components)
==========  ==========================================================  =============================

Each section records medians (after a warm-up call that compiles the kernels), the CPU time of the
same call on the same machine where that is cheap, and the largest CPU/GPU difference; a section
that fails records its error and the others still run. Results go to ``--out`` (default
benchmarks/results/gpu.json).

Run on the GPU machine:  ``bash scripts/gpu_check.sh`` (tests, then this script).
Dry run of the same code on NumPy (what the test suite does): ``python benchmarks/bench_gpu.py --xp numpy --quick``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import numpy as np

from _harness import ROOT, Timer, environment, tests_module
from geomfit.fine import FineOptions, _depth_normals, fine_stage

EXACT = FineOptions(inexact_depth=False)  # the default (robust) method, exact depth steps (as on the GPU)
from geomfit.scenes import synthetic_scene
from geomfit.fitting import fit_landmarks
from geomfit.laplacian import LaplacianDeformer
from geomfit.render import rasterize
from geomfit.rtv import rtv_smooth
from geomfit.sh import fit_sh_lighting

grid_mesh = tests_module("test_laplacian").grid_mesh  # k x k height-field patch, 2 triangles per cell


class Device:
    """The array module under test, with a synchronise and host/device copies."""

    def __init__(self, name):
        if name == "cupy":
            import cupy as cp

            self.xp, self.name = cp, "cupy"
            self.sync = cp.cuda.Device().synchronize
            self.to = cp.asarray
            self.host = cp.asnumpy
        else:
            self.xp, self.name = np, "numpy"
            self.sync = lambda: None
            self.to = np.asarray
            self.host = np.asarray

    def time(self, fn, repeats):
        """Median and minimum wall seconds of ``fn()`` over ``repeats`` synchronised calls; last result."""
        t = Timer(repeats, sync=self.sync).run(fn)
        return t.median, t.min, t.result


def cpu_time(fn, repeats=1):
    """Median wall seconds and last result of ``fn()`` on the CPU (a NumPy :class:`Device`)."""
    med, _, out = Device("numpy").time(fn, repeats)
    return med, out


# ------------------------------------------------------------------------------------------ inputs
def sphere_scene(n, seed=0):
    """An image of a lit sphere with a mildly textured albedo: image, normals, albedo, mask, SH light."""
    from geomfit.sh import shade

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    u, v = (xx - (n - 1) / 2) / (0.48 * n), (yy - (n - 1) / 2) / (0.48 * n)
    mask = u * u + v * v < 0.95
    depth = np.sqrt(np.clip(1 - u * u - v * v, 0, None)) * 0.48 * n
    normals = _depth_normals(depth)
    sh = np.zeros((9, 3))
    sh[0], sh[1], sh[2], sh[3] = 1.2, 0.2, 0.4, -0.3
    sh[4:] = 0.05 * rng.standard_normal((5, 3))
    albedo = np.clip(0.6 + 0.05 * rng.standard_normal((n, n, 3)), 0.3, 0.9)
    image = albedo * shade(normals, sh)
    assert 0.0 <= image.min() and image.max() <= 1.0  # no clipping: the SH fit is exact
    return image, normals, albedo, mask, sh


# ---------------------------------------------------------------------------------------- sections
def bench_sh(dev, a):
    n = a.size_img
    image, normals, albedo, mask, sh_true = sphere_scene(n)
    gi, gn, ga, gm = (dev.to(x) for x in (image, normals, albedo, mask))
    fit_sh_lighting(gi, gn, ga, gm)
    med, mn, sh_g = dev.time(lambda: fit_sh_lighting(gi, gn, ga, gm), a.repeats)
    t_cpu, sh_c = cpu_time(lambda: fit_sh_lighting(image, normals, albedo, mask), a.repeats)
    return {"pixels": int(n * n), "median_s": med, "min_s": mn, "cpu_median_s": t_cpu,
            "cpu_over_device": t_cpu / med, "max_abs_diff_vs_cpu": float(np.abs(dev.host(sh_g) - sh_c).max()),
            "max_abs_err_vs_true_light": float(np.abs(dev.host(sh_g) - sh_true).max())}


def bench_rtv(dev, a):
    n = a.size_img
    image = sphere_scene(n, seed=3)[0]
    gi = dev.to(image)
    rtv_smooth(gi, iterations=1)
    med, mn, out_g = dev.time(lambda: rtv_smooth(gi, iterations=4), a.repeats)
    res = {"pixels": int(n * n), "iterations": 4, "median_s": med, "min_s": mn,
           "median_s_per_megapixel": med / (n * n / 1e6)}
    if a.cpu_peers:
        t_cpu, out_c = cpu_time(lambda: rtv_smooth(image, iterations=4))
        res.update(cpu_s=t_cpu, cpu_over_device=t_cpu / med,
                   max_abs_diff_vs_cpu=float(np.abs(dev.host(out_g) - out_c).max()))
    return res


def bench_fine(dev, a):
    small = synthetic_scene(96)
    # exact Levenberg-Marquardt steps on both sides (the GPU path without cholespy solves every step
    # to its CG tolerance), so the CPU/GPU difference measures the device, not the step rule
    fine_stage(dev.to(small["image"]), dev.to(small["depth_blur"]), dev.to(small["mask"]), options=EXACT)
    s = synthetic_scene(a.size_fine)
    args = (dev.to(s["image"]), dev.to(s["depth_blur"]), dev.to(s["mask"]))
    med, mn, r = dev.time(lambda: fine_stage(*args, options=EXACT), max(a.repeats // 2, 1))
    m = s["mask"]
    n = dev.host(r.normals)

    def err(nn):
        return float(np.degrees(np.arccos(np.clip((nn * s["normals"]).sum(-1), -1, 1)))[m].mean())

    res = {"size": a.size_fine, "mask_pixels": int(m.sum()), "median_s": med, "min_s": mn,
           "timings": {k: float(v) for k, v in r.timings.items()}, "depth_stats": dict(r.depth_stats),
           "normal_error_deg": {"start": err(_depth_normals(s["depth_blur"])), "after": err(n)}}
    if a.cpu_peers:
        t_cpu, rc = cpu_time(lambda: fine_stage(s["image"], s["depth_blur"], s["mask"], options=EXACT))
        res.update(cpu_s_exact_steps=t_cpu, cpu_over_device=t_cpu / med,
                   max_abs_depth_diff_vs_cpu=float(np.abs(dev.host(r.depth) - rc.depth)[m].max()))
    return res


def bench_laplacian(dev, a):
    import scipy.sparse.linalg as spla

    v, f = grid_mesh(a.grid_k)
    rng = np.random.default_rng(0)
    h = np.sort(rng.choice(len(v), a.handles, replace=False))
    w = np.full(a.handles, 0.6)
    targets = [v[h] + 0.05 * rng.standard_normal((a.handles, 3)) for _ in range(a.repeats + 1)]
    gv = dev.to(v)
    vs, fs = grid_mesh(12)
    LaplacianDeformer(dev.to(vs), fs, [0, 5, 77], 0.6).deform(dev.to(vs[[0, 5, 77]]))  # warm the solver path
    t_setup, _, out = dev.time(lambda: LaplacianDeformer(gv, f, h, w).deform(dev.to(targets[0])), 1)
    D = LaplacianDeformer(gv, f, h, w)
    D.deform(dev.to(targets[0]))
    gts = iter([dev.to(t) for t in targets[1:]])  # new targets for every further solve
    med_s, min_s, _ = dev.time(lambda: D.deform(next(gts)), a.repeats)
    batch = dev.to(np.stack([targets[0]] * 16))
    med_b, _, _ = dev.time(lambda: D.deform(batch), max(a.repeats // 4, 1))
    # the SciPy peer on this machine's CPU: SuperLU of the same matrix
    A = D.factor.A
    A_cpu = A.get() if hasattr(A, "get") else A
    t0 = time.perf_counter()
    solve = spla.factorized(A_cpu.tocsc())
    rhs = np.zeros((len(v), 3))
    rhs[h] = w[:, None] * (targets[0] - v[h])
    x = np.stack([solve(rhs[:, c]) for c in range(3)], 1)
    t_scipy_setup = time.perf_counter() - t0
    t_scipy_solve, _ = cpu_time(lambda: np.stack([solve(rhs[:, c]) for c in range(3)], 1), 3)
    ref = v + x
    return {"vertices": int(len(v)), "handles": int(a.handles), "factor_method": D.factor.method,
            "setup_plus_first_solve_s": t_setup, "further_solve_median_s": med_s,
            "further_solve_min_s": min_s, "batch16_per_target_s": med_b / 16,
            "scipy_setup_plus_first_s": t_scipy_setup, "scipy_further_solve_s": t_scipy_solve,
            "further_solve_vs_scipy_further": t_scipy_solve / med_s,
            "rel_diff_vs_scipy": float(np.abs(dev.host(out) - ref).max() / np.abs(ref).max())}


def bench_raster(dev, a):
    from geomfit.kernels import raster as K

    v, f = grid_mesh(a.raster_k)
    S = a.size_raster
    vp = np.c_[(v[:, 0] * 0.45 + 0.5) * S, (0.5 - v[:, 1] * 0.45) * S, v[:, 2] * 100.0]
    gv, gf = dev.to(vp), dev.to(f)
    rasterize(gv, gf, S, S)
    med, mn, r = dev.time(lambda: rasterize(gv, gf, S, S), a.repeats * 4)
    K.rasterize_cpu(vp, f, S, S)
    t_cpu, rc = cpu_time(lambda: rasterize(vp, f, S, S), a.repeats * 4)
    same = float((dev.host(r.triangle_id) == rc.triangle_id).mean())
    return {"triangles": int(len(f)), "size": S, "median_s": med, "min_s": mn, "cpu_median_s": t_cpu,
            "cpu_over_device": t_cpu / med, "triangle_id_agreement": same}


def bench_fitting(dev, a):
    # the fitting tests' random model (here with the Surrey model's size) and posed random instances
    from test_fitting import HW, random_model, synth

    model = random_model(n=a.model_n, K=63, E=6)
    size = tuple(int(x) for x in HW)
    L = synth(model, a.batch)[0]
    gL = dev.to(L)
    fit_landmarks(model, gL[:64], size)
    med, mn, r = dev.time(lambda: fit_landmarks(model, gL, size), a.repeats)
    t_cpu, rc = cpu_time(lambda: fit_landmarks(model, L, size))
    rm_g, rm_c = dev.host(r.rmse_px), np.asarray(rc.rmse_px)
    return {"batch": int(a.batch), "model_vertices": int(a.model_n), "median_s": med, "min_s": mn,
            "fits_per_s": a.batch / med, "cpu_s": t_cpu, "cpu_fits_per_s": a.batch / t_cpu,
            "rmse_px_median": float(np.median(rm_g)), "cpu_rmse_px_median": float(np.median(rm_c)),
            "iterations_median": float(np.median(dev.host(r.iterations)))}


#: run order: quick sections first, the fine stage (many CG solves on the GPU) last
SECTIONS = {"sh": bench_sh, "raster": bench_raster, "fitting": bench_fitting, "laplacian": bench_laplacian,
            "rtv": bench_rtv, "fine": bench_fine}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--xp", choices=["cupy", "numpy"], default="cupy", help="array module under test")
    p.add_argument("--quick", action="store_true", help="small inputs (a dry run of the script)")
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    p.add_argument("--no-cpu-peers", dest="cpu_peers", action="store_false",
                   help="skip the expensive CPU runs (RTV, fine stage)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    a = p.parse_args(argv)
    q = a.quick
    a.size_img, a.size_fine, a.size_raster = (64, 96, 128) if q else (1024, 512, 512)
    a.grid_k, a.handles, a.raster_k = (30, 40, 20) if q else (228, 1000, 158)
    a.batch, a.model_n, a.repeats = (32, 400, 2) if q else (10000, 3448, 8)
    try:
        dev = Device(a.xp)
    except Exception as e:  # no CuPy or no GPU: say so, write nothing
        sys.exit(f"bench_gpu: cannot use {a.xp} ({type(e).__name__}: {e}); run with --xp numpy for a dry run")
    res = {"machine": {"xp": dev.name, "quick": q}, "environment": environment()}
    if dev.name == "cupy":
        cp = dev.xp
        props = cp.cuda.runtime.getDeviceProperties(0)
        res["machine"].update(gpu=props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
                              cupy=cp.__version__)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section, so a run cut off by its time limit keeps what it measured
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
        tmp.replace(out)

    for name in [s for s in SECTIONS if s in (a.only or SECTIONS)]:
        t = time.perf_counter()
        try:
            res[name] = SECTIONS[name](dev, a)
        except Exception as e:  # one section's failure is a result too; the others still run
            res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res[name]["section_wall_s"] = time.perf_counter() - t
        print(name, json.dumps(res[name], indent=1, default=float), flush=True)
        save()
    print("wrote", out)
    return res


if __name__ == "__main__":
    main()
