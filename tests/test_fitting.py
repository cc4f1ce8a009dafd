"""Tests of the coarse stage (Wang et al., ICME 2020, Eq. 1): Jacobians, synthetic recovery, batch, multi, bad input."""
import dataclasses

import numpy as np
import pytest

from geomfit.camera import rodrigues
from geomfit import fitting as F
from geomfit.fitting import fit_landmarks, fit_landmarks_multi, project
from geomfit.model import MorphableModel

from _fit_helpers import load_sfm

HW = np.array([1000.0, 1000.0])


def random_model(seed=0, n=150, K=8, E=3, contours=True):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, 3)) * np.array([30.0, 35.0, 20.0])
    idb = rng.normal(size=(n, 3, K)) * 2.0
    exb = rng.normal(size=(n, 3, E)) * 1.5
    faces = rng.integers(0, n, size=(10, 3))
    perm = rng.permutation(n)
    lm = {k: int(perm[i]) for i, k in enumerate(k for k in range(9, 69) if k not in (61, 65))}
    cont = {}
    if contours:
        cont = {"right": [int(v) for v in perm[60:76]], "left": [int(v) for v in perm[76:92]]}
    else:
        lm.update({k: int(perm[60 + k]) for k in list(range(1, 9)) + list(range(10, 18))})
    return MorphableModel(mean=mean, id_basis=idb, exp_basis=exb, faces=faces, landmarks=lm, contours=cont,
                          name="random")


def synth(model, B, seed=0, yaw=40.0, id_scale=0.7, n_id=None):
    """Random instances and poses projected to 2D; contour landmarks on every other candidate."""
    rng = np.random.default_rng(seed)
    K = model.n_id if n_id is None else n_id
    al = np.zeros((B, model.n_id))
    al[:, :K] = rng.normal(size=(B, K)) * id_scale
    be = rng.uniform(0, 0.8, size=(B, model.n_exp))
    ang = np.deg2rad(np.c_[rng.uniform(-15, 15, B), rng.uniform(-yaw, yaw, B), rng.uniform(-10, 10, B)])
    R = rodrigues(ang)
    s = rng.uniform(1.5, 3.0, B)
    t = np.c_[rng.uniform(400, 600, B), rng.uniform(400, 600, B)]
    L = landmarks_of(model, al, be, R, s, t)
    return L, al[:, :K], be, R, s, t


def landmarks_of(model, al, be, R, s, t):
    P = project(model.shape(al, be), R, s, t, HW)
    L = np.full((P.shape[0], 68, 2), np.nan)
    for k, v in model.landmarks.items():
        L[:, k - 1] = P[:, v]
    if model.contours:
        for j, i in enumerate(range(1, 9)):
            L[:, i - 1] = P[:, model.contours["right"][2 * j]]
        for j, i in enumerate(range(10, 18)):
            L[:, i - 1] = P[:, model.contours["left"][2 * j]]
    return L


def rot_err_deg(Ra, Rb):
    fro = np.linalg.norm(Ra - Rb, axis=(-2, -1))  # = 2 sqrt(2) sin(angle / 2)
    return np.degrees(2 * np.arcsin(np.clip(fro / (2 * np.sqrt(2)), 0, 1)))


@pytest.fixture(scope="module")
def sfm(sfm_dir):
    return load_sfm(sfm_dir)


# -- Jacobian and normal equations -----------------------------------------------------------------
def _setup(model, B=3, seed=1, drop=()):
    L, al, be, R, s, t = synth(model, B, seed=seed)
    L = L + np.random.default_rng(seed).normal(size=L.shape) * 3.0
    for b, k in drop:
        L[b, k] = np.nan
    p = F._prep(model, None, None, np)
    _, Ln, w, c, d, hw = F._prepare_landmarks(L, HW, None, np, p)
    reg = np.full(p.P, 0.01)
    rng = np.random.default_rng(seed + 1)
    coef = np.c_[al, be] + rng.normal(size=(B, p.P)) * 0.3
    ang = rodrigues(rng.normal(size=(B, 3)) * 0.05) @ R
    return p, Ln, w, ang, s / d, (t - c) / d[:, None], coef, reg


