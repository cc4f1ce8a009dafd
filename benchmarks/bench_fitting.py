"""Benchmark the coarse landmark fit against eos-py on the same machine and data.

Run: GEOMFIT_DATA=../shared/data python benchmarks/bench_fitting.py [--batch 1000] [--repeat 20] [--runs 3] [--jit]
Writes benchmarks/results/fitting.json.

Measured in one invocation: the compiled kernel (geomfit's default for NumPy input), the vectorised
array path (``geomfit.fitting._fit_landmarks(path="array")``, the previous implementation and the CuPy path) and eos-py's default
``fit_shape_and_pose``; each timing is the median of ``--repeat`` calls, repeated ``--runs`` times
(the summary is the median over runs). ``--jit`` also measures the first call in fresh processes:
with an empty Numba cache (compilation) and with a filled one (loading the cached kernels).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# small dense algebra: BLAS threads only add contention (measured 4x slower with threads on 2 cores)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from _harness import ROOT, Timer, median_time, tests_module, write_results  # noqa: E402
from geomfit.fitting import _fit_landmarks, fit_landmarks  # noqa: E402

load_sfm, read_pts = tests_module("_fit_helpers").load_sfm, tests_module("_fit_helpers").read_pts

H, W = 1024, 1280


def _array_path(model, L, size):
    """The vectorised NumPy/CuPy array path with fit_landmarks' defaults (the reference implementation)."""
    return _fit_landmarks(model, L, size, path="array", visible=None, w_id=1e-3, w_exp=1e-3, n_id=None,
                          n_exp=None, n_alternations=2, max_iter=50, ftol=1e-6, xtol=1e-8, gtol=1e-12,
                          w_init=1e-3, fast=True)


def median_wall_cpu(fn, repeat):
    """Median wall time and median CPU time of the process (all threads) per call."""
    t = Timer(repeat).run(fn)
    return t.median, t.cpu_median


def eos_runner(sfm_dir, pts):
    import eos

    d = str(sfm_dir) + "/"
    m = eos.morphablemodel.load_model(d + "sfm_shape_3448.bin")
    bs = eos.morphablemodel.load_blendshapes(d + "expression_blendshapes_3448.bin")
    mm = eos.morphablemodel.MorphableModel(m.get_shape_model(), bs, color_model=eos.morphablemodel.PcaModel(),
                                           vertex_definitions=None, texture_coordinates=m.get_texture_coordinates())
    lms = [eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(pts)]
    mapper = eos.core.LandmarkMapper(d + "ibug_to_sfm.txt")
    et = eos.morphablemodel.load_edge_topology(d + "sfm_3448_edge_topology.json")
    cl = eos.fitting.ContourLandmarks.load(d + "ibug_to_sfm.txt")
    mc = eos.fitting.ModelContour.load(d + "sfm_model_contours.json")
    return lambda: eos.fitting.fit_shape_and_pose(mm, lms, mapper, W, H, et, cl, mc)


FIRST_CALL = r"""
import importlib.util, time
spec = importlib.util.spec_from_file_location("_harness", {harness!r})
harness = importlib.util.module_from_spec(spec); spec.loader.exec_module(harness)
import numpy as np
from geomfit.fitting import fit_landmarks
load_sfm, read_pts = harness.tests_module("_fit_helpers").load_sfm, harness.tests_module("_fit_helpers").read_pts
model = load_sfm({sfm!r}); pts = read_pts({pts!r})
t = time.perf_counter(); fit_landmarks(model, pts, ({h}, {w})); t1 = time.perf_counter() - t
t = time.perf_counter(); fit_landmarks(model, np.stack([pts] * 16), ({h}, {w})); t2 = time.perf_counter() - t
print(t1, t2)
"""


