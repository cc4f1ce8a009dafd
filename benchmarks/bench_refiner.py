"""Benchmark of the learned depth refiner (Galteri et al., CVIU 2019) on this machine.

Sections (each stored in benchmarks/results/refiner.json):

1. ``calibration``: high-frequency depth amplitude of the real james scan on skin versus the
   synthetic ground truth (Surrey-model mean with and without the procedural detail).
2. ``linear_probe``: a ridge regression from the inputs to the depth change, as a reference.
3. ``heldout``: depth MAE (mm, face mask) of the shipped ``default`` refiner on the held-out split of
   its training pairs (never trained on) versus the coarse input; target ratio <= 0.7.
3. ``compare``: progressive CGAN vs the pix2pix baseline trained for the same wall time at the same
   time on the same pairs (``--compare A.pt B.pt``, histories ``A.json B.json`` from
   ``geomfit train-refiner --history``), evaluated on the same held-out split.
4. ``curves``: training curves PNG (benchmarks/results/refiner_curves.png).
5. ``refine_512``: ``Refiner.refine`` wall time at 512 x 512 (median of 5), with its parts, and a
   peer measured in the same run (rendering the same scan's depth map with geomfit's rasterizer).
6. ``james``: do-no-harm on a scene rendered from the james scan (frontal, textured with its own
   photo texture, SH light, noise): input = the scan's depth blurred (Gaussian, 2 px); mean normal
   angle error against the scan for the input, the refined depth (with and without the photometric
   safeguard; also for ``--previous CKPT``, an earlier default) and the classical fine stage.
7. ``analysis``: what limits the held-out target: the coarse error left after removing, per face,
   the best constant / plane / plane + depth scale / quadratic (oracles that see the ground truth),
   the coarse error of the same faces fitted from noise-free landmarks, and the linear probe at
   32 x 32 with ``--extra-pairs`` added to the training split; and the refiners on held-out pairs
   whose input is the blurred ground truth (an input that needs no change).

Run: ``GEOMFIT_DATA=... python benchmarks/bench_refiner.py --pairs PAIRS.npz [--default CKPT]
[--compare PROG.pt P2P.pt PROG.json P2P.json] [--history DEFAULT.json] [--previous OLD.pt]
[--extra-pairs MORE.npz]``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np
from _harness import RESULTS, environment


def _load():
    return os.getloadavg()[0]


def median_time(f, repeats=5):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), [round(x, 4) for x in ts]


# ------------------------------------------------------------------------------------------------
def james_scene(size=256, blur_px=2.0, seed=0):
    """The james scan in the model frame (mm), rendered frontally: depth, mask, image, blurred input."""
    import cv2
    import trimesh

    from geomfit.camera import ScaledOrthographic
    from geomfit.data import resolve_model
    from geomfit.learned.refiner_data import _ljson_points, _similarity
    from geomfit.photo import srgb_to_linear
    from geomfit.render import depth_normals, interpolate, rasterize
    from geomfit.sh import shade

    data = pathlib.Path(os.environ["GEOMFIT_DATA"])
    mdl = resolve_model("sfm")
    mean = np.asarray(mdl.mean, dtype=np.float64)
    m = trimesh.load(str(data / "scans/james/james.obj"), process=False, force="mesh")
    v = np.asarray(m.vertices, dtype=np.float64)
    f = np.asarray(m.faces, dtype=np.int64)
    uv = np.asarray(m.visual.uv, dtype=np.float64)
    pts = np.asarray(_ljson_points(data / "scans/james/james.ljson"))
    nums = [k for k in sorted(mdl.landmarks) if k >= 18]
    R, t, s = _similarity(pts[np.asarray(nums) - 1], mean[[mdl.landmarks[k] for k in nums]])
    v = s * v @ R.T + t
    lo, hi = mean[:, :2].min(0), mean[:, :2].max(0)
    sc = 0.85 * size / (hi - lo).max()
    cam = ScaledOrthographic(sc, np.eye(3), size / 2 - sc * (lo + hi) / 2)
    ras = rasterize(cam.to_screen(v, size), f, size, size)
    d = np.asarray(ras.depth)
    # keep the face: inside the model mean's silhouette (no hair, ears, neck)
    mm = np.isfinite(np.asarray(rasterize(cam.to_screen(mean, size), np.asarray(mdl.faces), size, size).depth))
    mask = np.isfinite(d) & mm
    tex = cv2.cvtColor(cv2.imread(str(data / "scans/james/james.jpg")), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    puv = interpolate(ras, uv)
    th, tw = tex.shape[:2]
    alb = cv2.remap(tex, (puv[..., 0] * tw - 0.5).astype(np.float32), ((1 - puv[..., 1]) * th - 0.5).astype(np.float32),
                    cv2.INTER_LINEAR)
    alb = srgb_to_linear(np.clip(alb, 0, 1).astype(np.float64))
    n = np.asarray(depth_normals(np.where(mask, d, np.nan)))
    sh = np.array([0.9 / 0.282095, 0.2, 0.45, 0.25, 0.02, 0.03, -0.05, 0.02, 0.03])
    rng = np.random.default_rng(seed)
    img = np.clip(alb * np.clip(shade(np.nan_to_num(n), sh), 0, None)[..., None] + rng.normal(0, 0.01, alb.shape), 0, 1)
    img = np.where(mask[..., None], img, 0.0)
    dd = np.where(mask, d, 0.0)
    k = int(2 * np.ceil(3 * blur_px) + 1)
    num = cv2.GaussianBlur(dd, (k, k), blur_px)
    den = cv2.GaussianBlur(mask.astype(np.float64), (k, k), blur_px)
    blurred = np.where(mask, num / np.maximum(den, 1e-9), np.nan)
    return {"depth": np.where(mask, d, np.nan), "mask": mask, "image": img, "input": blurred, "mm_per_px": 1 / sc}


def normal_error_deg(depth, gt, mask, erode=3):
    import cv2

    from geomfit.render import depth_normals

    inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * erode + 1,) * 2, np.uint8)) > 0
    a = np.asarray(depth_normals(np.where(mask, depth, np.nan)))[inner]
    b = np.asarray(depth_normals(gt))[inner]
    return float(np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1))).mean())


def bench_james(refiner, with_fine=True, previous=None):
    from geomfit.learned.refiner import photometric_residual

    sc = james_scene(256)
    gt, m, img, inp = sc["depth"], sc["mask"], sc["image"], sc["input"]
    out = {"size": 256, "blur_px": 2.0, "pixels": int(m.sum()),
           "input_normal_error_deg": normal_error_deg(inp, gt, m),
           "input_photometric_residual": photometric_residual(inp, m, img),
           "scan_photometric_residual": photometric_residual(gt, m, img)}
    t = time.perf_counter()
    ref = refiner.refine(inp, m, img)
    out["refine_s"] = time.perf_counter() - t
    out["safeguard"] = refiner.last_safeguard
    out["refined_normal_error_deg"] = normal_error_deg(ref, gt, m)
    out["refined_depth_mae_mm"] = float(np.abs(ref - gt)[m].mean() * sc["mm_per_px"])
    out["input_depth_mae_mm"] = float(np.abs(inp - gt)[m].mean() * sc["mm_per_px"])
    out["mean_abs_change_px"] = float(np.abs(ref - inp)[m].mean())
    raw = refiner.refine(inp, m, img, safeguard=False)
    out["network_only"] = {"normal_error_deg": normal_error_deg(raw, gt, m),
                           "depth_mae_mm": float(np.abs(raw - gt)[m].mean() * sc["mm_per_px"]),
                           "mean_abs_change_px": float(np.abs(raw - inp)[m].mean())}
    if previous is not None:
        from geomfit.learned.refiner import Refiner

        old = Refiner.load(previous)
        po = old.refine(inp, m, img)
        out["previous"] = {"checkpoint": pathlib.Path(previous).name, "normal_error_deg": normal_error_deg(po, gt, m),
                           "safeguard": old.last_safeguard,
                           "network_only_normal_error_deg": normal_error_deg(old.refine(inp, m, img, safeguard=False),
                                                                             gt, m)}
    if with_fine:
        from geomfit.fine import fine_stage

        t = time.perf_counter()
        fr = fine_stage(img, np.where(m, inp, 0.0), m)
        out["fine_stage_s"] = time.perf_counter() - t
        fd = np.asarray(fr.depth)
        out["fine_stage_normal_error_deg"] = normal_error_deg(fd, gt, m)
    return out


def bench_refine_512(refiner):
    from geomfit.learned.refiner_data import decode_depth_delta, encode_depth
    from geomfit.render import rasterize

    sc = james_scene(512)
    d, m, img = sc["input"], sc["mask"], sc["image"]
    refiner.refine(d, m, img)  # warm-up
    total, runs = median_time(lambda: refiner.refine(d, m, img))
    enc, _ = median_time(lambda: encode_depth(d, m, img, refiner.resolution))
    x, mn, fr = encode_depth(d, m, img, refiner.resolution)
    dec, _ = median_time(lambda: decode_depth_delta(x[0], mn, fr, d.shape))
    peer, _ = median_time(lambda: james_scene(512))
    return {"size": 512, "median_s": total, "runs_s": runs, "encode_s": enc, "decode_s": dec,
            "peer_james_scene_render_s": peer, "target_s": 2.0, "met": total <= 2.0}


def eval_checkpoint(path, test):
    from geomfit.learned.refiner import Refiner, evaluate

    r = Refiner.load(path)
    return evaluate(r.G, test.downsample(r.resolution), r.config, None, r.kind)


def linear_probe(pairs, resolutions=(8, 16), lam=10.0):
    """Ridge regression from the flattened input channels to the depth change (a reference for how much
    the inputs predict): ratio of its held-out depth MAE to the coarse input's, per resolution."""
    out = {}
    for r in resolutions:
        tr, te = pairs.downsample(r).split(0.1, 0)

        def feats(S, ch):
            return np.concatenate([S.x[:, ch].reshape(len(S), -1).astype(np.float64), np.ones((len(S), 1))], 1)

        def mae(pred, S):
            m = S.mask
            e = (np.abs(pred - S.y[:, 0].astype(float)) * m).reshape(len(S), -1).sum(1)
            return float(np.mean(e / np.maximum(m.reshape(len(S), -1).sum(1), 1) * S.mm_per_unit))

        base = mae(te.x[:, 0].astype(float), te)
        for name, ch in (("DCE", [0, 1, 2]), ("DCE+RGB", [0, 1, 2, 3, 4, 5])):
            A = feats(tr, ch)
            B = (tr.y[:, 0].astype(float) - tr.x[:, 0].astype(float)).reshape(len(tr), -1)
            Wt = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ B)
            pred = te.x[:, 0].astype(float) + (feats(te, ch) @ Wt).reshape(-1, r, r)
            out[f"{name}_{r}"] = {"mae_mm": mae(pred, te), "coarse_mae_mm": base, "ratio": mae(pred, te) / base,
                                  "ridge_lambda": lam}
    return out