def test_jacobian_matches_finite_differences():
    model = random_model()
    p, Ln, w, R, s, t, coef, reg = _setup(model, drop=[(0, 20), (1, 3)])
    cost, r, Us, sel = F._evaluate(p, Ln, w, R, s, t, coef, reg)
    Jp, Js, _ = F._jacobian(p, R, s, Us, sel, w)
    J = np.swapaxes(np.concatenate([Jp, Js], -1), 1, 2)  # (B, M, 2, 6+P)
    npar = J.shape[-1]
    eps = 1e-6
    for i in range(npar):
        d = np.zeros((R.shape[0], npar))
        d[:, i] = eps
        rp = F._evaluate(p, Ln, w, *F._apply_step(R, s, t, coef, d, np), reg)
        rm = F._evaluate(p, Ln, w, *F._apply_step(R, s, t, coef, -d, np), reg)
        assert np.array_equal(rp[3], sel) and np.array_equal(rm[3], sel)
        fd = (rp[1] - rm[1]) / (2 * eps)
        np.testing.assert_allclose(J[..., i], fd, atol=1e-7 * max(1.0, np.abs(fd).max()), err_msg=f"param {i}")
    # the cost includes the regulariser exactly
    np.testing.assert_allclose(cost, (r ** 2).sum((1, 2)) + (coef ** 2) @ reg)


def test_structured_normal_equations_equal_direct():
    model = random_model()
    p, Ln, w, R, s, t, coef, reg = _setup(model, B=4, drop=[(0, 20), (0, 40), (2, 30), (3, 5)])
    cost, r, Us, sel = F._evaluate(p, Ln, w, R, s, t, coef, reg)
    Hf, gf = F._normal_equations(p, R, s, coef, r, Us, sel, w, reg, fast=True)
    Hd, gd = F._normal_equations(p, R, s, coef, r, Us, sel, w, reg, fast=False)
    Jp, Js, _ = F._jacobian(p, R, s, Us, sel, w)
    J = np.concatenate([Jp, Js], -1).reshape(R.shape[0], -1, 6 + p.P)
    Href = np.swapaxes(J, 1, 2) @ J
    Href[:, 6:, 6:] += np.diag(reg)
    np.testing.assert_allclose(Hd, Href, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Hf, Hd, rtol=1e-9, atol=1e-10 * np.abs(Hd).max())
    np.testing.assert_allclose(gf, gd)


# -- synthetic recovery ------------------------------------------------------------------------------
def test_recovery_noise_free_random_model():
    # random point clouds have no face-like contour, so here the jaw landmarks are fixed vertices;
    # the sliding contour is covered on the Surrey model below
    model = random_model(contours=False)
    L, al, be, R, s, t = synth(model, 8, seed=2)
    res = fit_landmarks(model, L, HW, w_id=0, w_exp=0, ftol=1e-14, xtol=1e-12, max_iter=200)
    assert res.converged.all()
    np.testing.assert_allclose(res.id_coeffs, al, atol=1e-6)
    np.testing.assert_allclose(res.exp_coeffs, be, atol=1e-6)
    np.testing.assert_allclose(res.rotation, R, atol=1e-8)
    np.testing.assert_allclose(res.scale, s, rtol=1e-8)
    np.testing.assert_allclose(res.translation, t, atol=1e-6)
    assert res.rmse_px.max() < 1e-6


def test_recovery_noise_free_sfm(sfm):
    L, al, be, R, s, t = synth(sfm, 6, seed=3)
    res = fit_landmarks(sfm, L, HW, w_id=0, w_exp=0, ftol=1e-14, xtol=1e-12, max_iter=200)
    assert res.converged.all()
    np.testing.assert_allclose(res.id_coeffs, al, atol=1e-5)
    np.testing.assert_allclose(res.exp_coeffs, be, atol=1e-6)
    assert rot_err_deg(res.rotation, R).max() < 1e-6
    np.testing.assert_allclose(res.scale, s, rtol=1e-8)
    np.testing.assert_allclose(res.translation, t, atol=1e-5)
    # the generating contour vertices are found again
    np.testing.assert_array_equal(res.contour_vertices[:, :8], np.array(sfm.contours["right"][0:16:2])[None].repeat(6, 0))
    # full-mesh outputs are consistent with the parameters
    np.testing.assert_allclose(res.projected, project(sfm.shape(al, be), R, s, t, HW), atol=1e-5)


