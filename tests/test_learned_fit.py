"""geomfit.learned.fit_photometric(_multi): recovering known faces from synthetic renderings, real photo."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0)")

from geomfit.camera import euler_to_matrix  # noqa: E402
from geomfit.fitting import fit_landmarks, fit_landmarks_multi  # noqa: E402
from geomfit.learned import fit_photometric, fit_photometric_multi, render  # noqa: E402
from geomfit.learned.photometric import sh_basis_torch, vertex_normals  # noqa: E402
from geomfit.metrics import kabsch  # noqa: E402


@pytest.fixture(scope="module")
def sfm(sfm_dir):
    from geomfit.data import resolve_model

    return resolve_model(str(sfm_dir)) if False else resolve_model("sfm")


@pytest.fixture(autouse=True)
def one_thread():
    """The fits are small: one torch thread is fastest on a shared machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic_face(model, seed, size=128, yaw=20.0, pitch=-5.0, idc=None, light=(0.5, 0.3, 0.8)):
    """A face of the model with known identity, expression, pose, smooth albedo and SH light, rendered
    by geomfit.learned.render over a noisy background, with 1 % pixel noise. Landmarks: the model's
    fixed landmark vertices projected, jaw (iBUG 1-17) missing."""
    rng = np.random.default_rng(seed)
    idc = rng.normal(size=model.n_id) if idc is None else idc
    exc = rng.uniform(0, 0.4, model.n_exp) * (rng.random(model.n_exp) < 0.3)
    V = model.shape(idc, exc)
    R = euler_to_matrix(*np.deg2rad([yaw, pitch, 0.0]))
    s = 0.6 * size / np.ptp(model.mean[:, 0])
    q = s * V @ R.T
    t = np.array([size / 2, size / 2]) - q[:, :2].mean(0)
    scr = np.stack([q[:, 0] + t[0], size - (q[:, 1] + t[1]), q[:, 2]], 1)
    c = model.mean - model.mean.mean(0)
    alb = np.array([0.55, 0.38, 0.3]) * (1 + 0.15 * np.sin(c[:, :1] / 25.0) * np.cos(c[:, 1:2] / 30.0))
    ld = np.asarray(light, dtype=float) / np.linalg.norm(light)
    sh = np.zeros((9, 3))
    sh[0] = 0.6 / 0.282095
    sh[[3, 1, 2]] = 0.6 * ld[:, None] / 0.488603
    n = vertex_normals(torch.tensor(V), torch.as_tensor(model.faces)) @ torch.tensor(R).T
    col = torch.tensor(alb) * (sh_basis_torch(n) @ torch.tensor(sh))
    img, m = render(torch.tensor(scr), model.faces, col, (size, size))
    bg = 0.25 + 0.05 * rng.random((size, size, 3))
    img = np.where(m.numpy()[..., None], img.numpy(), bg)
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    keys, vid = model.landmark_arrays()
    L = np.full((68, 2), np.nan)
    L[keys - 1] = scr[vid, :2]
    L[:17] = np.nan
    return img, L, V, idc


def shape_error(A, B):
    """RMS vertex distance after the best similarity alignment (model units, mm for the SFM)."""
    R, t, s = kabsch(A, B, scale=True)
    return float(np.sqrt((((s * A @ R.T + t) - B) ** 2).sum(1).mean()))


@pytest.mark.parametrize("seed", [2, 3])
def test_recovers_synthetic_shape_better_than_landmarks(sfm, seed):
    img, L, V, _ = synthetic_face(sfm, seed)
    lf = fit_landmarks(sfm, L, img.shape[:2])
    pf = fit_photometric(sfm, img, L, landmark_fit=lf, max_side=None)
    e_lm, e_ph = shape_error(lf.vertices, V), shape_error(pf.vertices, V)
    assert e_ph <= 0.8 * e_lm, (e_ph, e_lm)
    assert pf.photometric_error < 0.012  # 1 % Gaussian noise has a mean absolute value of 0.008
    assert pf.rendered.shape == img.shape and pf.mask.any()
    assert pf.loss_history[-1] < 0.2 * pf.loss_history[0]
    assert pf.albedo.shape == (sfm.n_vertices, 3) and pf.sh.shape == (9, 3)


def test_real_photo_matches_better_than_landmark_geometry(data, sfm):
    from geomfit.io import read_pts
    from geomfit.photo import read_image, srgb_to_linear

    img = srgb_to_linear(read_image(data / "images" / "image_0010.png"))
    L = read_pts(data / "images" / "image_0010.pts")
    lf = fit_landmarks(sfm, L, img.shape[:2])
    # same light and texture freedom, same iterations; only the geometry differs
    fixed = fit_photometric(sfm, img, L, landmark_fit=lf, fit_geometry=False)
    full = fit_photometric(sfm, img, L, landmark_fit=lf)
    assert full.photometric_error < 0.97 * fixed.photometric_error
    both = fixed.mask & full.mask
    assert both.sum() > 0.9 * fixed.mask.sum()
    # camera returned in input-image pixels: the projected landmarks stay on the photo's landmarks
    from geomfit.fitting import project

    P = project(full.vertices, full.rotation, full.scale, full.translation, img.shape[:2])
    ok = lf.landmark_vertices >= 0
    rms = np.sqrt(((P[lf.landmark_vertices[ok]] - L[ok]) ** 2).sum(1).mean())
    assert rms < 2.0 * lf.rmse_px


