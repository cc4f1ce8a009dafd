"""geomfit.learned: B-Net, FAN, DRN, PatchGAN, losses (Eqs. 4-9), UVDataset, training, checkpoints."""
import math
import os
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import geomfit  # noqa: E402
from geomfit import learned as L  # noqa: E402
from geomfit.learned import detail as D  # noqa: E402

DATA = pathlib.Path(os.environ.get("GEOMFIT_DATA", "/nonexistent"))
HAVE_SFM = (DATA / "sfm" / "sfm_shape_3448.bin").exists() and (DATA / "images" / "image_0010.pts").exists()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a loaded 2-core machine two threads made a training step 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# shapes (the paper's, at 256x256)
# ------------------------------------------------------------------------------------------------
def test_network_shapes_at_256():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    b = L.BNet(199).eval()
    seen = {}
    b.layers.register_forward_hook(lambda m, i, o: seen.update(last=o.shape))
    with torch.no_grad():
        out = b(x)
    assert out.shape == (1, 226)                      # 199 + 27
    assert b.feature_dim == 1024 and seen["last"] == (1, 1024, 8, 8)   # expansion 2, last pooling 8
    p_a, gamma = b.split(out)
    assert p_a.shape == (1, 199) and gamma.shape == (1, 9, 3)
    # initial lighting is ambient: shading 1 everywhere
    n = F.normalize(torch.randn(1, 3, 4, 4), dim=1)
    assert torch.allclose(D.sh_shade(n, gamma), torch.ones(1, 3, 4, 4), atol=0.05)

    fan = L.FAN().eval()
    deep = {}
    fan.downs[-1].register_forward_hook(lambda m, i, o: deep.update(d=o.shape))
    with torch.no_grad():
        a = fan(x)
    assert a.shape == (1, 3, 256, 256) and deep["d"][-2:] == (1, 1)   # extra block down to 1x1
    assert fan.inc.kernel_size == (3, 3) and fan.inc.stride == (1, 1) and fan.inc.out_channels == 16
    last = fan.outc[1]
    assert last.kernel_size == (3, 3) and last.stride == (1, 1)
    assert len(fan.downs) == 8
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    drn = L.DRN().eval()
    with torch.no_grad():
        r = drn(x)
    assert r.shape == (1, 1, 256, 256) and float(r.abs().max()) == 0.0   # starts without detail
    assert L.PatchDiscriminator()(x).shape == (1, 1, 30, 30)            # 70x70 patches


def test_fan_flip_features_are_the_mirrored_first_conv():
    fan = L.FAN(size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    got = {}
    fan.downs[0].register_forward_hook(lambda m, i, o: got.update({"in": i[0].clone()}))
    with torch.no_grad():
        fan(x)
        h = fan.inc(x)
    assert torch.allclose(got["in"], torch.cat([h, torch.flip(h, dims=[-1])], 1))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="power of two"):
        L.FAN(size=48)
    with pytest.raises(ValueError, match="input must be"):
        L.FAN(size=32)(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="n_albedo"):
        L.BNet(-1)