def test_recovery_one_pixel_noise_sfm(sfm):
    L, al, be, R, s, t = synth(sfm, 20, seed=4)
    Ln = L + np.random.default_rng(5).normal(size=L.shape)
    res = fit_landmarks(sfm, Ln, HW)
    assert res.converged.all()
    rerr = rot_err_deg(res.rotation, R)
    serr = np.abs(res.scale / s - 1)
    verr = np.linalg.norm(res.projected - project(sfm.shape(al, be), R, s, t, HW), axis=-1)
    print(f"\n1 px noise, 20 faces: rotation error median {np.median(rerr):.2f} max {rerr.max():.2f} deg; "
          f"scale error max {serr.max():.3%}; landmark RMS {res.rmse_px.mean():.2f} px; "
          f"mesh 2D error median {np.median(verr):.2f} px, 95% {np.percentile(verr, 95):.2f} px")
    assert rerr.max() < 5.0
    assert serr.max() < 0.10  # scale trades off against identity (face size) under noise
    assert 0.7 < res.rmse_px.mean() < 2.0  # the residual is at the noise level (2D RMS of the noise: 1.41 px)
    assert np.percentile(verr, 95) < 10.0


def test_nan_landmarks_are_ignored(sfm):
    L, al, be, R, s, t = synth(sfm, 1, seed=6)
    L = L[0]
    L[[2, 20, 33, 50, 12]] = np.nan
    res = fit_landmarks(sfm, L, HW, w_id=0, w_exp=0, ftol=1e-14, xtol=1e-12, max_iter=200, n_id=20)
    ref = fit_landmarks(sfm, L, HW, visible=~np.isnan(L).any(1), w_id=0, w_exp=0, ftol=1e-14, xtol=1e-12,
                        max_iter=200, n_id=20)
    assert res.converged and res.rmse_px < 1.0
    assert (res.landmark_vertices[[2, 20, 33, 50, 12]] == -1).all()
    np.testing.assert_allclose(res.rotation, ref.rotation)
    assert res.cost_history.ndim == 1 and np.all(np.diff(res.cost_history) <= 1e-12 * res.cost_history[0])


