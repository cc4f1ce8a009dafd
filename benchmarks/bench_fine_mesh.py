"""Smoothness of the fine mesh on the photos: Loop subdivision against Phong tessellation and flat
midpoints (the scheme the medium mesh is refined with before the fine stage's depth change is
carried onto it, `geomfit.mesh.subdivide_for_view`).

Metric: mean angle (deg) between each vertex normal of fine.obj (trimesh's area-weighted normals) and
the normalised average of its neighbours' normals; lower = smoother.  Also the fine stage's mean depth
change (px) and the folded-triangle counts.  Run:
    GEOMFIT_DATA=../shared/data python benchmarks/bench_fine_mesh.py
Results: benchmarks/results/fine_mesh.json.
"""
import os
import pathlib

import numpy as np

from _harness import write_results
from geomfit.pipeline import reconstruct


def roughness(v, f):
    import trimesh

    m = trimesh.Trimesh(v, f, process=False)
    vn = np.asarray(m.vertex_normals)
    e = m.edges_unique
    acc = np.zeros_like(vn)
    np.add.at(acc, e[:, 0], vn[e[:, 1]])
    np.add.at(acc, e[:, 1], vn[e[:, 0]])
    acc /= np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
    return float(np.degrees(np.arccos(np.clip((acc * vn).sum(1), -1, 1))).mean())


def main():
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", "../shared/data"))
    photos = {"astronaut": ("skimage:astronaut", None)}
    if (data / "images" / "image_0010.png").exists():
        photos["image_0010"] = (str(data / "images" / "image_0010.png"), str(data / "images" / "image_0010.pts"))
    rows = {}
    for name, (img, pts) in photos.items():
        for scheme in ("loop", "phong", False):
            r = reconstruct(img, landmarks=pts, subdivision=scheme)
            v, f = np.asarray(r.fine.vertices), np.asarray(r.fine.faces)
            d = r.diagnostics
            rows.setdefault(name, {})[str(scheme)] = {
                "vertices": int(len(v)), "normal_roughness_deg": roughness(v, f),
                "fine_depth_change_mean_abs_px": d["fine_depth_change_px"]["mean_abs"],
                "folded_triangles": d["folded_triangles"]}
            print(name, scheme, rows[name][str(scheme)], flush=True)
    print("results in", write_results("fine_mesh", {"photos": rows}))


if __name__ == "__main__":
    main()