def test_multi_image_shared_identity(sfm):
    idc = np.random.default_rng(11).normal(size=sfm.n_id)
    views = [synthetic_face(sfm, 20, yaw=25.0, idc=idc, light=(0.6, 0.2, 0.8)),
             synthetic_face(sfm, 21, yaw=-25.0, idc=idc, light=(-0.4, 0.4, 0.8))]
    imgs, Ls = [v[0] for v in views], [v[1] for v in views]
    neutral = sfm.shape(idc)
    lfm = fit_landmarks_multi(sfm, np.stack(Ls), np.array([im.shape[:2] for im in imgs]))
    pf = fit_photometric_multi(sfm, imgs, Ls, iterations=200, warmup=50, max_side=None)
    assert pf.exp_coeffs.shape == (2, sfm.n_exp) and pf.sh.shape == (2, 9, 3)
    e_lm = shape_error(sfm.shape(lfm.id_coeffs), neutral)
    e_ph = shape_error(sfm.shape(pf.id_coeffs), neutral)
    assert e_ph <= 0.8 * e_lm, (e_ph, e_lm)
    # the two lights are told apart: the fitted x components have opposite signs
    assert pf.sh[0, 3].mean() > 0 > pf.sh[1, 3].mean()


def test_texture_module_and_identity_loss_plumbing(sfm):
    """A user's texture generator and the identity network plug in; the objective decreases."""
    from geomfit.learned.identity import FaceIdentity, dlib_model_path

    class Gen(torch.nn.Module):
        latent_dim = 8

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3 * 16 * 16)

        def forward(self, z):
            return torch.sigmoid(self.lin(z)).view(1, 3, 16, 16)

    torch.manual_seed(0)
    img, L, V, _ = synthetic_face(sfm, 5)
    ident = FaceIdentity.from_dlib() if dlib_model_path() is not None else None
    pf = fit_photometric(sfm, img, L, texture=Gen(), identity=ident, iterations=3, warmup=1, max_side=None)
    assert np.isfinite(pf.loss_history).all() and pf.loss_history[-1] < pf.loss_history[0]
    if ident is not None:
        assert pf.losses["id"] > 0 and pf.losses["con"] > 0


def test_bad_input(sfm):
    img = np.zeros((32, 32, 3))
    L = np.full((68, 2), 10.0)
    with pytest.raises(ValueError, match="landmarks must have shape"):
        fit_photometric(sfm, img, L[:60])
    with pytest.raises(ValueError, match="image must have shape"):
        fit_photometric(sfm, img[..., 0], L)
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    img2, L2, _, _ = synthetic_face(sfm, 1, size=64)
    bad = img2.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_photometric(sfm, bad, L2, iterations=1)

    class NoLatent(torch.nn.Module):
        def forward(self, z):
            return z

    with pytest.raises(ValueError, match="latent_dim"):
        fit_photometric(sfm, img2, L2, texture=NoLatent(), iterations=1)
    with pytest.raises(ValueError, match="2 images but 1"):
        fit_photometric_multi(sfm, [img2, img2], [L2])


# ------------------------------------------------------------------------------------------------
# FastGANFit and GANFit++
# ------------------------------------------------------------------------------------------------
def test_chip_camera_round_trip():
    """The chip-frame camera projects exactly where the image camera lands after the chip similarity."""
    from geomfit.fitting import project
    from geomfit.learned.fastganfit import _chip_similarity, from_chip_camera, to_chip_camera

    rng = np.random.default_rng(0)
    R = euler_to_matrix(0.3, -0.2, 0.1)
    s, t, h = 2.5, np.array([300.0, 250.0]), 480
    V = rng.normal(size=(40, 3)) * 30
    L = np.zeros((68, 2))
    from geomfit.learned.identity import DLIB_CHIP_TEMPLATE

    L[17:] = DLIB_CHIP_TEMPLATE * 200 + [220, 140] + rng.normal(0, 3, (51, 2))
    M, off = _chip_similarity(L, 112)
    Rc, sc, tc = to_chip_camera(R, s, t, h, M, off, 112)
    P_img = project(V, R, s, t, (h, 640))
    P_chip = project(V, Rc, sc, tc, (112, 112))
    np.testing.assert_allclose(P_img @ M.T + off, P_chip, atol=1e-9)
    R2, s2, t2 = from_chip_camera(Rc, sc, tc, h, M, off, 112)
    np.testing.assert_allclose(R2, R, atol=1e-12)
    np.testing.assert_allclose([s2, *t2], [s, *t], atol=1e-9)


