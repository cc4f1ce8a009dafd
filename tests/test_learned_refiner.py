"""The progressive CGAN depth refiner (Galteri et al., CVIU 2019) and its data: tiny, fast checks."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the learned refiner is optional")

from geomfit.learned import refiner as rf  # noqa: E402
from geomfit.learned import refiner_data as rd  # noqa: E402
from geomfit.learned.pix2pix import PatchDiscriminator, UNetGenerator, receptive_field  # noqa: E402

torch.set_num_threads(1)


def _sphere(S=48, radius=30.0, centre=None):
    c = (S / 2, S / 2) if centre is None else centre
    jj, ii = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5)
    rho2 = (jj - c[0]) ** 2 + (ii - c[1]) ** 2
    d = np.sqrt(np.maximum(radius ** 2 - rho2, 0.0))
    return np.where(rho2 < (0.9 * radius) ** 2, d, np.nan), rho2


def _pairs(n=24, R=16, seed=0):
    """Random smooth pairs where the target is the input plus a fixed smooth bump (learnable)."""
    rng = np.random.default_rng(seed)
    x = np.full((n, 6, R, R), -1.0, np.float32)
    y = np.full((n, 3, R, R), -1.0, np.float32)
    m = np.zeros((n, R, R), bool)
    m[:, 2:-2, 2:-2] = True
    jj, ii = np.meshgrid(np.linspace(-1, 1, R), np.linspace(-1, 1, R))
    bump = 0.6 * np.exp(-(jj ** 2 + ii ** 2) / 0.5)
    for k in range(n):
        base = 0.3 * np.cos(jj * rng.uniform(1, 3)) + 0.1 * ii * rng.uniform(-1, 1)
        x[k, :3] = np.where(m[k], base, -1.0)
        x[k, 3:] = np.where(m[k], rng.uniform(-0.5, 0.5, (3, 1, 1)), -1.0)
        y[k, 0] = np.where(m[k], base + bump, -1.0)
        y[k, 1:] = x[k, 1:3]
    return rd.RefinerPairs(x, y, m, np.ones(n), {"generator": "test"})


# ------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------
def test_shapes_through_the_schedule():
    G = rf.ProgressiveGenerator(6, 3, resolution=32, width=0.1, skips=True)
    D = rf.ProgressiveDiscriminator(2, resolution=32, width=0.1)
    phases = rf.schedule(32)
    assert phases == [(0, "stab"), (1, "fade"), (1, "stab"), (2, "fade"), (2, "stab"), (3, "fade"), (3, "stab")]
    for level, kind in phases:
        r = 4 * 2 ** level
        alpha = 0.5 if kind == "fade" else 1.0
        x = torch.randn(2, 6, r, r)
        out = G(x, level, alpha)
        assert out.shape == (2, 3, r, r)
        assert D(torch.randn(2, 2, r, r), level, alpha).shape == (2,)
    with pytest.raises(ValueError, match="generator input must be"):
        G(torch.randn(2, 6, 16, 16), 3)


def test_paper_widths_and_parameter_count():
    # CVIU Table 1: 32 filters at 256, 64 at 128, 128 below; encoder+decoder ~1.65M each
    assert [rf.paper_width(r) for r in (256, 128, 64, 4)] == [32, 64, 128, 128]
    G = rf.ProgressiveGenerator(3, 3, resolution=256, width=1.0, skips=False)
    # the weights of Table 1's rows, summed by hand (the table's "1.65M" is this sum in units of 2^20)
    rows = [3 * 32, 32 * 32, 32 * 64, 64 * 64, 64 * 128] + [128 * 128] * 9
    table = 9 * sum(rows) + 16 * 128 * 128
    assert table == 1728352 and table / 2 ** 20 == pytest.approx(1.65, abs=0.005)
    weights = [m.weight.numel() for m in list(G.enc.modules()) + list(G.from_rgb["256"].modules())
               if isinstance(m, torch.nn.Conv2d)]
    assert sum(weights) == table
    # Table 1's first conv: 3 x 32 x 3 x 3 = 864 weights
    assert G.from_rgb["256"][0].weight.numel() == 864


def test_pixel_norm_after_each_generator_conv():
    G = rf.ProgressiveGenerator(1, 1, resolution=8, width=0.1)
    convs = [m for m in G.enc.modules() if isinstance(m, torch.nn.Sequential) and any(
        isinstance(c, torch.nn.Conv2d) for c in m.children())]
    assert convs and all(isinstance(list(c.children())[-1], rf.PixelNorm) for c in convs)
    x = torch.randn(3, 5, 4, 4) * 7
    y = rf.PixelNorm()(x)
    assert torch.allclose(y.pow(2).mean(1), torch.ones(3, 4, 4), atol=1e-5)


@pytest.mark.parametrize("level", [1, 2])
def test_fade_in_alpha_zero_is_the_previous_level_upsampled(level):
    torch.manual_seed(0)
    G = rf.ProgressiveGenerator(3, 3, resolution=16, width=0.1, skips=False)
    D = rf.ProgressiveDiscriminator(2, resolution=16, width=0.1)
    r = 4 * 2 ** level
    x = torch.randn(2, 3, r, r)
    with torch.no_grad():
        new = G(x, level, 0.0)
        old = torch.nn.functional.interpolate(G(torch.nn.functional.avg_pool2d(x, 2), level - 1, 1.0), scale_factor=2)
        assert torch.allclose(new, old, atol=1e-5)
        assert not torch.allclose(G(x, level, 1.0), old, atol=1e-3)
        z = torch.randn(2, 2, r, r)
        assert torch.allclose(D(z, level, 0.0), D(torch.nn.functional.avg_pool2d(z, 2), level - 1, 1.0), atol=1e-5)


def test_real_images_fade_in_blend():
    t = torch.arange(16.0).view(1, 1, 4, 4)
    low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(t, 2), scale_factor=2)
    assert torch.equal(rf._blend_real(t, 4 * 2, 1.0), t)
    assert torch.allclose(rf._blend_real(t, 8, 0.0), low)
    assert torch.allclose(rf._blend_real(t, 8, 0.25), 0.25 * t + 0.75 * low)


def test_residual_generator_starts_at_the_input():
    G = rf.ProgressiveGenerator(6, 3, resolution=16, width=0.1, skips=True, residual=True)
    x = torch.randn(2, 6, 16, 16)
    assert torch.equal(G(x), x[:, :3])


def test_truncated_normal_init():
    torch.manual_seed(1)
    G = rf.ProgressiveGenerator(3, 3, resolution=32, width=1.0)
    w = G.enc["32"][0][0].weight.detach()
    std = (2.0 / w[0].numel()) ** 0.5
    assert float(w.abs().max()) <= 2 * std + 1e-7
    assert abs(float(w.std()) / std - 0.88) < 0.05  # std of N(0,1) truncated at +-2 is 0.880


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
class _LinearCritic(torch.nn.Module):
    """D(c, y) = sum(V c) + sum(W y): grad wrt y is W for every sample."""

    def __init__(self, r):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.V = torch.randn(1, 1, r, r, generator=g)
        self.W = torch.randn(1, 1, r, r, generator=g) * 0.05
        self.seen = []

    def forward(self, z, level=None, alpha=1.0):
        self.seen.append(z.shape[1])
        return (z[:, :1] * self.V).flatten(1).sum(1) + (z[:, 1:] * self.W).flatten(1).sum(1)


class _QuadCritic(torch.nn.Module):
    def forward(self, z, level=None, alpha=1.0):
        return 0.5 * (z[:, 1:] ** 2).flatten(1).sum(1) + z[:, :1].flatten(1).sum(1)


def test_gradient_penalty_matches_hand_computation():
    r = 4
    c, real, fake = torch.randn(3, 1, r, r), torch.randn(3, 1, r, r), torch.randn(3, 1, r, r)
    lin = _LinearCritic(r)
    gp = rf.gradient_penalty(lin, c, real, fake, lam=10.0)
    assert float(gp) == pytest.approx(10.0 * (float(lin.W.norm()) - 1.0) ** 2, rel=1e-5)
    eps = torch.tensor([0.0, 0.3, 1.0])
    gp = rf.gradient_penalty(_QuadCritic(), c, real, fake, lam=10.0, eps=eps)
    xhat = eps.view(3, 1, 1, 1) * real + (1 - eps.view(3, 1, 1, 1)) * fake  # grad of 0.5|y|^2 is y
    hand = 10.0 * np.mean([(float(xhat[b].norm()) - 1.0) ** 2 for b in range(3)])
    assert float(gp.detach()) == pytest.approx(hand, rel=1e-5)


def test_discriminator_loss_is_eq2_plus_drift():
    r = 4
    c, real, fake = torch.randn(2, 1, r, r), torch.randn(2, 1, r, r), torch.randn(2, 1, r, r)
    lin = _LinearCritic(r)
    loss, terms = rf.discriminator_loss(lin, c, real, fake, lam=10.0, drift=1e-3)
    dr = lin(torch.cat([c, real], 1))
    df = lin(torch.cat([c, fake], 1))
    hand = dr.mean() - df.mean() + 10.0 * (lin.W.norm() - 1) ** 2 + 1e-3 * (dr ** 2).mean()
    assert float(loss) == pytest.approx(float(hand), rel=1e-5)


def test_kappa_and_discriminator_sees_depth_only():
    assert rf.kappa_for(3) == pytest.approx(3e-5) and rf.kappa_for(1) == pytest.approx(1e-5)
    r = 4
    lin = _LinearCritic(r)
    c, target = torch.randn(2, 1, r, r), torch.randn(2, 3, r, r)
    out = torch.randn(2, 3, r, r, requires_grad=True)
    loss, terms = rf.generator_loss(lin, c, target, out)
    adv = lin(torch.cat([c, out[:, :1]], 1)).mean()
    assert terms["kappa"] == pytest.approx(3e-5)
    assert float(loss.detach()) == pytest.approx(float(((target - out).abs().mean() + 3e-5 * adv).detach()), rel=1e-6)
    assert set(lin.seen) == {1 + 1}  # condition depth + output depth
    # curvature/elevation channels reach the loss through L1 only: their gradient is sign(.)/N
    loss.backward()
    n = target.numel()
    assert torch.allclose(out.grad[:, 1:], -torch.sign(target - out)[:, 1:].detach() / n, atol=1e-9)
    # the built discriminator of every configuration takes 2 channels
    for config in rd.CONFIGS:
        G, D = rf._build("progressive", config, 8, 0.1, True, 8, "cpu")
        assert D.in_ch == 2 and G.in_ch == len(rd.CONFIGS[config][0])


# ------------------------------------------------------------------------------------------------
# training, checkpoints, inference
# ------------------------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    p = _pairs(n=8, R=8)
    x, y = torch.from_numpy(p.x[:, :3]), torch.from_numpy(p.y)
    G = rf.ProgressiveGenerator(3, 3, resolution=8, width=0.1)
    D = rf.ProgressiveDiscriminator(2, resolution=8, width=0.1)
    oG, oD = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.0, 0.99)), torch.optim.Adam(D.parameters(), 1e-3, betas=(0.0, 0.99))
    l1 = []
    for _ in range(40):
        fake = G(x, 1, 1.0)
        oD.zero_grad()
        rf.discriminator_loss(D, x[:, :1], y[:, :1], fake[:, :1], 1, 1.0)[0].backward()
        oD.step()
        oG.zero_grad()
        lg, t = rf.generator_loss(D, x[:, :1], y, fake, 1, 1.0)
        lg.backward()
        oG.step()
        l1.append(t["l1"])
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:5])


def test_train_refiner_improves_on_the_coarse_input(tmp_path):
    pairs = _pairs(n=40, R=8)
    res = rf.train_refiner(pairs, tmp_path / "r.pt", config="DCE", images_per_phase=640, batch_size=8, lr=2e-3,
                           width=0.1, held_out=0.2, progress=False, checkpoint_every_s=1e9)
    assert [e["resolution"] for e in res["evals"]] == [4, 8, 8]
    assert res["final"]["mae_mm"] < 0.8 * res["final"]["coarse_mae_mm"]


def test_checkpoint_round_trip_and_resume(tmp_path):
    pairs = _pairs(n=20, R=8)
    ck = tmp_path / "r.pt"
    res = rf.train_refiner(pairs, ck, config="DCE+RGB", images_per_phase=32, batch_size=8, width=0.1,
                           progress=False)
    ref = rf.Refiner.load(ck)
    assert ref.config == "DCE+RGB" and ref.resolution == 8 and ref.needs_image
    raw = torch.load(ck, weights_only=False)
    G = rf.ProgressiveGenerator(6, 3, 8, 0.1, True, True)
    G.load_state_dict(raw["G"])
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert torch.equal(ref.G(x), G(x))
    # inference-only float16 file
    small = ref.save(tmp_path / "small.pt")
    ref2 = rf.Refiner.load(small)
    with torch.no_grad():
        assert torch.allclose(ref2.G(x), G(x), atol=2e-2)
    # resuming a finished run trains no more images; other settings are refused
    again = rf.train_refiner(pairs, ck, config="DCE+RGB", images_per_phase=32, batch_size=8, width=0.1,
                             progress=False)
    assert again["images"] == res["images"]
    with pytest.raises(ValueError, match="other settings"):
        rf.train_refiner(pairs, ck, config="D", images_per_phase=32, width=0.1, progress=False)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        rf.Refiner.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a"):
        rf.Refiner.load(bad)


class _ShiftG(torch.nn.Module):
    """Adds a constant to the normalised depth channel."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, level=None, alpha=1.0):
        return x[:, :3] + torch.tensor([self.c, 0.0, 0.0]).view(1, 3, 1, 1)


