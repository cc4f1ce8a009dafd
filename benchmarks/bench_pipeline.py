"""Benchmark the end-to-end pipeline (per stage) and geomfit's rigid ICP against trimesh's ICP.

Run: GEOMFIT_DATA=../shared/data python benchmarks/bench_pipeline.py
Writes benchmarks/results/pipeline.json (medians over repeats).
"""
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
            k: statistics.median(t[k] for t in runs) for k in runs[0]} | {
            "landmark_rmse_px": r.diagnostics["landmark_rmse_px"], "fine_vertices": r.fine.n_vertices}
    from geomfit.landmarks import available_detectors, detect_landmarks
    from geomfit.photo import read_image

    if available_detectors()["dlib"]:
        im = read_image(img)
        detect_landmarks(im, "dlib")
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            detect_landmarks(im, "dlib")
            ts.append(time.perf_counter() - t)
        out["dlib_detect_1280x1024_s"] = statistics.median(ts)
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
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = rigid_icp(src, v, target_normals=nrm, method=method, max_iter=100, init=(np.eye(3), np.zeros(3)))
            ts.append(time.perf_counter() - t0)
        res[f"geomfit_{method}"] = {"median_s": statistics.median(ts), "iterations": r.iterations,
                                    "rot_err_deg": err(r.rotation, r.translation)[0],
                                    "trans_err": err(r.rotation, r.translation)[1]}
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        M, _, cost = trimesh.registration.icp(src, v, max_iterations=100, threshold=1e-7)
        ts.append(time.perf_counter() - t0)
    res["trimesh_icp_point_to_point"] = {"median_s": statistics.median(ts), "rot_err_deg": err(M[:3, :3], M[:3, 3])[0],
                                         "trans_err": err(M[:3, :3], M[:3, 3])[1]}
    return res


def main():
    data = os.environ.get("GEOMFIT_DATA")
    out = {"icp_5000_points_on_22500_vertex_surface": bench_icp()}
    if data and pathlib.Path(data, "sfm", "sfm_shape_3448.bin").is_file():
        out["reconstruct"] = bench_reconstruct(pathlib.Path(data))
    else:
        print("GEOMFIT_DATA not set: pipeline timings skipped")
    dst = ROOT / "benchmarks" / "results" / "pipeline.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
