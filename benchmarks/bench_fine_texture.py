"""Why the fine stage cannot gain on the james scan: albedo texture against the missing detail's
shading, band by band, and what the stage gains once the albedo is really low-texture.

For the james scene (geomfit.scenes) with the textured albedo, the "smooth" albedo (texture blurred,
sigma size/64) and low-texture albedos (sigma size/16, size/8), over the skin (landmark regions,
border eroded):

* the RMS of the albedo's log-luminance and of the missing detail's log-shading
  ``log S(n_true) - log S(n_blurred)`` in three difference-of-Gaussian bands (sigma ratio 4) where the
  detail lost by the input blur lives, and their ratio (the "signal to texture" ratio);
* the mean normal error ratio (output / input) of ``fine_stage`` with the default (robust) options, with
  a weak pin and no curvature gate (``pin=0.003, curvature_quantile=0``), and the same weak-pin
  setting with the true light and albedo substituted (``band_light`` / the ratio albedo bypassed),
  which bounds what better light and albedo estimates could give.

Run:  GEOMFIT_DATA=../shared/data python benchmarks/bench_fine_texture.py [--size 256]
Results: benchmarks/results/fine_texture.json (docs/fine.md "Why the scan gives no gain").
"""
import argparse
import os
from unittest import mock

import numpy as np

from _harness import write_results
import geomfit.fine as fine
from geomfit.fine import REGIONS, FineOptions, fine_stage, landmark_regions
from geomfit.grid import masked_gaussian
from geomfit.render import depth_normals
from geomfit.scenes import james_available, james_scene, normal_error
from geomfit.sh import shade


def band_rms(z, m, lo, hi):
    return float((masked_gaussian(z, m, lo, mode="nearest") - masked_gaussian(z, m, hi, mode="nearest"))[m].std())


def stage_ratio(s, e0, truth=False, **opt):
    kw = dict(landmarks=s["landmarks"], options=FineOptions.robust(**opt))
    if not truth:
        return normal_error(fine_stage(s["image"], s["depth_blur"], s["mask"], **kw).normals, s) / e0
    with mock.patch.object(fine, "band_light", lambda *a, **k: s["sh"]), \
            mock.patch.object(fine, "_ratio_albedo", lambda I, S0, dm, *a, **k: (s["albedo"], dm, s["albedo"])):
        return normal_error(fine_stage(s["image"], s["depth_blur"], s["mask"], **kw).normals, s) / e0


def main():
    from scipy import ndimage

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ok, why = james_available()
    if not ok:
        raise SystemExit(f"skipped: {why}")
    size, f = a.size, a.size / 256.0
    bands = [(0.5 * f, 2 * f), (1 * f, 4 * f), (2 * f, 8 * f)]
    albedos = [("textured", {}), ("smooth_size/64", dict(albedo="smooth")),
               ("smooth_size/16", dict(albedo="smooth", albedo_sigma=size / 16)),
               ("smooth_size/8", dict(albedo="smooth", albedo_sigma=size / 8))]
    weak = dict(pin=0.003, curvature_quantile=0.0)
    rows = []
    for light in ("frontal", "side", "top"):
        for name, kw in albedos:
            s = james_scene(size, light=light, noise=0.003, **kw)
            reg = landmark_regions(s["landmarks"], s["mask"].shape, s["mask"])
            m = ndimage.binary_erosion(s["mask"], iterations=int(round(4 * f))) & (reg == REGIONS["skin"])
            la = np.log(np.maximum(s["albedo"], 1e-4).mean(-1))
            ls = np.log(shade(s["normals"], s["sh"]).mean(-1) / shade(depth_normals(s["depth_blur"]), s["sh"]).mean(-1))
            e0 = normal_error(depth_normals(s["depth_blur"]), s)
            row = {"light": light, "albedo": name, "input_deg": e0,
                   "bands_px": bands,
                   "albedo_log_rms": [band_rms(la, m, lo, hi) for lo, hi in bands],
                   "detail_log_rms": [band_rms(ls, m, lo, hi) for lo, hi in bands]}
            row["detail_to_albedo"] = [d / t for d, t in zip(row["detail_log_rms"], row["albedo_log_rms"])]
            row["ratio_default"] = stage_ratio(s, e0)
            row["ratio_weak_pin"] = stage_ratio(s, e0, **weak)
            row["ratio_weak_pin_true_light_albedo"] = stage_ratio(s, e0, truth=True, **weak)
            rows.append(row)
            print(f"{light:8s} {name:16s} detail/albedo {np.round(row['detail_to_albedo'], 2)}  default "
                  f"{row['ratio_default']:.3f}  weak pin {row['ratio_weak_pin']:.3f}  weak pin, true light+albedo "
                  f"{row['ratio_weak_pin_true_light_albedo']:.3f}", flush=True)
    path = write_results("fine_texture", {"size": size, "noise": 0.003, "weak_pin_options": weak,
                                          "loadavg_at_start": os.getloadavg(), "rows": rows}, a.out)
    print(f"results in {path}")


if __name__ == "__main__":
    main()