# -- batch and multi ------------------------------------------------------------------------------
def test_batch_equals_single(sfm):
    L, *_ = synth(sfm, 4, seed=7)
    L = L + np.random.default_rng(8).normal(size=L.shape) * 2
    L[1, 5] = np.nan
    batch = fit_landmarks(sfm, L, HW)
    for b in range(4):
        one = fit_landmarks(sfm, L[b], HW)
        assert one.iterations == batch.iterations[b] and one.converged == batch.converged[b]
        np.testing.assert_allclose(one.id_coeffs, batch.id_coeffs[b], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(one.rotation, batch.rotation[b], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(one.projected, batch.projected[b], rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(one.rmse_px, batch.rmse_px[b], rtol=1e-7)


def test_multi_recovers_shared_identity_better(sfm):
    L, al, be, R, s, t = synth(sfm, 6, seed=9)
    al[:] = al[0]
    L = landmarks_of(sfm, al, be, R, s, t)
    Ln = L + np.random.default_rng(10).normal(size=L.shape) * 1.0
    multi = fit_landmarks_multi(sfm, list(Ln), HW)
    single = fit_landmarks(sfm, Ln, HW)
    e_multi = np.abs(multi.id_coeffs - al[0]).mean()
    e_single = np.abs(single.id_coeffs - al[0]).mean(1)
    e_avg = np.abs(single.id_coeffs.mean(0) - al[0]).mean()
    print(f"\nshared identity error: multi {e_multi:.3f}, single {e_single.mean():.3f}, average {e_avg:.3f}")
    assert multi.converged
    assert e_multi < e_single.min() and e_multi < e_avg
    assert multi.vertices.shape == (6, sfm.n_vertices, 3)
    # noise-free, unregularised: exact
    ex = fit_landmarks_multi(sfm, L, HW, w_id=0, w_exp=0, ftol=1e-14, xtol=1e-12, max_iter=200)
    assert ex.converged
    np.testing.assert_allclose(ex.id_coeffs, al[0], atol=1e-5)
    np.testing.assert_allclose(ex.rotation, R, atol=1e-8)


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input():
    model = random_model()
    L, *_ = synth(model, 1, seed=11)
    L = L[0]
    with pytest.raises(ValueError, match="68"):
        fit_landmarks(model, L[:60], HW)
    with pytest.raises(ValueError, match="shape"):
        fit_landmarks(model, L[:, :1], HW)
    with pytest.raises(ValueError, match="shape"):
        fit_landmarks(model, L.ravel(), HW)
    with pytest.raises(ValueError, match="visible"):
        fit_landmarks(model, np.full((68, 2), np.nan), HW)
    line = np.c_[np.linspace(100, 400, 68), np.linspace(200, 300, 68)]
    with pytest.raises(ValueError, match="collinear"):
        fit_landmarks(model, line, HW)
    with pytest.raises(ValueError, match="outside the image"):
        fit_landmarks(model, L, (100, 100))
    with pytest.raises(ValueError, match="image_size"):
        fit_landmarks(model, L, (100, 100, 3))
    with pytest.raises(ValueError, match="landmark mapping"):
        fit_landmarks(dataclasses.replace(model, landmarks={}), L, HW)
    with pytest.raises(ValueError, match="inf"):
        fit_landmarks(model, np.where(np.arange(68)[:, None] == 3, np.inf, L), HW)
    with pytest.raises(TypeError):
        fit_landmarks("model", L, HW)
    with pytest.raises(ValueError, match="w_id"):
        fit_landmarks(model, L, HW, w_id=-1)
    with pytest.raises(ValueError, match="no photos"):
        fit_landmarks_multi(model, [], HW)
    # a batch names the bad image
    Lb = np.stack([L, np.full((68, 2), np.nan)])
    with pytest.raises(ValueError, match=r"\[1\]"):
        fit_landmarks(model, Lb, HW)


def test_never_nan_converged():
    model = random_model()
    L, *_ = synth(model, 2, seed=12)
    bad = dataclasses.replace(model, id_basis=np.where(np.arange(model.n_id) == 0, np.nan, model.id_basis))
    with pytest.raises(ValueError, match="not finite"):
        fit_landmarks(bad, L, HW)
    # a basis so large that the arithmetic overflows: whatever comes out is not claimed converged
    huge = dataclasses.replace(model, id_basis=model.id_basis * 1e300)
    with np.errstate(all="ignore"):
        res = fit_landmarks(huge, L, HW)
    finite = np.isfinite(res.id_coeffs).all(1) & np.isfinite(res.rmse_px)
    assert not np.any(res.converged & ~finite)
    # no iterations allowed: nothing is claimed
    res = fit_landmarks(model, L, HW, max_iter=0)
    assert not res.converged.any() and (res.iterations == 0).all()


def test_projection_matches_camera_module():
    camera = pytest.importorskip("geomfit.camera")
    model = random_model(contours=False)
    L, *_ = synth(model, 1, seed=13)
    res = fit_landmarks(model, L[0], HW)
    cam = camera.ScaledOrthographic(res.scale, res.rotation, res.translation)
    np.testing.assert_allclose(res.projected, cam.project(res.vertices, HW[0]), rtol=1e-12, atol=1e-9)


def test_options_object_equals_keywords():
    from geomfit.fitting import FitOptions

    model = random_model()
    L, *_ = synth(model, 3, seed=41)
    kw = dict(w_id=1e-2, w_exp=1e-3, max_iter=7, n_alternations=1)
    a = fit_landmarks(model, L, HW, **kw)
    b = fit_landmarks(model, L, HW, options=FitOptions(**kw))
    for k in ("id_coeffs", "exp_coeffs", "rotation", "scale", "translation", "rmse_px", "iterations"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    m1 = fit_landmarks_multi(model, list(L), HW, **kw)
    m2 = fit_landmarks_multi(model, list(L), HW, options=FitOptions().replace(**kw))
    np.testing.assert_array_equal(m1.id_coeffs, m2.id_coeffs)
    with pytest.raises(ValueError, match="max_iter"):
        fit_landmarks(model, L, HW, max_iter=3, options=FitOptions())
    with pytest.raises(TypeError, match="FitOptions"):
        fit_landmarks(model, L, HW, options={"max_iter": 3})


@pytest.mark.parametrize("kw", [dict(max_iter=50), dict(max_iter=7), dict(w_id=1e-3, n_id=None)])
def test_options_refuse_any_written_keyword(kw):
    """A knob written as a keyword beside ``options`` is refused even when it carries the default
    value (the old check compared with the defaults and let ``max_iter=50`` through silently)."""
    from geomfit.fitting import FitOptions

    model = random_model()
    L, *_ = synth(model, 1, seed=43)
    opts = FitOptions(max_iter=7, w_id=1e-2, n_id=3)
    for fn, lm, size in ((fit_landmarks, L[0], HW), (fit_landmarks_multi, [L[0], L[0]], HW)):
        with pytest.raises(ValueError, match=", ".join(sorted(kw))):
            fn(model, lm, size, options=opts, **kw)
    # options=None with keywords, and options alone, stay accepted
    assert fit_landmarks(model, L[0], HW, options=None, max_iter=7).iterations <= 7
    assert fit_landmarks(model, L[0], HW, options=opts).iterations <= 7