def test_refine_maps_a_normalised_change_back_to_pixels():
    d, rho2 = _sphere(S=96, radius=40.0)
    mask = np.isfinite(d)
    ref = rf.Refiner(_ShiftG(0.1), "DCE", 32)
    out = ref.refine(d, mask)
    assert out.shape == d.shape and np.isnan(out[~mask]).all()
    _, _, frame = rd.encode_depth(d, mask, None, 32)
    expect = 0.1 * frame.span / 2 / frame.zoom  # original pixels
    inner = rho2 < (0.7 * 40) ** 2
    assert np.allclose(out[inner] - d[inner], expect, rtol=1e-3)
    # encoded at 64 and area-downsampled to a 32x32 network (RefinerPairs.downsample at training time)
    ref2 = rf.Refiner(_ShiftG(0.1), "DCE", 32)
    ref2.encode_resolution = 64
    out2 = ref2.refine(d, mask)
    _, _, frame64 = rd.encode_depth(d, mask, None, 64)
    assert np.allclose(out2[inner] - d[inner], 0.1 * frame64.span / 2 / frame64.zoom, rtol=1e-3)
    # a zero-initialised residual generator leaves the depth unchanged
    G0 = rf.ProgressiveGenerator(6, 3, 32, 0.1, True, True)
    img = np.random.default_rng(0).random(d.shape + (3,))
    same = rf.Refiner(G0, "DCE+RGB", 32).refine(d, mask, img)
    assert np.allclose(same[mask], d[mask], atol=1e-4)