def _masked_mae_mm(pred, S):
    m = S.mask
    e = (np.abs(pred - S.y[:, 0].astype(float)) * m).reshape(len(S), -1).sum(1)
    return float(np.mean(e / np.maximum(m.reshape(len(S), -1).sum(1), 1) * S.mm_per_unit))


def error_decomposition(test):
    """Oracles on the held-out pairs: the coarse depth error left after removing, per face, the best
    (least-squares, using the ground truth) constant, plane, plane + depth scale, quadratic + scale."""
    r = test.resolution
    jj, ii = np.meshgrid(np.linspace(-1, 1, r), np.linspace(-1, 1, r))
    bases = {"constant": lambda x0: [np.ones_like(x0)],
             "plane": lambda x0: [np.ones_like(x0), jj, ii],
             "plane_and_scale": lambda x0: [np.ones_like(x0), jj, ii, x0],
             "quadratic_and_scale": lambda x0: [np.ones_like(x0), jj, ii, x0, jj * jj, ii * ii, ii * jj]}
    base = _masked_mae_mm(test.x[:, 0].astype(float), test)
    out = {"resolution": r, "n": len(test), "coarse_mae_mm": base}
    for name, cols in bases.items():
        preds = []
        for k in range(len(test)):
            m = test.mask[k]
            x0 = test.x[k, 0].astype(float)
            A = np.stack([c[m] for c in cols(x0)], 1)
            w = np.linalg.lstsq(A, test.y[k, 0].astype(float)[m] - x0[m], rcond=None)[0]
            p = x0.copy()
            p[m] += A @ w
            preds.append(p)
        mae = _masked_mae_mm(np.stack(preds), test)
        out[f"after_best_{name}"] = {"mae_mm": mae, "ratio": mae / base}
    return out


