"""Benchmark the coarse landmark fit against eos-py on the same machine and data.

Run: GEOMFIT_DATA=../shared/data python benchmarks/bench_fitting.py [--batch 1000] [--repeat 20]
Writes benchmarks/results/fitting.json.
"""
import argparse
import json
import os
import pathlib
import platform
import sys
import time

# small dense algebra: BLAS threads only add contention (measured 4x slower with threads on 2 cores)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from geomfit.fitting import fit_landmarks  # noqa: E402

from _fit_helpers import load_sfm, read_pts  # noqa: E402


def median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", ROOT.parent / "shared" / "data"))
    sfm_dir = data / "sfm"
    pts = read_pts(data / "images" / "image_0010.pts")
    h, w = 1024, 1280
    model = load_sfm(sfm_dir)
    out = {"machine": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
           "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
           "load_average_at_start": os.getloadavg()}

    # -- single photo ------------------------------------------------------------------------
    fit_landmarks(model, pts, (h, w))  # warm-up (model preparation is cached)
    t_ours, _ = median_time(lambda: fit_landmarks(model, pts, (h, w)), args.repeat)
    res = fit_landmarks(model, pts, (h, w))
    out["single"] = {"geomfit_ms": t_ours * 1e3, "iterations": int(res.iterations), "rmse_px": res.rmse_px,
                     "converged": bool(res.converged)}
    t_full, _ = median_time(lambda: fit_landmarks(model, pts, (h, w)).projected, args.repeat)
    out["single"]["geomfit_with_mesh_ms"] = t_full * 1e3
    try:
        import eos

        from test_fitting_eos import eos_fit  # noqa: F401

        d = str(sfm_dir) + "/"
        m = eos.morphablemodel.load_model(d + "sfm_shape_3448.bin")
        bs = eos.morphablemodel.load_blendshapes(d + "expression_blendshapes_3448.bin")
        mm = eos.morphablemodel.MorphableModel(m.get_shape_model(), bs, color_model=eos.morphablemodel.PcaModel(),
                                               vertex_definitions=None,
                                               texture_coordinates=m.get_texture_coordinates())
        lms = [eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(pts)]
        mapper = eos.core.LandmarkMapper(d + "ibug_to_sfm.txt")
        et = eos.morphablemodel.load_edge_topology(d + "sfm_3448_edge_topology.json")
        cl = eos.fitting.ContourLandmarks.load(d + "ibug_to_sfm.txt")
        mc = eos.fitting.ModelContour.load(d + "sfm_model_contours.json")
        t_eos, _ = median_time(lambda: eos.fitting.fit_shape_and_pose(mm, lms, mapper, w, h, et, cl, mc),
                               max(5, args.repeat // 2))
        out["single"]["eos_ms"] = t_eos * 1e3
        out["single"]["speedup_vs_eos"] = t_eos / t_ours
        out["single"]["speedup_vs_eos_with_mesh"] = t_eos / t_full
    except ImportError:
        pass

    # -- batch -------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    B = args.batch
    jitter = rng.normal(size=(B, 68, 2)) * 3.0
    ang = rng.uniform(-0.15, 0.15, B)
    c = pts.mean(0)
    rot = np.stack([np.c_[np.cos(ang), -np.sin(ang)], np.c_[np.sin(ang), np.cos(ang)]], 1)
    batch = (pts - c) @ np.swapaxes(rot, 1, 2) * rng.uniform(0.8, 1.2, B)[:, None, None] + c + jitter
    fit_landmarks(model, batch[:8], (h, w))
    t_b, ts = median_time(lambda: fit_landmarks(model, batch, (h, w)), max(3, args.repeat // 5))
    rb = fit_landmarks(model, batch, (h, w))
    out["batch_cpu"] = {"B": B, "seconds": t_b, "fits_per_s": B / t_b, "converged_fraction": float(rb.converged.mean()),
                        "iterations_median": float(np.median(rb.iterations)),
                        "rmse_px_median": float(np.median(rb.rmse_px))}
    try:
        import cupy as cp  # noqa: F401

        from geomfit.backend import cupy_or_none

        if cupy_or_none() is not None:
            gb = cp.asarray(batch)
            fit_landmarks(model, gb, (h, w))
            cp.cuda.Device().synchronize()

            def run():
                r = fit_landmarks(model, gb, (h, w))
                cp.cuda.Device().synchronize()
                return r

            t_g, _ = median_time(run, 5)
            out["batch_gpu"] = {"B": B, "seconds": t_g, "fits_per_s": B / t_g}
    except ImportError:
        pass

    print(json.dumps(out, indent=2))
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "fitting.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