def test_refine_bad_input():
    d, _ = _sphere()
    ref = rf.Refiner(rf.ProgressiveGenerator(6, 3, 16, 0.1, True, True), "DCE+RGB", 16)
    with pytest.raises(ValueError, match="needs the photo"):
        ref.refine(d)
    r2 = rf.Refiner(_ShiftG(0.0), "DCE", 16)
    with pytest.raises(ValueError, match=r"shape \(H, W\)"):
        r2.refine(d[None])
    with pytest.raises(ValueError, match="mask covers"):
        r2.refine(d, np.zeros(d.shape, bool))
    with pytest.raises(ValueError, match="NaN or infinite inside the mask"):
        r2.refine(d, np.ones(d.shape, bool))


# ------------------------------------------------------------------------------------------------
# encodings and data
# ------------------------------------------------------------------------------------------------
def test_depth_channels_on_a_sphere():
    radius = 40.0
    d, rho2 = _sphere(S=128, radius=radius)
    H, theta = rd.depth_channels(d)
    inner = rho2 < (0.6 * radius) ** 2
    assert np.allclose(H[inner], 1.0 / radius, rtol=0.03)  # mean curvature of a sphere, convex: +1/r
    assert np.allclose(theta[inner], np.arccos(np.sqrt(radius ** 2 - rho2[inner]) / radius), atol=0.01)