def landmark_noise_effect(n=256, seed=7, r=32):
    """Coarse-input MAE of the same faces fitted from noisy (3 % IOD) and noise-free landmarks."""
    from geomfit.learned.refiner_data import make_synthetic_pairs

    out = {"n": n, "seed": seed, "resolution": r}
    for noise in (0.03, 0.0):
        P = make_synthetic_pairs(n, 64, seed=seed, landmark_noise=noise).downsample(r)
        out[f"landmark_noise_{noise}"] = {"coarse_mae_mm": _masked_mae_mm(P.x[:, 0].astype(float), P),
                                          **{k: v for k, v in error_decomposition(P).items()
                                             if k == "after_best_plane"}}
    return out


def blurred_inputs(checkpoints, n=160, seed=3, r=32):
    """Held-out pairs whose coarse input is the ground truth blurred (never trained on): does a refiner
    leave an input that is already right alone? Depth MAE of each refiner versus the input's."""
    from geomfit.learned.refiner import Refiner, evaluate
    from geomfit.learned.refiner_data import make_synthetic_pairs

    P = make_synthetic_pairs(n, 64, seed=seed, blurred_fraction=1.0).downsample(r)
    out = {"n": n, "seed": seed, "resolution": r}
    for name, path in checkpoints.items():
        ref = Refiner.load(path)
        out[name] = evaluate(ref.G, P, ref.config, None, ref.kind)
    return out


