"""B-Net / FAN / DRN benchmark (Wang et al., "Low-frequency guided self-supervised learning for
high-fidelity 3D face reconstruction in the wild", ICME 2020).

Sections (each written to benchmarks/results/detail.json as soon as it finishes):

* ``uv_texture``: ms for :func:`geomfit.uv_texture` at 256x256 on the shared photo (image_0010 with its
  .pts landmarks and the Surrey model), median of 5 after a warm-up.
* ``step_ms`` / ``infer_ms``: CPU ms per training step (forward + backward + Adam, batch 1) and per
  inference (batch 1, eval mode, no grad) at 256x256 for B-Net (199 + 27 outputs, a random
  199-component PCA albedo), FAN (with its PatchGAN step) and DRN; median of 3 after a warm-up; the same
  on CUDA tensors when a GPU is present.
* ``photo_training``: each stage trained in turn (B-Net, then FAN with B-Net, then DRN with both) on
  the available photos at 64x64 (only image_0010 is shared: this over-fits one texture); loss of the
  first and last 10 steps.
* ``synthetic_drn``: DRN trained on :func:`geomfit.learned.detail.synthetic_detail_set` maps with a known
  displacement (64x64, 8 training maps, 4 held out); mean normal error (degrees) on the held-out maps
  with no displacement, with the trained DRN, and with the rate map optimised directly per image on
  the same loss (the ceiling of the loss with the stand-in albedo).

torch runs on one thread (on this shared 2-core machine two threads made a step up to 30x slower).
Run:  GEOMFIT_DATA=../shared/data python benchmarks/bench_detail.py [--quick]
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _harness import Timer, tests_module, write_results  # noqa: E402

import geomfit  # noqa: E402
from geomfit.learned import detail as D  # noqa: E402
from geomfit.learned.uv_dataset import UVDataset  # noqa: E402

QUICK = "--quick" in sys.argv
DATA = pathlib.Path(os.environ.get("GEOMFIT_DATA", "/nonexistent"))
torch.set_num_threads(1)
results = {"meta": {"torch": torch.__version__, "torch_threads": 1, "quick": QUICK}}


def save():
    write_results("detail", results)


def timed(fn, n=3):
    """(median, min) ms of ``n`` calls after one warm-up call."""
    t = Timer(repeats=n, warmup=1).run(fn)
    return 1e3 * t.median, 1e3 * t.min


def bench_uv():
    if not (DATA / "sfm" / "sfm_shape_3448.bin").exists():
        results["uv_texture"] = "skipped: no GEOMFIT_DATA"
        return None
    m = tests_module("_fit_helpers").load_sfm(DATA / "sfm")
    img = geomfit.read_image(DATA / "images" / "image_0010.png")
    pts = geomfit.read_pts(DATA / "images" / "image_0010.pts")
    fit = geomfit.fit_landmarks(m, pts, img.shape[:2])
    load = os.getloadavg()[0]
    med, mn = timed(lambda: geomfit.uv_texture(img, fit, 256), n=5)
    r = geomfit.uv_texture(img, fit, 256)
    back, mk = geomfit.uv_render(r.texture, fit, img.shape[:2], valid=r.visible)
    results["uv_texture"] = {"size": 256, "image": list(img.shape[:2]), "median_ms": med, "min_ms": mn,
                             "visible_fraction": float(r.visible.mean()),
                             "round_trip_mean_abs": float(np.abs(back[mk] - img[mk]).mean()),
                             "round_trip_pixels": int(mk.sum()), "load_before": load}
    save()
    return m


def bench_steps(device="cpu"):
    S = 256
    dev = torch.device(device)
    x = torch.rand(1, 3, S, S, device=dev)
    vis = torch.ones(1, 1, S, S, device=dev)
    nrm = torch.nn.functional.normalize(torch.rand(1, 3, S, S, device=dev) + torch.tensor([0, 0, 1.0], device=dev).view(1, 3, 1, 1), dim=1)
    dpdu = torch.zeros(1, 3, S, S, device=dev)
    dpdu[:, 0] = 2.0
    dpdv = torch.zeros(1, 3, S, S, device=dev)
    dpdv[:, 1] = 2.0
    am = D.PCAAlbedo(np.full((3, S, S), 0.5), np.random.default_rng(0).normal(scale=0.01, size=(199, 3, S, S)),
                     np.ones((S, S), bool)).to(dev)
    b = D.BNet(199).to(dev)
    fan = D.FAN().to(dev)
    disc = D.PatchDiscriminator().to(dev)
    drn = D.DRN().to(dev)
    ob = torch.optim.Adam(b.parameters(), lr=2e-5)
    of = torch.optim.Adam(fan.parameters(), lr=2e-5)
    od = torch.optim.Adam(disc.parameters(), lr=2e-5)
    orr = torch.optim.Adam(drn.parameters(), lr=2e-5)
    gamma = torch.zeros(1, 9, 3, device=dev)
    gamma[:, 0] = 3.5

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step_b():
        b.train()
        p, g = b.split(b(x))
        loss = D.bnet_loss(x, vis, am(p) * D.sh_shade(nrm, g), p)
        ob.zero_grad(); loss.backward(); ob.step(); sync()  # noqa: E702

    def step_f():
        fan.train(); disc.train()  # noqa: E702
        a = fan(x)
        dl = D.gan_discriminator_loss(disc(x), disc(a.detach()))
        od.zero_grad(); dl.backward(); od.step()  # noqa: E702
        gl, _ = D.fan_generator_loss(x, vis, a * D.sh_shade(nrm, gamma), disc(a), None)
        of.zero_grad(); gl.backward(); of.step(); sync()  # noqa: E702

    def step_d():
        drn.train()
        r = drn(x)
        n2 = D.displaced_normals(nrm, dpdu, dpdv, r, vis)
        loss, _ = D.drn_loss(x, vis, x * D.sh_shade(n2, gamma), r * nrm, vis)
        orr.zero_grad(); loss.backward(); orr.step(); sync()  # noqa: E702

    def infer(net):
        def f():
            net.eval()
            with torch.no_grad():
                net(x)
            sync()
        return f

    key = "cuda" if dev.type == "cuda" else "cpu"
    res = {"size": S, "batch": 1, "load_before": os.getloadavg()[0]}
    res["step_ms"] = {"bnet": timed(step_b)[0], "fan_with_patchgan": timed(step_f)[0], "drn": timed(step_d)[0]}
    res["infer_ms"] = {"bnet": timed(infer(b))[0], "fan": timed(infer(fan))[0], "drn": timed(infer(drn))[0]}
    res["params_millions"] = {k: sum(p.numel() for p in n.parameters()) / 1e6
                              for k, n in (("bnet", b), ("fan", fan), ("drn", drn), ("patchgan", disc))}
    results.setdefault("networks_256", {})[key] = res
    save()


def bench_photo_training(model):
    if model is None:
        results["photo_training"] = "skipped: no GEOMFIT_DATA"
        return
    steps = 30 if QUICK else 200
    photos = sorted((DATA / "images").glob("*.png"))
    ds = UVDataset.from_photos(photos, landmarks="pts", model=model, size=64)
    t = time.perf_counter()
    b, hb = D.train_bnet(ds, steps=steps, batch_size=1, lr=1e-4, n_components=10)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    fan, hf = D.train_fan(ds, bnet=b, steps=steps, batch_size=1, lr=1e-4, perceptual="auto")
    tf = time.perf_counter() - t
    t = time.perf_counter()
    drn, hd = D.train_drn(ds, fan=fan, bnet=b, steps=steps, batch_size=1, lr=1e-4)
    td = time.perf_counter() - t
    f10 = lambda h: [float(np.mean(h[:10])), float(np.mean(h[-10:]))]  # noqa: E731
    results["photo_training"] = {
        "photos": [p.name for p in photos], "size": 64, "steps": steps, "lr": 1e-4,
        "bnet_loss_first_last10": f10(hb), "fan_loss_first_last10": f10(hf),
        "fan_pixel_first_last10": f10([p["pixel"] for p in fan.loss_parts]),
        "drn_loss_first_last10": f10(hd), "drn_grad_first_last10": f10([p["grad"] for p in drn.loss_parts]),
        "seconds": {"bnet": tb, "fan": tf, "drn": td}, "load_end": os.getloadavg()[0]}
    save()


def bench_synthetic_drn():
    S, steps = 64, (40 if QUICK else 300)
    kw = dict(amplitude=0.006, wavelength_texels=4.0)
    tr, _, nt = D.synthetic_detail_set(8, S, seed=0, **kw)
    te, rte, nte = D.synthetic_detail_set(4, S, seed=1, **kw)
    rows = {}
    for name, w in (("paper_weights", dict()), ("grad_only", dict(w_const=0.0, w_smooth=0.0))):
        t = time.perf_counter()
        drn, h = D.train_drn(tr, steps=steps, batch_size=4, lr=1e-3, **w)
        with torch.no_grad():
            r = drn(te.tensor("texture"))[:, 0].numpy()
        rows[name] = {"weights": w or "w_grad 0.5, w_const 1, w_smooth 20", "seconds": time.perf_counter() - t,
                      "normal_error_deg_train": D.normal_error_deg(drn, tr, nt),
                      "normal_error_deg_test": D.normal_error_deg(drn, te, nte),
                      "rate_correlation_test": float(np.corrcoef(r.ravel(), rte.ravel())[0, 1]),
                      "loss_first_last10": [float(np.mean(h[:10])), float(np.mean(h[-10:]))]}
    # the loss's own optimum with the stand-in albedo: optimise the rate map directly
    b = te.batch(np.arange(len(te)))
    alb, gam = D._default_albedo_light(b["texture"], b["visible"], b["normals"], S / 32)
    r = torch.zeros(len(te), 1, S, S, requires_grad=True)
    opt = torch.optim.Adam([r], lr=2e-4)
    for _ in range(100 if QUICK else 150):
        n2 = D.displaced_normals(b["normals"], b["dpdu"], b["dpdv"], r, b["mask"])
        loss = D.drn_loss(b["texture"], b["visible"], alb * D.sh_shade(n2, gam), r * b["normals"], b["mask"],
                          w_const=0.0, w_smooth=0.0)[0]
        opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702

    class _Fixed(torch.nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.rate = rate

        def forward(self, x):
            return self.rate

    results["synthetic_drn"] = {
        "size": S, "train_maps": 8, "test_maps": 4, "steps": steps, "batch": 4, "lr": 1e-3, **kw,
        "normal_error_deg_test_none": D.normal_error_deg(None, te, nte),
        "normal_error_deg_test_true_rate": D.normal_error_deg(_Fixed(torch.from_numpy(rte).float()[:, None]), te, nte),
        "trained": rows,
        "normal_error_deg_test_direct_optimum": D.normal_error_deg(_Fixed(r.detach()), te, nte),
        "load_end": os.getloadavg()[0]}
    save()


if __name__ == "__main__":
    model = bench_uv()
    bench_steps("cpu")
    if torch.cuda.is_available():
        bench_steps("cuda")
    bench_synthetic_drn()
    bench_photo_training(model)
    print("wrote benchmarks/results/detail.json")