def test_encode_depth_ranges_and_target_frame():
    d, _ = _sphere(S=80, radius=30.0)
    m = np.isfinite(d)
    x, mn, frame = rd.encode_depth(d, m, None, 16)
    assert x.shape == (6, 16, 16) and x.dtype == np.float32
    assert (x[:, ~mn] == -1).all() and (x[3:] == -1).all()
    lo_hi = x[0][mn]
    margin = rd.DEPTH_MARGIN / (1 + 2 * rd.DEPTH_MARGIN) * 2
    assert lo_hi.min() == pytest.approx(-1 + margin, abs=1e-5) and lo_hi.max() == pytest.approx(1 - margin, abs=1e-5)
    # a target 2 px closer everywhere encodes as a constant shift of 2 * zoom / (span / 2)
    y = rd.encode_target(d + 2.0, frame, mn, coarse_x=x)
    shift = (y[0] - x[0])[mn]
    assert np.allclose(shift, 2.0 * frame.zoom / (frame.span / 2), atol=1e-5)


def test_pairs_container_save_load_split(tmp_path):
    p = _pairs(n=10, R=8)
    path = p.save(tmp_path / "p.npz")
    q = rd.RefinerPairs.load(path)
    assert np.array_equal(q.mask, p.mask) and np.allclose(q.x, p.x, atol=1e-3) and q.meta == p.meta
    small = q.downsample(4)
    assert small.x.shape == (10, 6, 4, 4) and small.meta["encode_resolution"] == 8
    assert np.allclose(small.x[:, :, 1, 1], q.x[:, :, 2:4, 2:4].astype(np.float32).mean(axis=(-2, -1)), atol=1e-3)
    assert (small.mask == (rd.pool(q.mask.astype(np.float32), 2) > 0.999)).all()
    tr, te = q.split(0.3, seed=1)
    assert len(tr) == 7 and len(te) == 3
    with pytest.raises(ValueError, match="not a refiner pairs file"):
        np.savez(tmp_path / "other.npz", a=np.zeros(3))
        rd.RefinerPairs.load(tmp_path / "other.npz")