def linear_probe_more(pairs, extra, r=32, lams=(10.0, 100.0, 1000.0), sizes=(0, 2000, None)):
    """Ridge probe at r x r (primal normal equations) with more synthetic pairs in the training split."""
    from geomfit.learned.refiner_data import RefinerPairs

    tr, te = pairs.downsample(r).split(0.1, 0)
    ex = extra.downsample(r) if extra is not None else None
    base = _masked_mae_mm(te.x[:, 0].astype(float), te)
    out = {"resolution": r, "coarse_mae_mm": base}

    def feats(x, ch):
        f = x[:, ch].astype(np.float32).reshape(len(x), -1)
        return np.concatenate([f, np.ones((len(x), 1), np.float32)], 1)

    for size in sizes:
        if ex is None and size != 0:
            continue
        k = len(ex) if (ex is not None and size is None) else int(size or 0)
        S = tr if k == 0 else RefinerPairs(np.concatenate([tr.x, ex.x[:k]]), np.concatenate([tr.y, ex.y[:k]]),
                                           np.concatenate([tr.mask, ex.mask[:k]]),
                                           np.concatenate([tr.mm_per_unit, ex.mm_per_unit[:k]]))
        B = (S.y[:, 0].astype(np.float32) - S.x[:, 0].astype(np.float32)).reshape(len(S), -1)
        for name, ch in (("D", [0]), ("DCE", [0, 1, 2]), ("DCE+RGB", [0, 1, 2, 3, 4, 5])):
            A, At = feats(S.x, ch), feats(te.x, ch)
            G, AB = (A.T @ A).astype(np.float64), (A.T @ B).astype(np.float64)
            best = None
            for lam in lams:
                W = np.linalg.solve(G + lam * np.eye(len(G)), AB)
                mae = _masked_mae_mm(te.x[:, 0].astype(float) + (At @ W).reshape(-1, r, r), te)
                if best is None or mae < best[0]:
                    best = (mae, lam)
            out[f"{name}_{len(S)}_pairs"] = {"mae_mm": best[0], "ratio": best[0] / base, "ridge_lambda": best[1],
                                             "lambda_chosen_on": "the held-out split (optimistic)"}
    return out


