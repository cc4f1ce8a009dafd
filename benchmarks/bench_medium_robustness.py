"""Benchmark: is the medium stage safe under realistic landmarks? (issue 17)

Synthetic faces with known shape (tests/medium_synth.py): Surrey-model identity + expression sampled,
posed at yaw 0-45 degrees (sign alternating, pitch within +-5 degrees) in a 256 px image, 68 landmarks
(jaw contour on the silhouette as an annotator places it) with Gaussian noise of 0-3 px. Each face is
fitted by ``fit_landmarks`` (coarse), then deformed by ``medium_stage`` with ``method="paper"`` (Jin et
al. 2021, Sec. 3.3 as written) and ``method="robust"`` (geomfit's default).

Reported per (yaw, noise): aligned 3D error (mm, after a similarity fit of the whole mesh) at the 49
inner landmark vertices and over all vertices, for coarse / paper / robust, and the number of folded
triangles (normal turned > 60 degrees from the coarse mesh).

Out of span: faces with a local change the model cannot express (nose tip 5 mm lower, chin 6 mm
lower), 0.5 px noise; error over the changed region (offset weight > 0.3).

Run: GEOMFIT_DATA=/path/to/data python benchmarks/bench_medium_robustness.py [--reps 3] [--grid] [--quick]
[--out PATH]. Writes benchmarks/results/medium_robustness.json (``--quick``: yaw 0 / 30, noise 0 / 2.5 px,
one face each, two out-of-span faces, into medium_robustness_quick.json; ``--out``: PATH).
"""
from __future__ import annotations

import argparse

import numpy as np

from _harness import RESULTS, Timer, tests_module, write_results  # noqa: E402  (sibling module)

from geomfit.data import resolve_model  # noqa: E402
from geomfit.fitting import fit_landmarks  # noqa: E402
from geomfit.laplacian import medium_stage  # noqa: E402

_ms = tests_module("medium_synth")  # the tests' synthetic faces
face_landmarks, folded_triangles, local_offset = _ms.face_landmarks, _ms.folded_triangles, _ms.local_offset
make_camera, sample_face, shape_errors = _ms.make_camera, _ms.sample_face, _ms.shape_errors

YAWS = (0, 15, 30, 45)
NOISES = (0.0, 0.5, 1.5, 2.5, 3.0)


def make_cases(model, reps, seed=0, yaws=YAWS, noises=NOISES):
    rng = np.random.default_rng(seed)
    cases = []
    for yaw in yaws:
        for sig in noises:
            for rep in range(reps):
                v = sample_face(model, rng)
                cam = make_camera((1 if rep % 2 == 0 else -1) * yaw, rng.uniform(-5, 5), vertices=v)
                lm = face_landmarks(model, v, cam) + sig * rng.standard_normal((68, 2))
                co = fit_landmarks(model, lm, (256, 256))
                cases.append(dict(yaw=yaw, noise=sig, truth=v, lm=lm, coarse=co))
    return cases


def out_of_span_cases(model, n=4, seed=100, noise=0.5):
    rng = np.random.default_rng(seed)
    out = []
    yaws = [0, 20, -30, 40, -10, 30]
    for i in range(n):
        v0 = sample_face(model, rng)
        nose = v0[model.landmarks[34]]
        chin = v0[model.landmarks[58]] + np.array([0.0, -15.0, 0.0])
        v = local_offset(v0, nose, 12.0, [0.0, -5.0, 0.0])
        v = local_offset(v, chin, 18.0, [0.0, -6.0, 0.0])
        g = lambda c, r: np.exp(-((v0 - c) ** 2).sum(1) / (2 * r ** 2))  # noqa: E731
        region = np.flatnonzero((g(nose, 12.0) > 0.3) | (g(chin, 18.0) > 0.3))
        cam = make_camera(yaws[i % len(yaws)], 0.0, vertices=v)
        lm = face_landmarks(model, v, cam) + noise * rng.standard_normal((68, 2))
        out.append(dict(yaw=yaws[i % len(yaws)], noise=noise, truth=v, lm=lm, region=region,
                        coarse=fit_landmarks(model, lm, (256, 256))))
    return out


def evaluate(model, cases, **kw):
    rows = []
    for c in cases:
        co = np.asarray(c["coarse"].vertices)
        tm = Timer(1).run(lambda: medium_stage(c["coarse"], c["lm"], landmark_ids=np.arange(1, 69), **kw))
        res, dt = tm.result, tm.runs[0]
        reg = c.get("region")
        ec = shape_errors(model, co, c["truth"], reg)
        em = shape_errors(model, np.asarray(res.vertices), c["truth"], reg)
        rows.append(dict(yaw=c["yaw"], noise=c["noise"], coarse=ec, medium=em, seconds=dt,
                         folds=folded_triangles(co, np.asarray(res.vertices), model.faces),
                         noise_estimate=res.noise_px))
    return rows