def test_load_user_pairs(tmp_path):
    (tmp_path / "coarse").mkdir()
    (tmp_path / "gt").mkdir()
    d, _ = _sphere(S=64, radius=28.0)
    for k in range(3):
        np.save(tmp_path / "coarse" / f"f{k}.npy", d)
        np.save(tmp_path / "gt" / f"f{k}.npy", d + 1.0 + k)
    np.save(tmp_path / "coarse" / "lonely.npy", d)
    p = rd.load_pairs(tmp_path, 16)
    assert len(p) == 3 and p.meta["names"] == ["f0", "f1", "f2"]
    assert p.y[2, 0][p.mask[2]].mean() > p.y[0, 0][p.mask[0]].mean()
    with pytest.raises(ValueError, match="must contain the folders"):
        rd.load_pairs(tmp_path / "coarse", 16)


def test_synthetic_pairs(sfm_dir):
    pairs = rd.make_synthetic_pairs(6, 16, model="sfm", seed=3, chunk=3)
    assert pairs.x.shape == (6, 6, 16, 16) and pairs.y.shape == (6, 3, 16, 16)
    m = pairs.mask
    # coarse and ground truth differ on the face, agree on the background, mm scale is plausible
    diff = np.abs(pairs.x[:, 0].astype(float) - pairs.y[:, 0].astype(float))
    assert (diff[m] > 0).mean() > 0.5 and (diff[~m] == 0).all()
    assert np.all((pairs.mm_per_unit > 20) & (pairs.mm_per_unit < 200))
    assert np.isfinite(pairs.x).all() and np.isfinite(pairs.y).all()