# ------------------------------------------------------------------------------------------------
# SH and losses against hand computations
# ------------------------------------------------------------------------------------------------
def test_sh_matches_geomfit_sh():
    from geomfit.sh import sh_basis

    rng = np.random.default_rng(0)
    n = rng.normal(size=(50, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    t = torch.from_numpy(n.T.reshape(1, 3, 5, 10).copy())
    got = D.sh_basis_t(t).reshape(9, 50).T.numpy()
    np.testing.assert_allclose(got, sh_basis(n), atol=1e-12)
    g = rng.normal(size=(9, 3))
    shade = D.sh_shade(t, torch.from_numpy(g)[None]).reshape(3, 50).T.numpy()
    np.testing.assert_allclose(shade, sh_basis(n) @ g, atol=1e-12)


def _rand(*s, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(size=s))


def test_bnet_loss_eq4_by_hand():
    tex, syn = _rand(2, 3, 4, 5, seed=1), _rand(2, 3, 4, 5, seed=2)
    vis = _rand(2, 1, 4, 5, seed=3) > 0.4
    p = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    t, s, v = tex.numpy(), syn.numpy(), vis.numpy()[:, 0]
    tot, cnt = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                if v[b, i, j]:
                    for c in range(3):
                        tot += abs(t[b, c, i, j] - s[b, c, i, j])
                        cnt += 1
    ea = ((1 + 4 + 0.25) + (0 + 9 + 1)) / 2
    want = tot / cnt + 0.7 * ea
    assert float(L.bnet_loss(tex, vis, syn, p, w_a=0.7)) == pytest.approx(want, rel=1e-12)


def test_gan_losses_eq6_by_hand():
    real = torch.tensor([[0.3, -1.2], [2.0, 0.1]], dtype=torch.float64)
    fake = torch.tensor([[-0.4, 0.9], [1.5, -2.2]], dtype=torch.float64)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    r, f = real.numpy(), fake.numpy()
    want_d = -np.mean(np.log(sig(r))) - np.mean(np.log(1 - sig(f)))
    want_g = -np.mean(np.log(sig(f)))
    assert float(L.gan_discriminator_loss(real, fake)) == pytest.approx(want_d, rel=1e-12)
    assert float(L.gan_generator_loss(fake)) == pytest.approx(want_g, rel=1e-12)


def test_perceptual_loss_eq8_by_hand():
    fa = [_rand(2, 3, 4, 4, seed=1), _rand(2, 5, 2, 2, seed=2)]
    fb = [_rand(2, 3, 4, 4, seed=3), _rand(2, 5, 2, 2, seed=4)]
    want = 0.0
    for b in range(2):
        s = 0.0
        for a, c in zip(fa, fb):
            diff = (a[b] - c[b]).numpy()
            s += math.sqrt((diff ** 2).sum()) / diff.size
        want += s / 2
    want /= 2
    assert float(L.perceptual_loss(fa, fb)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError):
        L.perceptual_loss(fa, fb[:1])


def test_fan_generator_loss_eq7_combines_terms():
    tex, syn = _rand(1, 3, 8, 8, seed=1), _rand(1, 3, 8, 8, seed=2)
    vis = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    logits = _rand(1, 1, 3, 3, seed=5) - 0.5
    feat = lambda x: [x, F.avg_pool2d(x, 2)]  # noqa: E731
    tot, parts = L.fan_generator_loss(tex, vis, syn, logits, feat, w_pixel=0.005, w_percep=0.3)
    want = (float(L.gan_generator_loss(logits)) + 0.005 * float((tex - syn).abs().mean())
            + 0.3 * float(L.perceptual_loss(feat(tex), feat(syn))))
    assert float(tot) == pytest.approx(want, rel=1e-12)
    assert parts["pixel"] == pytest.approx(float((tex - syn).abs().mean()))


def test_drn_loss_eq9_by_hand():
    S = 5
    tex, syn = _rand(1, 3, S, S, seed=1), _rand(1, 3, S, S, seed=2)
    vis = _rand(1, 1, S, S, seed=3) > 0.3
    mask = _rand(1, 1, S, S, seed=4) > 0.2
    delta = _rand(1, 3, S, S, seed=5) - 0.5
    t, s, v, m, d = tex.numpy()[0], syn.numpy()[0], vis.numpy()[0, 0], mask.numpy()[0, 0], delta.numpy()[0]
    g_sum, g_cnt, sm_sum, sm_cnt = 0.0, 0, 0.0, 0
    for i in range(S):
        for j in range(S):
            for (i2, j2) in ((i, j + 1), (i + 1, j)):
                if i2 >= S or j2 >= S:
                    continue
                if v[i, j] and v[i2, j2]:
                    for c in range(3):
                        g_sum += abs((t[c, i2, j2] - t[c, i, j]) - (s[c, i2, j2] - s[c, i, j]))
                        g_cnt += 1
                if m[i, j] and m[i2, j2]:
                    sm_sum += ((d[:, i2, j2] - d[:, i, j]) ** 2).sum()
                    sm_cnt += 1
    const = np.linalg.norm(d, axis=0)[m].mean()
    want = 0.5 * g_sum / g_cnt + 1.0 * const + 20.0 * sm_sum / sm_cnt
    tot, parts = L.drn_loss(tex, vis, syn, delta, mask)
    assert float(tot) == pytest.approx(want, rel=1e-6)
    assert parts["grad"] == pytest.approx(g_sum / g_cnt, rel=1e-9)


def test_loss_gradients_finite_and_match_finite_differences():
    torch.manual_seed(0)
    S = 6
    nrm = F.normalize(torch.randn(1, 3, S, S, dtype=torch.float64) + torch.tensor([0, 0, 2.0]).view(1, 3, 1, 1), dim=1)
    dpdu = torch.tensor([1.0, 0, 0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, S, S)
    dpdv = torch.tensor([0, 1.0, 0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, S, S)
    mask = torch.ones(1, 1, S, S, dtype=torch.bool)
    mask[..., 0, 0] = False
    rate = (0.05 * torch.randn(1, 1, S, S, dtype=torch.float64)).requires_grad_()
    gamma = torch.randn(1, 9, 3, dtype=torch.float64)
    albedo = torch.rand(1, 3, S, S, dtype=torch.float64)
    tex = torch.rand(1, 3, S, S, dtype=torch.float64)

    def f(r):
        n2 = D.displaced_normals(nrm, dpdu, dpdv, r, mask)
        return L.drn_loss(tex, mask, albedo * D.sh_shade(n2, gamma), r * nrm, mask)[0]

    assert torch.autograd.gradcheck(f, (rate,), eps=1e-6, atol=1e-5)
    f(rate).backward()
    assert torch.isfinite(rate.grad).all()
    # B-Net and FAN losses through their networks: all parameter gradients finite
    b = L.BNet(4, width=8)
    x = torch.rand(2, 3, 32, 32)
    p, g = b.split(b(x))
    am = D.PCAAlbedo(torch.rand(3, 32, 32), torch.rand(4, 3, 32, 32) * 0.1, torch.ones(32, 32, dtype=torch.bool))
    L.bnet_loss(x, torch.ones(2, 1, 32, 32), am(p) * D.sh_shade(F.normalize(torch.randn(2, 3, 32, 32), dim=1), g), p).backward()
    assert all(torch.isfinite(q.grad).all() for q in b.parameters() if q.grad is not None)
    fan, disc = L.FAN(size=32), L.PatchDiscriminator(ndf=8)
    a = fan(x)
    L.fan_generator_loss(x, torch.ones(2, 1, 32, 32), a, disc(a), lambda z: [z])[0].backward()
    assert all(torch.isfinite(q.grad).all() for q in fan.parameters() if q.grad is not None)


# ------------------------------------------------------------------------------------------------
# displacement (Sec. 3.4)
# ------------------------------------------------------------------------------------------------
def test_displaced_normals_of_a_ramp():
    S, Lsz, k = 8, 2.0, 0.6
    u = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    rate = (k * u).view(1, 1, 1, S).expand(1, 1, S, S)
    nrm = torch.tensor([0, 0, 1.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, S, S)
    dpdu = torch.tensor([Lsz, 0, 0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, S, S)
    dpdv = torch.tensor([0, Lsz, 0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, S, S)
    n2 = D.displaced_normals(nrm, dpdu, dpdv, rate, torch.ones(1, 1, S, S))
    want = np.array([-k / Lsz, 0, 1.0]) / np.hypot(k / Lsz, 1.0)    # surface z = k x / L
    np.testing.assert_allclose(n2[0, :, 3, 3].numpy(), want, atol=1e-12)
    np.testing.assert_allclose(n2[0, :, 0, 0].numpy(), want, atol=1e-12)  # one-sided at the border


def test_apply_displacement_moves_only_along_normals():
    from geomfit.mesh import vertex_normals

    n = 9
    xs = np.linspace(-1, 1, n)
    X, Y = np.meshgrid(xs, xs)
    v = np.stack([X.ravel(), Y.ravel(), 0.3 * np.exp(-(X ** 2 + Y ** 2)).ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    tc = np.stack([(X.ravel() + 1) / 2 * 0.9 + 0.05, (Y.ravel() + 1) / 2 * 0.9 + 0.05], 1)
    S = 32
    rr, cc = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    rate = 0.05 * np.sin(cc / 3.0) + 0.02 * np.cos(rr / 5.0)
    v2, rates = L.apply_displacement(v, f, tc, rate)
    nv = vertex_normals(v, f)
    dv = v2 - v
    assert np.abs(np.cross(dv, nv)).max() < 1e-12                    # parallel to the normal
    np.testing.assert_allclose((dv * nv).sum(1), rates, atol=1e-12)   # by the sampled rate
    # rate sampled at the vertex's texel position (v up: row = (1 - v) S)
    i = 40
    x, y = tc[i, 0] * S - 0.5, (1 - tc[i, 1]) * S - 0.5
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    ax, ay = x - x0, y - y0
    want = ((1 - ax) * (1 - ay) * rate[y0, x0] + ax * (1 - ay) * rate[y0, x0 + 1] + (1 - ax) * ay * rate[y0 + 1, x0]
            + ax * ay * rate[y0 + 1, x0 + 1])
    assert rates[i] == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        L.apply_displacement(v, f, tc, np.full((S, S), np.nan))


# ------------------------------------------------------------------------------------------------
# PCA albedo, perceptual networks, checkpoints
# ------------------------------------------------------------------------------------------------
def test_pca_albedo_from_textures_reconstructs_its_training_set():
    rng = np.random.default_rng(0)
    S, n = 8, 5
    base = rng.uniform(size=(3, S, S, 3))
    coef = rng.normal(size=(n, 3))
    tex = 0.5 + np.einsum("nk,kijc->nijc", coef, base) * 0.1
    m = L.PCAAlbedo.from_textures(tex, np.ones((n, S, S), bool), n_components=3)
    assert m.n_components == 3
    X = torch.from_numpy(tex.transpose(0, 3, 1, 2)).float()
    B = m.basis.reshape(3, -1).double()
    p = torch.linalg.lstsq(B.T, (X - m.mean).reshape(n, -1).double().T).solution.T.float()
    np.testing.assert_allclose(m(p).numpy(), X.numpy(), atol=1e-5)
    # unit-variance coefficients: projections of the data have variance ~1
    np.testing.assert_allclose(p.var(0, unbiased=True).numpy(), np.ones(3), rtol=1e-3)


def test_pca_albedo_from_a_vertex_colour_model():
    from types import SimpleNamespace

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], float)
    tc = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    f = np.array([[0, 1, 3], [0, 3, 2]])
    cm = np.tile([[200.0, 100.0, 50.0]], (4, 1))
    cb = np.zeros((4, 3, 2))
    cb[:, 0, 0] = [0, 255, 0, 255]          # red grows with u
    model = SimpleNamespace(color_mean=cm, color_basis=cb, texcoords=tc, faces=f, mean=v)
    m = L.PCAAlbedo.from_model(model, size=16)
    assert m.mask.all()
    np.testing.assert_allclose(m.mean[:, 5, 5].numpy(), [200 / 255, 100 / 255, 50 / 255], atol=1e-6)
    red = m.basis[0, 0].numpy()
    np.testing.assert_allclose(red[7], (np.arange(16) + 0.5) / 16, atol=1e-6)
    with pytest.raises(ValueError, match="colour"):
        L.PCAAlbedo.from_model(SimpleNamespace(color_mean=None, color_basis=None, texcoords=tc, faces=f), 8)


def test_vgg16_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = L.VGG16Features()
    sd = {k: v for k, v in ref.state_dict().items() if k.startswith("features.")}
    sd["classifier.0.weight"] = torch.zeros(2, 2)        # a whole torchvision checkpoint also works
    torch.save(sd, tmp_path / "vgg16.pth")
    net = L.perceptual_network(f"vgg16:{tmp_path / 'vgg16.pth'}")
    x = torch.rand(1, 3, 32, 32)
    feats = net(x)
    assert [t.shape[1] for t in feats] == [64, 128, 256, 512]
    for a, b in zip(feats, ref(x)):
        assert torch.equal(a, b)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="VGG-16"):
        L.perceptual_network(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        L.perceptual_network(tmp_path / "none.pth")


def test_identity_perceptual_features_when_available():
    try:
        net = L.perceptual_network("identity")
    except ValueError as e:
        pytest.skip(f"identity network not available: {e}")
    feats = net(torch.rand(1, 3, 32, 32))
    assert len(feats) >= 2 and all(torch.isfinite(t).all() for t in feats)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    b = L.BNet(3, width=8).eval()
    b.albedo_model = L.PCAAlbedo(torch.rand(3, 32, 32), torch.rand(3, 3, 32, 32), torch.ones(32, 32, dtype=torch.bool))
    fan = L.FAN(size=32).eval()
    fan.discriminator = L.PatchDiscriminator(ndf=8)
    drn = L.DRN(size=32)
    torch.nn.init.normal_(drn.outc[1].weight)
    drn.eval()
    for net in (b, fan, drn):
        p = L.save_detail_model(tmp_path / f"{type(net).__name__}.pt", net, extra={"steps": 3})
        back = L.load_detail_model(p)
        assert type(back) is type(net) and back.checkpoint_extra == {"steps": 3}
        with torch.no_grad():
            assert torch.equal(back(x), net(x))
    assert torch.equal(L.load_detail_model(tmp_path / "BNet.pt").albedo_model.basis, b.albedo_model.basis)
    assert isinstance(L.load_detail_model(tmp_path / "FAN.pt").discriminator, L.PatchDiscriminator)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        L.load_detail_model(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        L.load_detail_model(tmp_path / "missing.pt")
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# training on a tiny synthetic set: the losses fall, one texture is over-fitted
# ------------------------------------------------------------------------------------------------
def _synthetic_dataset(n=4, S=32, seed=0):
    """Textures = known albedo x SH shading of a known sphere-like normal field, partly invisible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid((np.arange(S) + 0.5) / S * 2 - 1, (np.arange(S) + 0.5) / S * 2 - 1, indexing="ij")
    z = np.sqrt(np.clip(1.5 - xx ** 2 - yy ** 2, 0.1, None))
    nrm = np.stack([xx, -yy, z], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    from geomfit.sh import sh_basis

    Y = sh_basis(nrm.reshape(-1, 3)).reshape(S, S, 9)
    tex, vis = [], []
    for i in range(n):
        alb = np.stack([0.6 + 0.1 * np.sin(4 * xx + i), 0.45 + 0.05 * yy, 0.35 + 0.05 * np.cos(3 * yy)], -1)
        alb += 0.05 * (np.sin(12 * xx) * np.sin(12 * yy))[..., None]  # fine detail
        g = np.zeros((9, 3))
        g[0] = 1 / 0.282095 * (0.8 + 0.1 * rng.uniform())
        g[1:4] = rng.normal(scale=0.3, size=(3, 3))
        tex.append(alb * (Y @ g))
        vis.append(xx < 0.6 + 0.1 * i)  # a cut-off side
    tex = np.clip(np.array(tex), 0, 1)
    vis = np.array(vis)
    tex = tex * vis[..., None]
    dpdu = np.broadcast_to([2.0, 0, 0], (n, S, S, 3))
    dpdv = np.broadcast_to([0, 2.0, 0], (n, S, S, 3))
    return L.UVDataset(texture=tex, visible=vis, mask=np.ones((n, S, S), bool), normals=np.broadcast_to(nrm, (n, S, S, 3)),
                       dpdu=dpdu, dpdv=dpdv)


def _drop(h, k=5):
    return float(np.mean(h[:k])), float(np.mean(h[-k:]))


def test_train_bnet_lowers_its_loss():
    ds = _synthetic_dataset(n=4, S=32)
    am = L.PCAAlbedo.from_textures(ds.texture, ds.visible, n_components=3)
    net, h = L.train_bnet(ds, am, steps=40, batch_size=4, lr=1e-3, width=8)
    first, last = _drop(h)
    print("bnet loss", first, "->", last)
    assert len(h) == 40 and np.isfinite(h).all() and last < 0.7 * first
    assert net.albedo_model is am and not net.training


def test_train_fan_overfits_one_texture_and_runs_with_bnet():
    ds = _synthetic_dataset(n=1, S=32)
    fan, h = L.train_fan(ds, steps=40, batch_size=1, lr=2e-3, ngf=8, w_gan=0.0, w_pixel=1.0, w_percep=0.0, perceptual=None)
    first, last = _drop(h)
    print("fan pixel loss (one texture)", first, "->", last)
    assert last < 0.4 * first
    # the paper's combination (B-Net guidance, GAN, pixel and a perceptual network) runs and stays finite
    ds4 = _synthetic_dataset(n=2, S=32)
    b, _ = L.train_bnet(ds4, L.PCAAlbedo.from_textures(ds4.texture, ds4.visible, 1), steps=2, batch_size=2, width=8)
    fan2, h2 = L.train_fan(ds4, bnet=b, steps=3, batch_size=2, ngf=8, ndf=8, perceptual=lambda x: [x, F.avg_pool2d(x, 4)])
    assert np.isfinite(h2).all() and len(fan2.loss_parts) == 3 and fan2.loss_parts[0]["percep"] > 0


def test_train_drn_lowers_its_loss():
    ds = _synthetic_dataset(n=2, S=32)
    drn, h = L.train_drn(ds, steps=40, batch_size=2, lr=1e-3, ngf=8, w_smooth=1.0, w_const=0.01)
    g0 = drn.loss_parts[0]["grad"]
    g1 = np.mean([p["grad"] for p in drn.loss_parts[-5:]])
    first, last = _drop(h)
    print("drn loss", first, "->", last, "grad term", g0, "->", g1)
    assert np.isfinite(h).all() and last < first and g1 < g0


def _reference_train_fan(ds, bnet, steps, seed, ngf, ndf):
    """train_fan as first written: the targets recomputed from the batch at every step (batch size 1)."""
    torch.manual_seed(seed)
    G, Dn = L.FAN(ngf=ngf, size=ds.size), L.PatchDiscriminator(ndf=ndf)
    opt_g = torch.optim.Adam(G.parameters(), lr=D.PAPER["lr"], betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(Dn.parameters(), lr=D.PAPER["lr"], betas=(0.5, 0.999))
    hist = []
    for idx in D._batches(len(ds), 1, steps, seed):
        b = ds.batch(idx)
        tex, vis, nrm, m = b["texture"], b["visible"], b["normals"], b["mask"]
        if bnet is not None:
            real, gamma = D._bnet_outputs(bnet, bnet.albedo_model, tex)
        else:
            real, gamma = D._default_albedo_light(tex, vis, nrm, ds.size / 32)
        albedo = G(tex)
        D._descend(opt_d, L.gan_discriminator_loss(Dn(real * m), Dn(albedo.detach() * m)))
        loss, _ = L.fan_generator_loss(tex, vis, albedo * D.sh_shade(nrm, gamma), Dn(albedo * m), None)
        hist.append(D._descend(opt_g, loss))
    G.discriminator = Dn
    return G, hist


def _reference_train_drn(ds, fan, bnet, steps, seed, ngf):
    """train_drn as first written: albedo and lighting recomputed from the batch at every step (batch size 1)."""
    torch.manual_seed(seed)
    net = L.DRN(ngf=ngf, size=ds.size)
    opt = torch.optim.Adam(net.parameters(), lr=D.PAPER["lr"])
    hist = []
    for idx in D._batches(len(ds), 1, steps, seed):
        b = ds.batch(idx)
        tex, vis, nrm, mask = b["texture"], b["visible"], b["normals"], b["mask"]
        with torch.no_grad():
            if fan is not None:
                albedo = fan.eval()(tex)
                gamma = D._bnet_outputs(bnet, bnet.albedo_model, tex)[1] if bnet else D._fit_sh(tex, vis, albedo, nrm)
            else:
                albedo, gamma = D._default_albedo_light(tex, vis, nrm, ds.size / 32)
                if bnet is not None:
                    gamma = D._bnet_outputs(bnet, bnet.albedo_model, tex)[1]
        rate = net(tex)
        synth = albedo * D.sh_shade(D.displaced_normals(nrm, b["dpdu"], b["dpdv"], rate, mask), gamma)
        hist.append(D._descend(opt, L.drn_loss(tex, vis, synth, rate * nrm, mask)[0]))
    return net, hist


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fan_drn_targets_computed_once_per_map_bitwise_as_per_step(monkeypatch):
    """FAN's and DRN's targets (albedo, lighting, shading) do not depend on the weights being trained:
    they are computed once per map, not at every step. With one map per step the trained weights and
    losses are bitwise those of the per-step recomputation (8 steps over 3 maps: each map reused)."""
    ds = _synthetic_dataset(n=3, S=32)
    b, _ = L.train_bnet(ds, L.PCAAlbedo.from_textures(ds.texture, ds.visible, 2), steps=2, batch_size=2, width=8)
    for bnet in (None, b):
        fan, h = L.train_fan(ds, bnet=bnet, steps=8, batch_size=1, ngf=8, ndf=8, perceptual=None, seed=1)
        ref, href = _reference_train_fan(ds, bnet, 8, 1, 8, 8)
        assert h == href and _same_weights(fan, ref)
    for kw in (dict(), dict(fan=fan), dict(bnet=b), dict(fan=fan, bnet=b)):
        drn, h = L.train_drn(ds, steps=8, batch_size=1, ngf=8, seed=2, **kw)
        ref, href = _reference_train_drn(ds, kw.get("fan"), kw.get("bnet"), 8, 2, 8)
        assert h == href and _same_weights(drn, ref), kw
    # how often the fixed parts are evaluated: once per map that the steps use
    seen = []
    for name, tex_arg in (("_default_albedo_light", 0), ("_bnet_outputs", 2)):
        def counted(*a, _fn=getattr(D, name), _i=tex_arg):
            seen.append(a[_i].shape[0])
            return _fn(*a)
        monkeypatch.setattr(D, name, counted)
    L.train_fan(ds, steps=8, batch_size=2, ngf=8, ndf=8, perceptual=None)      # stand-in: 3 maps
    L.train_drn(ds, bnet=b, steps=8, batch_size=2, ngf=8)                      # stand-in + B-Net: 3 + 3
    L.train_drn(ds.subset([0]), steps=3, batch_size=1, ngf=8)                  # stand-in: 1 map
    assert sum(seen) == 3 + 6 + 1  # per step it was 16 + 32 + 3


# ------------------------------------------------------------------------------------------------
# UVDataset from the shared photo
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_SFM, reason="GEOMFIT_DATA with sfm/ and images/image_0010.pts not available")
def test_uvdataset_from_photo_cache_and_training(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from _fit_helpers import load_sfm

    m = load_sfm(DATA / "sfm")
    photo = DATA / "images" / "image_0010.png"
    cache = tmp_path / "uv.npz"
    ds = L.UVDataset.from_photos([photo], landmarks="pts", model=m, size=64, cache=cache)
    assert len(ds) == 1 and ds.size == 64 and cache.is_file()
    ref = geomfit.uv_texture(geomfit.read_image(photo),
                             geomfit.fit_landmarks(m, geomfit.read_pts(DATA / "images" / "image_0010.pts"),
                                                   (1024, 1280)), size=64)
    np.testing.assert_allclose(ds.texture[0], ref.texture, atol=1e-6)
    np.testing.assert_array_equal(ds.visible[0], ref.visible)
    again = L.UVDataset.from_photos([photo], landmarks="pts", model=m, size=64, cache=cache)
    np.testing.assert_array_equal(again.texture, ds.texture)
    with pytest.raises(ValueError, match="landmark entries"):
        L.UVDataset.from_photos([photo, photo], landmarks=[None], model=m, size=64)
    # each stage on the real texture: the loss falls
    b, hb = L.train_bnet(ds, steps=25, batch_size=1, lr=1e-3, width=8)
    d, hd = L.train_drn(ds, bnet=b, steps=25, batch_size=1, lr=1e-3, ngf=8)
    print("photo: bnet", _drop(hb), "drn", _drop(hd))
    assert _drop(hb)[1] < _drop(hb)[0]
    assert np.isfinite(hd).all()


def test_uvdataset_validation(tmp_path):
    ds = _synthetic_dataset(n=2, S=8)
    with pytest.raises(ValueError, match="visible"):
        L.UVDataset(texture=ds.texture, visible=ds.visible[:1], mask=ds.mask, normals=ds.normals, dpdu=ds.dpdu, dpdv=ds.dpdv)
    p = ds.save(tmp_path / "d.npz")
    back = L.UVDataset.load(p)
    np.testing.assert_array_equal(back.texture, ds.texture)
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="UVDataset"):
        L.UVDataset.load(tmp_path / "x.npz")


# ------------------------------------------------------------------------------------------------
# command line: train-detail (resumable) and reconstruct --detail
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_SFM, reason="GEOMFIT_DATA with sfm/ and images/image_0010.pts not available")
def test_cli_train_detail_and_reconstruct_detail(tmp_path, capsys):
    import trimesh

    from geomfit.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("image_0010.png", "image_0010.pts"):
        (photos / name).symlink_to(DATA / "images" / name)
    out = tmp_path / "nets"
    args = ["train-detail", str(photos), "-o", str(out), "--size", "64", "--steps", "2", "--batch", "1",
            "--perceptual", "none", "-q"]
    assert main(args) == 0
    for k in ("bnet", "fan", "drn"):
        assert L.load_detail_model(out / f"{k}.pt").checkpoint_extra["steps"] == 2
    stamp = (out / "fan.pt").stat().st_mtime_ns
    assert main(args) == 0                                   # resumed: nothing retrained
    assert (out / "fan.pt").stat().st_mtime_ns == stamp
    rec = tmp_path / "rec"
    assert main(["reconstruct", str(DATA / "images" / "image_0010.png"), "--landmarks",
                 str(DATA / "images" / "image_0010.pts"), "-o", str(rec), "--no-fine", "--max-side", "256", "-q",
                 "--detail", f"drn:{out / 'drn.pt'}", "--detail", f"fan:{out / 'fan.pt'}"]) == 0
    med = trimesh.load(rec / "medium.obj", process=False)
    det = trimesh.load(rec / "detail.obj", process=False)
    assert len(det.vertices) > 10 * len(med.vertices)       # subdivided twice before displacement
    np.testing.assert_allclose(det.vertices[:len(med.vertices)], med.vertices, atol=1.0)  # small rates
    z = np.load(rec / "detail_maps.npz")
    assert z["rate"].shape == (64, 64) and z["albedo"].shape == (64, 64, 3)
    # v' = v + r n with |n| = 1 and r sampled bilinearly from the saved map: no vertex moves further
    # than the largest rate (plus the OBJ files' rounding)
    moved = np.linalg.norm(np.asarray(det.vertices[:len(med.vertices)]) - np.asarray(med.vertices), axis=1)
    assert moved.max() <= np.abs(z["rate"]).max() + 1e-5
    assert (rec / "albedo_uv.png").is_file()
    capsys.readouterr()
    assert main(["reconstruct", str(DATA / "images" / "image_0010.png"), "-o", str(tmp_path / "x"),
                 "--detail", str(tmp_path / "missing.pt")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synthetic_detail_set_is_consistent_with_displaced_normals():
    ds, rate, nt = D.synthetic_detail_set(n=2, size=32, seed=3, amplitude=0.006, wavelength_texels=4.0)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(rate).float()[:, None]

    none = D.normal_error_deg(None, ds, nt)
    true = D.normal_error_deg(Fixed(), ds, nt)
    print("synthetic normal error: none", none, "true rate", true)
    assert none > 1.0 and true < 0.1 * none   # the first-order displaced normals reproduce the exact surface's


def test_every_learned_export_resolves():
    for name in L.__all__:
        assert getattr(L, name) is not None, name


def test_top_level_patch_discriminator_is_compatible_with_pix2pix():
    from geomfit.learned import pix2pix

    torch.manual_seed(0)
    theirs = pix2pix.PatchDiscriminator(2, 4).eval()
    ours = L.PatchDiscriminator(2, 4).eval()
    ours.load_state_dict(theirs.state_dict())          # same keys and shapes
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert L.PatchDiscriminator()(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