def summary(rows, key="inner"):
    r = np.array([x["medium"][key] / x["coarse"][key] for x in rows])
    return dict(mean_ratio=float(r.mean()), max_ratio=float(r.max()), folds=int(sum(x["folds"] for x in rows)),
                worst=dict(yaw=rows[int(r.argmax())]["yaw"], noise=rows[int(r.argmax())]["noise"]))


def table(rows_paper, rows_robust):
    lines = ["| yaw | noise px | coarse inner / full (mm) | paper inner / full | robust inner / full | "
             "worst robust/coarse (inner) | folds paper / robust |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(x["yaw"], x["noise"]) for x in rows_paper})
    for yaw, sig in keys:
        sel = [i for i, x in enumerate(rows_paper) if (x["yaw"], x["noise"]) == (yaw, sig)]
        m = lambda rows, st, k: np.mean([rows[i][st][k] for i in sel])  # noqa: E731
        worst = max(rows_robust[i]["medium"]["inner"] / rows_robust[i]["coarse"]["inner"] for i in sel)
        lines.append(f"| {yaw} | {sig} | {m(rows_paper, 'coarse', 'inner'):.2f} / {m(rows_paper, 'coarse', 'full'):.2f} "
                     f"| {m(rows_paper, 'medium', 'inner'):.2f} / {m(rows_paper, 'medium', 'full'):.2f} "
                     f"| {m(rows_robust, 'medium', 'inner'):.2f} / {m(rows_robust, 'medium', 'full'):.2f} "
                     f"| {worst:.3f} | {sum(rows_paper[i]['folds'] for i in sel)} / "
                     f"{sum(rows_robust[i]['folds'] for i in sel)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grid", action="store_true", help="also sweep shrink x handle_scale x energy x shrinkage")
    ap.add_argument("--only-grid", default="", help="comma list of 'energy:shrinkage' to sweep (default all)")
    ap.add_argument("--quick", action="store_true", help="yaw 0 / 30, noise 0 / 2.5 px, one face each, two "
                    "out-of-span faces (a check that the script runs; writes medium_robustness_quick.json)")
    ap.add_argument("--out", default=None, help="results path (default benchmarks/results/medium_robustness.json)")
    a = ap.parse_args()
    yaws, noises, reps, n_oos = (YAWS, NOISES, a.reps, 4) if not a.quick else ((0, 30), (0.0, 2.5), 1, 2)
    model = resolve_model("sfm")
    built = Timer(1).run(lambda: (make_cases(model, reps, yaws=yaws, noises=noises), out_of_span_cases(model, n_oos)))
    cases, oos = built.result
    print(f"{len(cases)} cases + {len(oos)} out-of-span built in {built.median:.0f} s", flush=True)
    out = {"reps": reps, "yaws": yaws, "noises": noises}
    res = {}
    for name, kw in (("paper", dict(method="paper")), ("robust", dict(method="robust"))):
        rows = evaluate(model, cases, **kw)
        orows = evaluate(model, oos, **kw)
        res[name] = dict(rows=rows, summary=summary(rows), summary_full=summary(rows, "full"),
                         out_of_span=[x["medium"]["region"] / x["coarse"]["region"] for x in orows],
                         out_of_span_inner=[x["medium"]["inner"] / x["coarse"]["inner"] for x in orows],
                         out_of_span_folds=int(sum(x["folds"] for x in orows)),
                         median_seconds=float(np.median([x["seconds"] for x in rows])))
        print(name, res[name]["summary"], "full:", res[name]["summary_full"],
              "out-of-span region ratio:", np.round(res[name]["out_of_span"], 3), flush=True)
    out.update(res)
    out["table"] = table(res["paper"]["rows"], res["robust"]["rows"])
    print(out["table"])
    if a.grid:
        grid = []
        combos = (("biharmonic", "soft"), ("biharmonic", "garrote"), ("laplacian", "soft"))
        if a.only_grid:
            combos = [tuple(x.split(":")) for x in a.only_grid.split(",")]
        for energy, shr in combos:
            for hs in (3.0, 13.0, 50.0):
                for k in ((1.5, 2.0, 2.5) if shr == "soft" else (2.0, 2.5, 3.0)):
                    kw = dict(method="robust", energy=energy, handle_scale=hs, shrink=k, shrinkage=shr)
                    rows = evaluate(model, cases, **kw)
                    orows = evaluate(model, oos, **kw)
                    g = dict(energy=energy, shrinkage=shr, handle_scale=hs, shrink=k, **summary(rows),
                             out_of_span=[round(x["medium"]["region"] / x["coarse"]["region"], 4) for x in orows])
                    grid.append(g)
                    print(g, flush=True)
        out["grid"] = grid
    dst = write_results("medium_robustness", _plain(out),
                        a.out or RESULTS / ("medium_robustness_quick.json" if a.quick else "medium_robustness.json"))
    print("wrote", dst)


def _plain(x):
    """JSON-ready copy (NumPy scalars and arrays to Python)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.tolist() if hasattr(x, "tolist") else x


if __name__ == "__main__":
    main()