def test_procedural_detail_amplitude():
    rng = np.random.default_rng(0)
    anchors = {"brow_y": 40.0, "eye_y": 30.0, "eye_outer_x": 45.0, "nose_wing_x": 20.0, "nose_wing_y": -5.0,
               "mouth_x": 25.0, "mouth_y": -35.0}
    yy, xx = np.meshgrid(np.linspace(80, -80, 161), np.linspace(-70, 70, 141), indexing="ij")
    det = rd.procedural_detail(xx[None], yy[None], anchors, rng)[0]
    # grooves are recesses: the deepest points are negative, amplitudes stay sub-2mm
    assert det.min() < -0.2 and np.abs(det).max() < 2 * sum(rd.DETAIL_MM.values())
    assert 0.05 < np.sqrt(np.mean(det ** 2)) < 1.0


def test_pix2pix_shapes_and_receptive_field():
    assert receptive_field(3) == 70
    G = UNetGenerator(3, 1, resolution=32, ngf=4)
    assert len(G.down) == 5
    x = torch.randn(2, 3, 32, 32)
    assert G(x).shape == (2, 1, 32, 32)
    Gr = UNetGenerator(3, 1, resolution=32, ngf=4, residual=True)
    assert torch.equal(Gr(x), x[:, :1])
    assert PatchDiscriminator(2, 4)(torch.randn(2, 2, 64, 64)).shape == (2, 1, 6, 6)


def test_import_geomfit_learned_does_not_import_torch():
    code = "import sys, geomfit, geomfit.learned; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_cli_train_refiner_on_user_pairs(tmp_path, capsys):
    from geomfit.cli import main

    (tmp_path / "d" / "coarse").mkdir(parents=True)
    (tmp_path / "d" / "gt").mkdir()
    for k in range(6):
        d, _ = _sphere(S=40, radius=16.0 + k)
        np.save(tmp_path / "d" / "coarse" / f"f{k}.npy", d)
        np.save(tmp_path / "d" / "gt" / f"f{k}.npy", d + 0.5)
    hist = tmp_path / "h.json"
    rc = main(["train-refiner", "-o", str(tmp_path / "r.pt"), "--data", str(tmp_path / "d"), "--resolution", "16",
               "--config", "DCE", "--images-per-phase", "16", "--batch-size", "4", "--width", "0.1", "-q",
               "--history", str(hist)])
    assert rc == 0
    assert "held-out depth MAE" in capsys.readouterr().out
    h = json.loads(hist.read_text())
    assert [e["resolution"] for e in h["evals"]] == [4, 8, 8, 16, 16]
    rc = main(["train-refiner", "-o", str(tmp_path / "r2.pt"), "--data", str(tmp_path / "nope"), "-q"])
    assert rc == 1