def _write_folder(model, folder, seeds):
    import cv2

    from geomfit.photo import linear_to_srgb

    for sd in seeds:
        img, L, _, _ = synthetic_face(model, sd, yaw=float(np.random.default_rng(sd).uniform(-25, 25)))
        # finite jaw points for the .pts file: projected contour candidates are good enough here
        fit = fit_landmarks(model, L, img.shape[:2])
        cv = np.asarray(model.contours["right"])[np.linspace(0, len(model.contours["right"]) - 1, 8).astype(int)]
        cl = np.asarray(model.contours["left"])[np.linspace(0, len(model.contours["left"]) - 1, 8).astype(int)]
        L[:8] = fit.projected[cv]
        L[9:17] = fit.projected[cl]
        L[8] = fit.projected[model.landmarks[9]] if 9 in model.landmarks else L[7]
        for i in np.nonzero(~np.isfinite(L).all(1))[0]:  # inner-mouth corners the SFM does not map
            L[i] = (L[i - 1] + L[i + 1]) / 2 if np.isfinite(L[i - 1]).all() and np.isfinite(L[i + 1]).all() else L[48]
        u8 = np.round(linear_to_srgb(img) * 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"face{sd}.png"), u8[..., ::-1])
        from geomfit.io import write_pts

        write_pts(folder / f"face{sd}.pts", L)


def test_fastganfit_trains_saves_loads_and_starts_ganfit_pp(sfm, tmp_path):
    from geomfit.learned import FastGANFit, ganfit_plus_plus, train_fastganfit
    from geomfit.learned.fastganfit import collect_targets

    _write_folder(sfm, tmp_path, [31, 32, 33, 34])
    net, log = train_fastganfit(sfm, tmp_path, epochs=60, batch_size=4, fit="landmarks", chip_size=64, width=8,
                                checkpoint=tmp_path / "net.pt")
    assert log["loss"][-1] < 0.2 * log["loss"][0]
    again = FastGANFit.load(tmp_path / "net.pt")
    chips, targets, names = collect_targets(sfm, tmp_path, fit="landmarks", chip_size=64)
    with torch.no_grad():
        a, b = net.predict(chips), again.predict(chips)
    torch.testing.assert_close(a, b)
    # the regressor reproduces its training fits much better than the spread of the targets
    K = sfm.n_id
    err = (a[:, :K] - targets[:, :K]).pow(2).mean().sqrt()
    spread = (targets[:, :K] - targets[:, :K].mean(0)).pow(2).mean().sqrt()
    assert float(err) < 0.5 * float(spread)
    # GANFit++ from the regressed start, in the photo's pixels
    from geomfit.io import read_pts
    from geomfit.photo import read_image, srgb_to_linear

    img = srgb_to_linear(read_image(tmp_path / "face31.png"))
    L = read_pts(tmp_path / "face31.pts")
    pf = ganfit_plus_plus(net, sfm, img, L, iterations=20, warmup=10, max_side=None)
    assert np.isfinite(pf.photometric_error) and pf.photometric_error < 0.05
    with pytest.raises(ValueError, match="not a FastGANFit checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"nonsense")
        FastGANFit.load(tmp_path / "bad.pt")


def test_pipeline_coarse_photometric(data):
    from geomfit.pipeline import reconstruct

    kw = dict(landmarks=str(data / "images" / "image_0010.pts"), max_side=256, fine=False)
    ph = reconstruct(str(data / "images" / "image_0010.png"), coarse="photometric",
                     photometric_options=dict(iterations=20, warmup=10, num_threads=1), **kw)
    assert np.isfinite(ph.diagnostics["photometric_error"])
    lm = reconstruct(str(data / "images" / "image_0010.png"), **kw)
    assert not np.allclose(ph.id_coeffs, lm.id_coeffs)
    with pytest.raises(ValueError, match="coarse must be"):
        reconstruct(str(data / "images" / "image_0010.png"), coarse="gan", **kw)


def test_cli_has_coarse_option():
    from geomfit.cli import build_parser

    a = build_parser().parse_args(["reconstruct", "x.png", "-o", "out", "--coarse", "photometric"])
    assert a.coarse == "photometric"
    assert build_parser().parse_args(["reconstruct", "x.png", "-o", "out"]).coarse == "landmarks"


def test_no_host_sync_per_iteration_in_the_fit_loop(sfm, monkeypatch):
    """On CUDA every float()/item()/bool() of a tensor waits for the GPU. The optimisation loop of
    fit_photometric keeps its bookkeeping (losses, history) on the device: the number of such
    conversions made by photometric.py itself does not grow with the iterations (the renderer's own
    checks and the boolean-mask indexing of the pixel loss are counted separately, not here)."""
    import sys

    from geomfit.learned.identity import FaceIdentity, dlib_model_path

    img, L, _, _ = synthetic_face(sfm, 2, size=64)
    lf = fit_landmarks(sfm, L, img.shape[:2])
    ident = FaceIdentity.from_dlib() if dlib_model_path() is not None else None
    calls = []
    for name in ("__float__", "__bool__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.endswith("photometric.py"):
                calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for iterations in (1, 4):
        calls.clear()
        fit_photometric(sfm, img, L, landmark_fit=lf, identity=ident, iterations=iterations, warmup=1, max_side=None)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts
