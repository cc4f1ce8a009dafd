"""Benchmark the end-to-end pipeline (per stage) and geomfit's rigid ICP against trimesh's ICP.

Run: GEOMFIT_DATA=../shared/data python benchmarks/bench_pipeline.py
Writes benchmarks/results/pipeline.json (medians over repeats).
"""
import argparse
import json
import os
import pathlib

import numpy as np

from _harness import Timer, write_results


def bench_reconstruct(data, repeats=3):
    from geomfit.data import resolve_model
    from geomfit.pipeline import reconstruct

    img = data / "images" / "image_0010.png"
    model = resolve_model(data / "sfm" / "sfm_shape_3448.bin")
    out = {}
    reconstruct(img, model=model, landmarks=str(img)[:-4] + ".pts", max_side=128)  # JIT warm-up
    for side in (256, 512):
        runs = []
        for _ in range(repeats):
            r = reconstruct(img, model=model, landmarks=str(img)[:-4] + ".pts", max_side=side)
            runs.append(r.timings)
        out[f"image_0010_max_side_{side}"] = {
            k: float(np.median([t[k] for t in runs])) for k in runs[0]} | {
            "landmark_rmse_px": r.diagnostics["landmark_rmse_px"], "fine_vertices": r.fine.n_vertices}
    from geomfit.landmarks import available_detectors, detect_landmarks
    from geomfit.photo import read_image

    if available_detectors()["dlib"]:
        im = read_image(img)
        detect_landmarks(im, "dlib")
        out["dlib_detect_1280x1024_s"] = Timer(repeats).run(lambda: detect_landmarks(im, "dlib")).median
    return out


def bench_icp(repeats=5):
    import trimesh
    from scipy.spatial.transform import Rotation

    from geomfit.metrics import rigid_icp, vertex_normals

    n = 150
    x, y = np.meshgrid(np.linspace(-100, 100, n), np.linspace(-100, 100, n))
    z = 60 * np.exp(-(x ** 2 + y ** 2) / 9800) + 6 * np.sin(x / 17) * np.cos(y / 23)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    f = np.concatenate([np.stack([idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()], 1),
                        np.stack([idx[:-1, :-1].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()], 1)])
    R = Rotation.from_euler("xyz", [3, -4, 2], degrees=True).as_matrix()
    t = np.array([2.0, -1.5, 3.0])
    rng = np.random.default_rng(0)
    xy = rng.uniform(-80, 80, (5000, 2))
    pts = np.c_[xy, 60 * np.exp(-(xy ** 2).sum(1) / 9800) + 6 * np.sin(xy[:, 0] / 17) * np.cos(xy[:, 1] / 23)]
    src = (pts - t) @ R
    nrm = vertex_normals(v, f)

    def err(Rest, test):
        return (float(np.degrees(Rotation.from_matrix(Rest @ R.T).magnitude())), float(np.linalg.norm(test - t)))

    res = {}
    for method in ("point_to_plane", "point_to_point"):
        tm = Timer(repeats).run(lambda: rigid_icp(src, v, target_normals=nrm, method=method, max_iter=100,
                                                  init=(np.eye(3), np.zeros(3))))
        r = tm.result
        res[f"geomfit_{method}"] = {"median_s": tm.median, "iterations": r.iterations,
                                    "rot_err_deg": err(r.rotation, r.translation)[0],
                                    "trans_err": err(r.rotation, r.translation)[1]}
    tm = Timer(repeats).run(lambda: trimesh.registration.icp(src, v, max_iterations=100, threshold=1e-7))
    M, _, cost = tm.result
    res["trimesh_icp_point_to_point"] = {"median_s": tm.median, "rot_err_deg": err(M[:3, :3], M[:3, 3])[0],
                                         "trans_err": err(M[:3, :3], M[:3, 3])[1]}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="ICP only, one repeat (a check that the script runs)")
    args = ap.parse_args()
    data = os.environ.get("GEOMFIT_DATA")
    repeats = 1 if args.quick else args.repeats
    out = {"icp_5000_points_on_22500_vertex_surface": bench_icp(repeats)}
    if not args.quick and data and pathlib.Path(data, "sfm", "sfm_shape_3448.bin").is_file():
        out["reconstruct"] = bench_reconstruct(pathlib.Path(data), repeats)
    elif not args.quick:
        print("GEOMFIT_DATA not set: pipeline timings skipped")
    print(json.dumps(out, indent=2, default=float))
    print("wrote", write_results("pipeline_quick" if args.quick else "pipeline", out))


if __name__ == "__main__":
    main()