def test_pipeline_applies_the_refiner_and_reports_it():
    from geomfit.pipeline import _apply_refiner

    d, _ = _sphere(S=64, radius=24.0)
    m = np.isfinite(d)
    img = np.full(d.shape + (3,), 0.5)
    ref = rf.Refiner(_ShiftG(0.2), "DCE", 16)
    out, rep = _apply_refiner(ref, d, m, img, False, lambda s: None)
    _, _, frame = rd.encode_depth(d, m, None, 16)
    assert rep["applied"] == "after the medium stage (alone)" and rep["config"] == "DCE"
    assert np.median((out - d)[m]) == pytest.approx(0.2 * frame.span / 2 / frame.zoom, rel=1e-3)
    assert rep["mean_abs_change_px"] > 0 and np.isnan(out[~m]).all()
    assert rep["safeguard"]["chosen"] == "refined"  # a depth offset leaves the shading alike: kept
    json.dumps(rep)


# ------------------------------------------------------------------------------------------------
# photometric safeguard (a departure from the paper: the refinement is kept only where/if the photo's
# shading agrees with it better than with the input)
# ------------------------------------------------------------------------------------------------
def _shaded(depth, mask, sh=(2.8, 0.3, 0.6, 0.4, 0.05, 0.0, -0.05, 0.03, 0.02), albedo=(0.8, 0.6, 0.5)):
    from geomfit.render import depth_normals
    from geomfit.sh import shade

    n = np.nan_to_num(np.asarray(depth_normals(np.where(mask, depth, np.nan))))
    img = np.clip(shade(n, np.asarray(sh)), 0, None)[..., None] * np.asarray(albedo)
    return np.where(mask[..., None], img, 0.0)


def _bumps(S, side=None, amp=1.5, seed=0):
    jj, ii = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5)
    b = amp * np.sin(jj / 2.3) * np.cos(ii / 1.9)
    if side == "left":
        b = b * (jj < S / 2 - 6)
    elif side == "right":
        b = b * (jj > S / 2 + 6)
    return b