def first_call(sfm_dir, pts_path):
    """First single and first batch call in fresh processes: empty Numba cache, then filled cache."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        code = FIRST_CALL.format(harness=str(pathlib.Path(__file__).with_name("_harness.py")), sfm=str(sfm_dir),
                                 pts=str(pts_path), h=H, w=W)
        for name in ("compile", "cached"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            t1, t2 = map(float, res.stdout.split()[-2:])
            out[name] = {"first_single_s": t1, "first_batch_s": t2}
    return out


def make_batch(pts, B):
    rng = np.random.default_rng(0)
    jitter = rng.normal(size=(B, 68, 2)) * 3.0
    ang = rng.uniform(-0.15, 0.15, B)
    c = pts.mean(0)
    rot = np.stack([np.c_[np.cos(ang), -np.sin(ang)], np.c_[np.sin(ang), np.cos(ang)]], 1)
    return (pts - c) @ np.swapaxes(rot, 1, 2) * rng.uniform(0.8, 1.2, B)[:, None, None] + c + jitter


def one_run(model, pts, batch, eos_fit, repeat):
    import numba

    r = {}
    r["geomfit_ms"] = 1e3 * median_time(lambda: fit_landmarks(model, pts, (H, W)), repeat)
    r["geomfit_with_mesh_ms"] = 1e3 * median_time(lambda: fit_landmarks(model, pts, (H, W)).projected, repeat)
    r["geomfit_xp_path_ms"] = 1e3 * median_time(lambda: _array_path(model, pts, (H, W)),
                                                max(3, repeat // 4))
    if eos_fit is not None:
        r["eos_ms"] = 1e3 * median_time(eos_fit, max(5, repeat // 4))
    B = batch.shape[0]
    nthr = numba.get_num_threads()
    # wall-clock throughput depends on what else runs on the machine; the CPU time per fit
    # (process CPU time of the call / B) does not, and bounds the throughput on free cores
    wall, cpu = median_wall_cpu(lambda: fit_landmarks(model, batch, (H, W)), 3)
    r["batch_fits_per_s"] = B / wall
    r["batch_cpu_ms_per_fit"] = 1e3 * cpu / B
    numba.set_num_threads(1)  # geomfit splits batches over numba.get_num_threads() threads
    try:
        wall, cpu = median_wall_cpu(lambda: fit_landmarks(model, batch, (H, W)), 3)
        r["batch_fits_per_s_1thread"] = B / wall
        r["batch_cpu_ms_per_fit_1thread"] = 1e3 * cpu / B
    finally:
        numba.set_num_threads(nthr)
    r["batch_xp_path_fits_per_s"] = B / median_time(lambda: _array_path(model, batch, (H, W)), 1)
    r["load_average"] = os.getloadavg()[0]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jit", action="store_true", help="also measure first-call (compile / cache load) cost")
    args = ap.parse_args()
    import numba

    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", ROOT.parent / "shared" / "data"))
    sfm_dir = data / "sfm"
    pts_path = data / "images" / "image_0010.pts"
    pts = read_pts(pts_path)
    model = load_sfm(sfm_dir)
    out = {"blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "numba_threads": numba.get_num_threads()}
    if args.jit:
        out["first_call"] = first_call(sfm_dir, pts_path)

    batch = make_batch(pts, args.batch)
    fit_landmarks(model, pts, (H, W))  # warm-up: model tables cached, kernels loaded
    fit_landmarks(model, batch[:16], (H, W))
    try:
        eos_fit = eos_runner(sfm_dir, pts)
    except ImportError:
        eos_fit = None
    runs = [one_run(model, pts, batch, eos_fit, args.repeat) for _ in range(args.runs)]
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}

    res = fit_landmarks(model, pts, (H, W))
    out["single"] = {"geomfit_ms": med["geomfit_ms"], "geomfit_with_mesh_ms": med["geomfit_with_mesh_ms"],
                     "geomfit_xp_path_ms": med["geomfit_xp_path_ms"], "iterations": int(res.iterations),
                     "rmse_px": res.rmse_px, "converged": bool(res.converged)}
    if eos_fit is not None:
        out["single"].update(eos_ms=med["eos_ms"], speedup_vs_eos=med["eos_ms"] / med["geomfit_ms"],
                             speedup_vs_eos_with_mesh=med["eos_ms"] / med["geomfit_with_mesh_ms"],
                             speedup_vs_eos_per_run=[r["eos_ms"] / r["geomfit_ms"] for r in runs])
    rb = fit_landmarks(model, batch, (H, W))
    out["batch_cpu"] = {"B": args.batch, "fits_per_s": med["batch_fits_per_s"],
                        "fits_per_s_1thread": med["batch_fits_per_s_1thread"],
                        "cpu_ms_per_fit": med["batch_cpu_ms_per_fit"],
                        "cpu_ms_per_fit_1thread": med["batch_cpu_ms_per_fit_1thread"],
                        "xp_path_fits_per_s": med["batch_xp_path_fits_per_s"],
                        "converged_fraction": float(rb.converged.mean()),
                        "iterations_median": float(np.median(rb.iterations)),
                        "rmse_px_median": float(np.median(rb.rmse_px))}
    out["runs"] = runs
    try:
        import cupy as cp  # noqa: F401

        from geomfit.backend import cupy_or_none

        if cupy_or_none() is not None:
            gb = cp.asarray(batch)
            fit_landmarks(model, gb, (H, W))
            cp.cuda.Device().synchronize()

            def run():
                r = fit_landmarks(model, gb, (H, W))
                cp.cuda.Device().synchronize()
                return r

            t_g = median_time(run, 5)
            out["batch_gpu"] = {"B": args.batch, "seconds": t_g, "fits_per_s": args.batch / t_g}
    except ImportError:
        pass

    print(json.dumps(out, indent=2, default=float))
    print("wrote", write_results("fitting", out))


if __name__ == "__main__":
    main()