def plot_curves(histories, path):
    """Training curves with OpenCV (no matplotlib here): L1 vs images (log), held-out MAE at phase ends."""
    import cv2

    W, H, pad = 1100, 460, 60
    img = np.full((H, W, 3), 255, np.uint8)
    colors = [(200, 60, 30), (30, 130, 30), (30, 30, 200), (150, 0, 150)]
    panels = [(pad, 30, W // 2 - pad, H - pad), (W // 2 + pad // 2, 30, W - 20, H - pad)]

    def axes(p, title, xl, yl):
        x0, y0, x1, y1 = p
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        cv2.putText(img, title, (x0, y0 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, xl, (x0 + 5, y1 + 35), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, yl, (x0 + 5, y1 + 50), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)

    def line(p, xs, ys, xr, yr, color, log=False):
        x0, y0, x1, y1 = p
        ys = np.log10(np.maximum(ys, 1e-6)) if log else np.asarray(ys, float)
        lo, hi = (np.log10(yr[0]), np.log10(yr[1])) if log else yr
        px = x0 + (np.asarray(xs, float) - xr[0]) / max(xr[1] - xr[0], 1e-9) * (x1 - x0)
        py = y1 - (ys - lo) / max(hi - lo, 1e-9) * (y1 - y0)
        pts = np.stack([px, np.clip(py, y0, y1)], 1).astype(np.int32)
        cv2.polylines(img, [pts], False, color, 1, cv2.LINE_AA)
        return pts

    names = list(histories)
    maxs = max(max((h["seconds"] for h in histories[n]["history"]), default=1) for n in names)
    l1s = [e["l1"] for n in names for e in histories[n]["history"]]
    yr = (max(min(l1s), 1e-4), max(l1s))
    axes(panels[0], "pixel loss (L1, log) vs training s; it rises as resolution grows", f"0 .. {maxs:.0f} s",
         f"L1 {yr[0]:.4f} .. {yr[1]:.3f}")
    for k, n in enumerate(names):
        h = histories[n]["history"]
        xs = [e["seconds"] for e in h]
        ys = [e["l1"] for e in h]
        if len(h) > 5:  # running mean over 5 logged points (no edge effects)
            ys = np.convolve(ys, np.ones(5) / 5, mode="valid")
            xs = xs[2:-2]
        line(panels[0], xs, ys, (0, maxs), yr, colors[k % 4], log=True)
        cv2.putText(img, n, (panels[0][0] + 10, panels[0][1] + 18 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    colors[k % 4], 1, cv2.LINE_AA)
    ev = [(e["seconds"], e["mae_mm"], e["coarse_mae_mm"]) for n in names for e in histories[n]["evals"]
          if np.isfinite(e["mae_mm"])]
    if ev:
        ymax = max(max(e[1] for e in ev), max(e[2] for e in ev)) * 1.05
        axes(panels[1], "held-out depth MAE (mm) at phase ends; grey rings = coarse input", f"0 .. {maxs:.0f} s",
             f"MAE 0 .. {ymax:.2f} mm")
        for k, n in enumerate(names):
            e = [x for x in histories[n]["evals"] if np.isfinite(x["mae_mm"])]
            pts = line(panels[1], [x["seconds"] for x in e], [x["mae_mm"] for x in e], (0, maxs), (0, ymax), colors[k % 4])
            for p in pts:
                cv2.circle(img, tuple(int(c) for c in p), 3, colors[k % 4], -1)
            for x in e:
                pc = line(panels[1], [x["seconds"]] * 2, [x["coarse_mae_mm"]] * 2, (0, maxs), (0, ymax), colors[k % 4])
                cv2.circle(img, tuple(int(c) for c in pc[0]), 2, (120, 120, 120), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path.relative_to(RESULTS.parent.parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--default", default="default")
    ap.add_argument("--history", help="history JSON of the default's training run")
    ap.add_argument("--compare", nargs=4, metavar=("PROG_PT", "P2P_PT", "PROG_JSON", "P2P_JSON"))
    ap.add_argument("--no-fine", action="store_true")
    ap.add_argument("--previous", help="an earlier default checkpoint, also measured on the james scene")
    ap.add_argument("--extra-pairs", help="more synthetic pairs for the 32x32 linear probe (analysis)")
    ap.add_argument("--only", nargs="*", help="sections to run (default all)")
    a = ap.parse_args()
    import torch

    from geomfit.learned.refiner import Refiner
    from geomfit.learned.refiner_data import RefinerPairs, calibrate_detail

    torch.set_num_threads(1)  # one core: the machine is shared
    out_path = RESULTS / "refiner.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res["machine"] = {**environment(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    want = set(a.only or ["calibration", "heldout", "probe", "compare", "curves", "refine_512", "james", "analysis"])
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", ""))
    pairs = RefinerPairs.load(a.pairs)
    _, test = pairs.split(0.1, 0)  # the held-out split train-refiner uses (--held-out 0.1, --seed 0)
    refiner = Refiner.load(a.default)

    def save():
        from geomfit import atomic

        res["machine"]["loadavg_end"] = list(os.getloadavg())
        RESULTS.mkdir(exist_ok=True)
        atomic.write_text(out_path, json.dumps(res, indent=1, default=float))

    if "calibration" in want:
        res["calibration"] = calibrate_detail(data / "scans/james/james.obj", data / "scans/james/james.ljson")
        save()
    if "heldout" in want:
        ev = eval_checkpoint(a.default, test)
        ev.update(load=_load(), target_ratio=0.7, met=ev["ratio"] <= 0.7, pairs=pathlib.Path(a.pairs).name, split="held_out=0.1 seed=0")
        res["heldout"] = ev
        save()
    if "probe" in want:
        res["linear_probe"] = linear_probe(pairs)
        save()
    if "compare" in want and a.compare:
        pp, qp, pj, qj = a.compare
        hp, hq = json.loads(pathlib.Path(pj).read_text()), json.loads(pathlib.Path(qj).read_text())
        res["compare"] = {
            "progressive": {**eval_checkpoint(pp, test), "train_seconds": hp["seconds"], "images": hp["images"],
                            "images_per_s": hp["images_per_s"]},
            "pix2pix": {**eval_checkpoint(qp, test), "train_seconds": hq["seconds"], "images": hq["images"],
                        "images_per_s": hq["images_per_s"]},
            "load": _load()}
        save()
    if "curves" in want:
        hs = {}
        if a.history and not (a.compare and pathlib.Path(a.compare[2]).resolve() == pathlib.Path(a.history).resolve()):
            hs["default (progressive DCE+RGB)"] = json.loads(pathlib.Path(a.history).read_text())
        if a.compare:
            hs["progressive, 12-min equal-time comparison"] = json.loads(pathlib.Path(a.compare[2]).read_text())
            hs["pix2pix, 12-min equal-time comparison"] = json.loads(pathlib.Path(a.compare[3]).read_text())
        if hs:
            res["curves"] = plot_curves(hs, RESULTS / "refiner_curves.png")
            save()
    if "refine_512" in want:
        res["refine_512"] = {**bench_refine_512(refiner), "load": _load()}
        save()
    if "james" in want:
        res["james"] = {**bench_james(refiner, with_fine=not a.no_fine, previous=a.previous), "load": _load()}
        save()
    if "analysis" in want:
        from geomfit.learned.refiner_data import RefinerPairs as RP

        extra = RP.load(a.extra_pairs) if a.extra_pairs else None
        res["analysis"] = {"error_decomposition": error_decomposition(test.downsample(32)),
                           "landmark_noise": landmark_noise_effect(),
                           "linear_probe_32": linear_probe_more(pairs, extra),
                           "blurred_inputs": blurred_inputs({"default": a.default, **({"previous": a.previous}
                                                                                    if a.previous else {})}),
                           "load": _load()}
        save()
    print(json.dumps({k: v for k, v in res.items() if k != "calibration"}, indent=1, default=float))


if __name__ == "__main__":
    main()