def test_photometric_residual_is_zero_for_the_depth_that_made_the_image():
    d, _ = _sphere(S=64, radius=28.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    assert rf.photometric_residual(d, m, img) < 1e-20
    assert rf.photometric_residual(d + _bumps(64), m, img) > 1e-5
    # a constant depth offset does not change the normals: the same residual
    assert rf.photometric_residual(d + 5.0, m, img) == pytest.approx(rf.photometric_residual(d, m, img), abs=1e-12)


def test_safeguard_rejects_a_change_the_photo_contradicts():
    d, _ = _sphere(S=64, radius=28.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    bad = d + _bumps(64)
    out, info = rf.photometric_safeguard(d, bad, m, img)
    assert info["chosen"] == "input" and info["accepted_fraction"] == 0.0
    assert np.array_equal(out[m], d[m]) and np.isnan(out[~m]).all()
    assert info["residual"]["refined"] > info["residual"]["input"]


def test_safeguard_accepts_a_change_the_photo_supports():
    d, _ = _sphere(S=64, radius=28.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    wrong = d + _bumps(64)
    out, info = rf.photometric_safeguard(wrong, d, m, img)
    assert info["chosen"] in ("refined", "regional")
    assert rf.photometric_residual(out, m, img) < 0.1 * rf.photometric_residual(wrong, m, img)
    assert np.abs(out - d)[m].mean() < 0.1 * np.abs(wrong - d)[m].mean()


def test_safeguard_keeps_the_change_only_where_it_helps():
    d, _ = _sphere(S=96, radius=44.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    inp = d + _bumps(96, "left")          # wrong on the left half
    ref = d + _bumps(96, "right")         # the "refiner" fixes the left, breaks the right
    out, info = rf.photometric_safeguard(inp, ref, m, img, sigma=3.0)
    r_in, r_out = rf.photometric_residual(inp, m, img), rf.photometric_residual(out, m, img)
    assert info["chosen"] == "regional" and 0.2 < info["accepted_fraction"] < 0.8
    assert r_out < r_in and r_out < rf.photometric_residual(ref, m, img)
    jj = np.arange(96)[None, :].repeat(96, 0) + 0.5
    left, right = m & (jj < 30), m & (jj > 66)
    assert np.abs(out - d)[left].mean() < 0.2 * np.abs(inp - d)[left].mean()
    assert np.abs(out - d)[right].mean() < 0.2 * np.abs(ref - d)[right].mean()


def test_refine_with_a_photo_never_raises_the_photometric_residual():
    d, _ = _sphere(S=64, radius=28.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    torch.manual_seed(0)
    G = rf.ProgressiveGenerator(6, 3, 16, 0.1, True, True)
    with torch.no_grad():  # a randomly initialised correction: a harmful change
        for p in G.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = rf.Refiner(G, "DCE+RGB", 16)
    raw = ref.refine(d, m, img, safeguard=False)
    assert ref.last_safeguard is None
    assert rf.photometric_residual(raw, m, img) > rf.photometric_residual(d, m, img)
    out = ref.refine(d, m, img)
    assert ref.last_safeguard["chosen"] == "input"
    assert rf.photometric_residual(out, m, img) <= rf.photometric_residual(d, m, img)


def test_safeguard_bad_input():
    d, _ = _sphere(S=32, radius=14.0)
    m = np.isfinite(d)
    img = _shaded(d, m)
    with pytest.raises(ValueError, match="image has size"):
        rf.photometric_safeguard(d, d, m, img[:-1])
    with pytest.raises(ValueError, match="refined has shape"):
        rf.photometric_safeguard(d, d[:-1], m, img)
    with pytest.raises(ValueError, match="NaN or infinite"):
        rf.photometric_safeguard(d, np.where(m, np.nan, 0), m, img)
    with pytest.raises(ValueError, match="sigma"):
        rf.photometric_safeguard(d, d, m, img, sigma=0)


def test_synthetic_pairs_with_blurred_ground_truth_inputs(sfm_dir):
    plain = rd.make_synthetic_pairs(4, 16, model="sfm", seed=3, chunk=4)
    again = rd.make_synthetic_pairs(4, 16, model="sfm", seed=3, chunk=4, blurred_fraction=0.0)
    assert np.array_equal(plain.x, again.x)  # the option draws nothing when off: old pair files reproduce
    bl = rd.make_synthetic_pairs(4, 16, model="sfm", seed=3, chunk=4, blurred_fraction=1.0, blur_px=(0.5, 0.5))
    # blurred ground truth as input: far closer to the target than a landmark fit of another identity
    def mae(p):
        e = np.abs(p.x[:, 0].astype(float) - p.y[:, 0].astype(float))
        return np.mean([e[k][p.mask[k]].mean() * p.mm_per_unit[k] for k in range(len(p))])
    assert mae(bl) < 0.3 * mae(plain) and mae(bl) > 0
    assert bl.meta["blurred_fraction"] == 1.0
    with pytest.raises(ValueError, match="blurred_fraction"):
        rd.make_synthetic_pairs(2, 16, model="sfm", blurred_fraction=1.5)


def test_train_refiner_extra_pairs_join_the_training_split_only(tmp_path):
    pairs = _pairs(n=20, R=8)
    extra = _pairs(n=12, R=8, seed=1)
    res = rf.train_refiner(pairs, tmp_path / "r.pt", config="DCE", images_per_phase=16, batch_size=4, width=0.1,
                           progress=False, extra_train=extra)
    ck = torch.load(tmp_path / "r.pt", weights_only=False)
    assert ck["args"]["n_extra_train"] == 12 and ck["args"]["n_pairs"] == 20
    assert res["final"]["n"] == 2  # the held-out split is 10 % of `pairs`, untouched by the extra pairs
    with pytest.raises(ValueError, match="extra_train pairs are 16x16"):
        rf.train_refiner(pairs, tmp_path / "r2.pt", config="DCE", images_per_phase=16, width=0.1, progress=False,
                         extra_train=_pairs(n=4, R=16))
