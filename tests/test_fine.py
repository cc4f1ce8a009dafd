"""Fine stage (Jin et al. 2021, Sec. 3.4): grid operators, albedo, specular, depth SFS and the whole stage."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from geomfit.fine import (PHASE1, PHASE2, DepthOptions, FineOptions, _DepthProblem, _depth_normals, _ratio_albedo,
                          band_light, fine_stage, landmark_regions, prepare_image, region_mean_albedo, solve_albedo,
                          solve_depth, solve_specular)
from geomfit.render import depth_normals
from geomfit.scenes import normal_error, synthetic_scene
from geomfit.grid import (central_gradient_operators, edge_masks, forward_difference_operators, interior_mask,
                          laplacian_operator)
from geomfit.sh import shade


def _angle(a, b):
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene(96, n_blotches=0)


# ---------------------------------------------------------------------------------------------- grid
def test_grid_operators_match_numpy():
    d = np.random.default_rng(0).normal(size=(7, 9))
    Gx, Gy = central_gradient_operators(d.shape)
    gy, gx = np.gradient(d)
    np.testing.assert_allclose((Gx @ d.ravel()).reshape(d.shape), gx, atol=1e-14)
    np.testing.assert_allclose((Gy @ d.ravel()).reshape(d.shape), gy, atol=1e-14)
    Dx, Dy = forward_difference_operators(d.shape)
    np.testing.assert_allclose((Dx @ d.ravel()).reshape(7, 8), np.diff(d, axis=1))
    np.testing.assert_allclose((Dy @ d.ravel()).reshape(6, 9), np.diff(d, axis=0))
    L = laplacian_operator(d.shape)
    five = d[:-2, 1:-1] + d[2:, 1:-1] + d[1:-1, :-2] + d[1:-1, 2:] - 4 * d[1:-1, 1:-1]
    np.testing.assert_allclose((L @ d.ravel()).reshape(d.shape)[1:-1, 1:-1], five, atol=1e-13)
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    assert interior_mask(m).sum() == 1 and interior_mask(m)[2, 2]
    ex, ey = edge_masks(m)
    assert ex.sum() == 6 and ey.sum() == 6


def test_private_normals_follow_render_convention():
    # a plane d = a x + b row: n ~ (-a, b, 1)
    yy, xx = np.mgrid[0:6, 0:7].astype(float)
    n = _depth_normals(0.3 * xx - 0.5 * yy)
    ref = np.array([-0.3, -0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
    np.testing.assert_allclose(n, np.broadcast_to(ref, n.shape), atol=1e-12)


# ---------------------------------------------------------------------------------------------- depth
def test_depth_jacobian_matches_finite_differences():
    s = synthetic_scene(20, n_blotches=2)
    rng = np.random.default_rng(1)
    spec = 0.05 * rng.random(s["image"].shape)
    for lam, w in ((PHASE1, 1.0), (PHASE2, 300.0)):
        prob = _DepthProblem(s["image"], s["mask"], s["albedo"], s["sh"], spec, s["depth_blur"],
                             s["depth_blur"] + 0.1, lam, None, data_weight=w, gradient_scale=1.0)
        u = prob.u_init + 0.2 * rng.standard_normal(prob.n)
        J = prob.jacobian(u).toarray()
        h = 1e-6
        E = np.eye(prob.n)
        Jfd = np.stack([(prob.residuals(u + h * e) - prob.residuals(u - h * e)) / (2 * h) for e in E], 1)
        assert np.abs(J - Jfd).max() < 1e-6 * max(1.0, np.abs(J).max())
        # energy = ||R||^2 and the gradient used by the solver = J^T R
        R = prob.residuals(u)
        assert prob.energy(u) == pytest.approx(R @ R, rel=1e-12)
        rab = prob.data_derivatives(u)
        g = prob.data_jacobian(rab).T @ rab[0].T.ravel() + prob.gradient_const(u)
        np.testing.assert_allclose(g, J.T @ R, atol=1e-9 * np.abs(J.T @ R).max())


def test_gauss_newton_pattern_equals_sparse_products():
    # the fixed-pattern assembly of J^T J + C against SciPy sparse products of the Jacobian
    s = synthetic_scene(20, n_blotches=1, seed=3)
    rng = np.random.default_rng(4)
    spec = 0.05 * rng.uniform(size=s["image"].shape)
    prob = _DepthProblem(s["image"], s["mask"], s["albedo"], s["sh"], spec, s["depth_blur"], s["depth_blur"],
                         PHASE1, None, data_weight=300.0)
    u = prob.u_init + 0.2 * rng.standard_normal(prob.n)
    rab = prob.data_derivatives(u)
    Jd = prob.data_jacobian(rab)
    ref = (Jd.T @ Jd + prob.Cst).toarray()
    vals, g = prob.gauss_newton(u)
    np.testing.assert_allclose(prob.grid.matrix(vals).toarray(), ref, rtol=1e-12, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(g, Jd.T @ rab[0].T.ravel() + prob.gradient_const(u), rtol=1e-12, atol=1e-9)
    damped = prob.grid.matrix(vals, 0.5).toarray()
    np.testing.assert_allclose(damped, ref + 0.5 * np.diag(np.diag(ref)), rtol=1e-12, atol=1e-9 * np.abs(ref).max())
    # a problem on the same pixels with other weights (one of them 0) reuses the grid
    for lam in (PHASE2, (0.01, 0.0, 0.0, 0.0)):
        p2 = _DepthProblem(s["image"], s["mask"], s["albedo"], s["sh"], spec, s["depth_blur"], s["depth_blur"],
                           lam, None, data_weight=300.0, grid=prob.grid)
        assert p2.grid is prob.grid
        rab2 = p2.data_derivatives(u)
        J2 = p2.data_jacobian(rab2)
        ref2 = (J2.T @ J2 + p2.Cst).toarray()
        np.testing.assert_allclose(p2.grid.matrix(p2.gauss_newton(u)[0]).toarray(), ref2, rtol=1e-12,
                                   atol=1e-9 * np.abs(ref2).max())
    # another data mask: a grid of its own
    dm = s["mask"].copy()
    dm[8:11, 8:11] = False
    p3 = _DepthProblem(s["image"], s["mask"], s["albedo"], s["sh"], spec, s["depth_blur"], s["depth_blur"],
                       PHASE1, dm, data_weight=300.0, grid=prob.grid)
    assert p3.grid is not prob.grid and p3.rows_data.size < prob.rows_data.size


def test_inexact_depth_steps_match_exact_energy(scene):
    # truncated PCG steps (the default) reach the energy of exact steps with fewer factorisations
    s = scene
    o = DepthOptions.phase1(iterations=8, tol=1e-9)
    kw = dict(depth0=s["depth_blur"], options=o, return_info=True)
    d_e, ie = solve_depth(s["image"], s["depth_blur"], s["mask"], s["albedo"], s["sh"], depth0=s["depth_blur"],
                          options=DepthOptions.phase1(iterations=8, tol=1e-9, pcg_maxiter=0), return_info=True)
    d_i, ii = solve_depth(s["image"], s["depth_blur"], s["mask"], s["albedo"], s["sh"], **kw)
    assert ie.pcg_iterations == 0 and ie.factorizations >= len(ie.energies) - 1
    assert ii.pcg_iterations > 0 and ii.factorizations < ie.factorizations
    assert all(b <= a for a, b in zip(ii.energies, ii.energies[1:]))
    assert ii.energies[-1] <= ie.energies[-1] * 1.02
    # a later call on the same mask reuses the factor (no symbolic analysis, PCG from the start)
    _, i2 = solve_depth(s["image"], d_i, s["mask"], s["albedo"], s["sh"], factor=ii.factor, **kw)
    assert i2.factor is ii.factor
    assert i2.energies[-1] <= i2.energies[0]


def test_depth_step_solves_normal_equations_exactly():
    # one undamped step from a quadratic problem (data term off -> Eq. 9 is quadratic): exact minimiser
    s = synthetic_scene(16, n_blotches=0)
    lam = (0.01, 0.05, 0.02, 2.5)
    d, info = solve_depth(s["image"], s["depth_blur"] + 1.0, s["mask"], s["albedo"] * 0, s["sh"],
                          depth0=s["depth_blur"], options=DepthOptions(lam=lam, iterations=3, damping=0.0),
                          return_info=True)
    prob = _DepthProblem(s["image"], s["mask"], s["albedo"] * 0, s["sh"], None, d, s["depth_blur"], lam, None,
                         data_weight=1.0)
    J = prob.jacobian(prob.u_init)
    R = prob.residuals(prob.u_init)
    assert np.abs(J.T @ R).max() < 1e-8  # gradient vanishes at the returned depth
    assert info.energies[-1] < info.energies[0]


def test_depth_recovers_detail_with_known_albedo_and_light(scene):
    s = scene
    mi = interior_mask(interior_mask(s["mask"]))
    before = _angle(_depth_normals(s["depth_blur"]), s["normals"])[mi].mean()
    d = s["depth_blur"]
    energies = []
    for o in (DepthOptions.phase1(iterations=8), DepthOptions.phase2(iterations=8)):
        d, info = solve_depth(s["image"], d, s["mask"], s["albedo"], s["sh"], depth0=s["depth_blur"], options=o,
                              return_info=True)
        energies.append(info.energies)
        assert all(b <= a for a, b in zip(info.energies, info.energies[1:]))  # LM only accepts descent
    after = _angle(_depth_normals(d), s["normals"])[mi].mean()
    print(f"known albedo/light: mean angular error {before:.2f} -> {after:.2f} deg")
    assert after < 0.5 * before
    outside = ~s["mask"]
    np.testing.assert_array_equal(d[outside], s["depth_blur"][outside])


# ---------------------------------------------------------------------------------------------- albedo / specular
def test_specular_closed_form_satisfies_optimality():
    rng = np.random.default_rng(2)
    I, D, b0 = rng.random((3, 8, 9, 3))
    lam = 0.5
    beta = solve_specular(I, D, b0, lam=lam, nonnegative=False)
    np.testing.assert_allclose(2 * (D + beta - I) + 2 * lam * (beta - b0), 0, atol=1e-14)
    bp = solve_specular(I, D, b0, lam=lam)
    g0 = 2 * (D - I) - 2 * lam * b0  # derivative at beta = 0
    assert np.all(bp >= 0)
    assert np.all(g0[bp == 0] >= -1e-14)  # KKT: clipped only where the energy rises from 0
    np.testing.assert_allclose(bp[bp > 0], beta[bp > 0])
    m = np.zeros((8, 9), bool)
    m[2:5, 3:6] = True
    assert np.all(solve_specular(I, D, b0, mask=m)[~m] == 0)


def test_albedo_irls_step_minimises_its_quadratic():
    """One IRLS step = the exact minimiser of the data + skin + weighted-gradient quadratic (slow dense reference)."""
    from geomfit.rtv import rtv_weights

    rng = np.random.default_rng(3)
    H, W = 10, 12
    I = rng.uniform(0.2, 0.8, (H, W, 3))
    S = rng.uniform(0.5, 1.2, (H, W, 3))
    beta = rng.uniform(0, 0.05, (H, W, 3))
    m = np.ones((H, W), bool)
    m[:2] = False
    avg = np.array([0.5, 0.4, 0.3])
    g0 = rng.uniform(0.2, 0.8, (H, W, 3))
    lam1, lam2, w = 0.3, 2.5, 7.0
    gamma = solve_albedo(I, S, beta, m, avg, lam1, lam2, iterations=1, albedo0=g0, data_weight=w)
    wx, wy = rtv_weights(g0, sigma=3.0, sharpness=0.02, eps=1e-3)
    Dx, Dy = forward_difference_operators((H, W))
    R = lam2 * (Dx.T @ sp.diags(np.asarray(wx).ravel()) @ Dx + Dy.T @ sp.diags(np.asarray(wy).ravel()) @ Dy)
    for c in range(3):
        a = (w * m * S[..., c] ** 2 + lam1).ravel()
        b = (w * m * S[..., c] * (I[..., c] - beta[..., c]) + lam1 * avg[c]).ravel()
        ref = np.linalg.solve(np.diag(a) + R.toarray(), b)
        np.testing.assert_allclose(gamma[..., c].ravel(), ref, rtol=1e-6, atol=1e-8)


def _detail_correlation(albedo, true_albedo, detail_shading, m):
    ratio = (albedo / true_albedo).mean(-1)[m]
    return np.corrcoef(ratio, detail_shading[m])[0, 1]


def test_rtv_term_reduces_geometry_in_albedo():
    """Jin et al.'s (2021) Fig. 8 ablation, measured: the albedo correlates less with the missing shading detail
    when the RTV detail-reducing term is on."""
    s = synthetic_scene(96, n_blotches=3, blotch_radius=(0.15, 0.25))
    m = interior_mask(interior_mask(s["mask"]))
    nb = _depth_normals(s["depth_blur"], s["mask"])
    detail = (shade(s["normals"], s["sh"]) / shade(nb, s["sh"])).mean(-1)  # shading the blur misses
    avg = region_mean_albedo(s["image"], s["regions"])
    S = shade(nb, s["sh"])
    corr = {}
    for lam_rtv in (0.0, 2.5, 25.0):
        g = solve_albedo(s["image"], S, None, s["mask"], avg, 0.3, lam_rtv, iterations=3)
        corr[lam_rtv] = _detail_correlation(g, s["albedo"], detail, m)
    print("albedo/detail correlation by lam_rtv:", corr)
    assert corr[0.0] > 0.9  # without RTV the albedo absorbs the geometry
    assert corr[2.5] < corr[0.0] - 0.02
    assert corr[25.0] < corr[2.5]


def test_albedo_without_rtv_is_per_pixel_closed_form():
    rng = np.random.default_rng(4)
    I, S = rng.uniform(0.1, 1, (2, 6, 7, 3))
    m = rng.random((6, 7)) > 0.3
    avg = rng.uniform(0.2, 0.8, 3)
    g = solve_albedo(I, S, None, m, avg, lam_skin=0.3, lam_rtv=0.0, data_weight=2.0)
    # d/dgamma [2 m (gamma S - I)^2 + 0.3 (gamma - avg)^2] = 0
    grad = 2 * 2.0 * m[..., None] * S * (g * S - I) + 2 * 0.3 * (g - avg)
    np.testing.assert_allclose(grad, 0, atol=1e-12)


def test_region_mean_albedo_matches_loop():
    rng = np.random.default_rng(5)
    img = rng.random((9, 11, 3))
    reg = rng.integers(0, 4, (9, 11))
    out = region_mean_albedo(img, reg)
    for k in range(1, 4):
        np.testing.assert_allclose(out[reg == k], np.broadcast_to(img[reg == k].mean(0), out[reg == k].shape))
    np.testing.assert_allclose(out[reg == 0][0], img[reg > 0].mean(0))


def _toy_landmarks():
    lm = np.zeros((68, 2))
    t = np.linspace(0, np.pi, 17)
    lm[0:17] = np.c_[50 + 40 * np.cos(t[::-1] + np.pi), 60 + 35 * np.sin(t)]  # jaw
    lm[17:22] = np.c_[np.linspace(20, 42, 5), 28 + np.zeros(5)]
    lm[22:27] = np.c_[np.linspace(58, 80, 5), 28 + np.zeros(5)]
    lm[27:36] = np.c_[50 + np.zeros(9), np.linspace(35, 62, 9)]
    a = np.linspace(0, 2 * np.pi, 7)[:-1]
    lm[36:42] = np.c_[32 + 8 * np.cos(a), 40 + 3 * np.sin(a)]
    lm[42:48] = np.c_[68 + 8 * np.cos(a), 40 + 3 * np.sin(a)]
    a = np.linspace(0, 2 * np.pi, 13)[:-1]
    lm[48:60] = np.c_[50 + 14 * np.cos(a), 76 + 7 * np.sin(a)]
    a = np.linspace(0, 2 * np.pi, 9)[:-1]
    lm[60:68] = np.c_[50 + 9 * np.cos(a), 76 + 2.5 * np.sin(a)]
    return lm


def test_landmark_regions():
    lm = _toy_landmarks()
    reg = landmark_regions(lm, (100, 100))
    assert reg[40, 32] == 3 and reg[40, 68] == 3  # eyes
    assert reg[76, 50] == 5  # mouth interior
    assert reg[76, 38] == 4  # lips ring
    assert reg[28, 30] == 2  # brow
    assert reg[55, 25] == 1  # cheek
    assert reg[2, 2] == 0
    with pytest.raises(ValueError, match="68, 2"):
        landmark_regions(lm[:60], (100, 100))


# ---------------------------------------------------------------------------------------------- whole stage
def test_fine_stage_recovers_detail(scene):
    s = scene
    mi = interior_mask(interior_mask(s["mask"]))
    r = fine_stage(s["image"], s["depth_blur"], s["mask"], options=FineOptions.paper())
    before = _angle(_depth_normals(s["depth_blur"]), s["normals"])[mi].mean()
    after = _angle(r.normals, s["normals"])[mi].mean()
    print(f"fine_stage: mean angular error {before:.2f} -> {after:.2f} deg")
    assert after < 0.7 * before
    for name in ("depth", "normals", "albedo", "specular"):
        assert np.isfinite(getattr(r, name)).all(), name
    assert set(r.energy) == {"phase1", "phase2"}
    for hist in r.energy.values():
        assert hist[-1] < hist[0]
    np.testing.assert_allclose(np.linalg.norm(r.normals, axis=-1), 1.0)
    assert r.sh.shape == (9, 3)
    # the lighting explains the image: rendered vs input inside the mask
    rend = r.albedo * shade(r.normals, r.sh) + r.specular
    assert np.abs(rend - s["image"])[mi].mean() < 0.01


@pytest.mark.xfail(strict=True, reason="known limitation (docs/fine.md 'Limitations'): with a textured albedo "
                   "neither method recovers the detail (the paper's turns albedo errors into ridges, the robust "
                   "one keeps the input where texture and detail cannot be told apart)")
@pytest.mark.parametrize("kw", [dict(n_blotches=3, blotch_radius=(0.15, 0.25)), dict(n_blotches=0, albedo_gradient=0.1)],
                         ids=["3_large_blotches", "albedo_gradient"])
def test_fine_stage_recovers_detail_under_textured_albedo(kw):
    # the criterion with a textured albedo; strict xfail: passing it means the limitation is gone
    s = synthetic_scene(96, **kw)
    mi = interior_mask(interior_mask(s["mask"]))
    r = fine_stage(s["image"], s["depth_blur"], s["mask"], regions=s["regions"])
    before = _angle(_depth_normals(s["depth_blur"]), s["normals"])[mi].mean()
    after = _angle(r.normals, s["normals"])[mi].mean()
    print(f"textured albedo: mean angular error {before:.2f} -> {after:.2f} deg")
    assert after < 0.7 * before


def test_fine_stage_with_landmarks_and_user_regions(scene):
    s = scene
    r = fine_stage(s["image"], s["depth_blur"], s["mask"], landmarks=_toy_landmarks() * 0.9 + 3,
                   options=FineOptions.paper(phases=(PHASE1,), outer_iterations=1, depth_iterations=1))
    assert set(np.unique(r.regions)) <= {0, 1, 2, 3, 4, 5} and (r.regions == 3).any()
    r2 = fine_stage(s["image"], s["depth_blur"], s["mask"], regions=s["regions"] * 2,
                    options=FineOptions.paper(phases=(PHASE1,), outer_iterations=1, depth_iterations=1,
                                              specular=False, shared_light=True))
    assert r2.sh.shape == (9,) and np.all(r2.specular == 0)


# ---------------------------------------------------------------------------------------------- bad input
def test_prepare_image_conversions():
    u8 = np.array([[[0, 128, 255]] * 4] * 4, np.uint8)
    lin = prepare_image(u8)
    np.testing.assert_allclose(lin[0, 0], [0.0, ((128 / 255 + 0.055) / 1.055) ** 2.4, 1.0])
    grey = prepare_image(np.full((5, 6), 0.25))
    assert grey.shape == (5, 6, 3) and np.all(grey == 0.25)
    rgba = prepare_image(np.full((5, 6, 4), 0.5))
    assert rgba.shape == (5, 6, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare_image(np.full((5, 6, 3), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        prepare_image(np.full((5, 6, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        prepare_image(np.zeros((5, 6, 2)))
    with pytest.raises(TypeError, match="dtype"):
        prepare_image(np.zeros((5, 6, 3), bool))


def test_fine_stage_bad_input(scene):
    s = scene
    img, d, m = s["image"], s["depth_blur"], s["mask"]
    with pytest.raises(ValueError, match="empty"):
        fine_stage(img, d, np.zeros_like(m))
    tiny = np.zeros_like(m)
    tiny[40:44, 40:44] = True
    with pytest.raises(ValueError, match="at least"):
        fine_stage(img, d, tiny)
    bad = d.copy()
    bad[48, 48] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fine_stage(img, bad, m)
    with pytest.raises(ValueError, match="depth must have shape"):
        fine_stage(img, d[:-1], m)
    with pytest.raises(ValueError, match="mask must have shape"):
        fine_stage(img, d, m[:-1])
    with pytest.raises(ValueError, match="black or saturated"):
        fine_stage(np.zeros_like(img), d, m)
    with pytest.raises(ValueError, match="black or saturated"):
        fine_stage(np.ones_like(img), d, m)
    with pytest.raises(ValueError, match="lam must hold 4"):
        solve_depth(img, d, m, s["albedo"], s["sh"], options=DepthOptions(lam=(1, 2)))


def test_fine_stage_partial_saturation_and_nan_outside_mask(scene):
    s = scene
    img = s["image"].copy()
    img[30:40, 30:50] = 1.0  # clipped highlight
    d = s["depth_blur"].copy()
    d[~s["mask"]] = np.nan  # no surface outside the face: allowed
    r = fine_stage((img * 255).round().astype(np.uint8), d, s["mask"],
                   options=FineOptions.paper(phases=(PHASE1,), outer_iterations=1, depth_iterations=2))
    assert not r.data_mask[35, 40] and r.data_mask[60, 48]
    for name in ("depth", "normals", "albedo", "specular"):
        assert np.isfinite(getattr(r, name)[s["mask"]]).all(), name
    assert np.isnan(r.depth[~s["mask"]]).all()  # no surface stays no surface
    assert np.isfinite(r.normals).all() and np.isfinite(r.albedo).all()


def test_fine_stage_cupy_matches_numpy(scene):
    cp = pytest.importorskip("cupy")
    s = scene
    for o in (FineOptions.paper(phases=(PHASE1,), outer_iterations=1, depth_iterations=2, inexact_depth=False),
              FineOptions(inexact_depth=False)):
        r = fine_stage(s["image"], s["depth_blur"], s["mask"], options=o)
        rg = fine_stage(cp.asarray(s["image"]), cp.asarray(s["depth_blur"]), cp.asarray(s["mask"]), options=o)
        np.testing.assert_allclose(cp.asnumpy(rg.depth), r.depth, atol=1e-4)


def _reference_inner_and_normals(m, d):
    """Plain-slicing reference: pixels whose 4 neighbours are in the mask, and central-difference
    normals ``(-dd/dx, +dd/drow, 1)`` normalised (zero derivative on the border)."""
    inner = np.zeros_like(m)
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    p = np.zeros_like(d)
    q = np.zeros_like(d)
    p[:, 1:-1] = (d[:, 2:] - d[:, :-2]) / 2
    q[1:-1] = (d[2:] - d[:-2]) / 2
    n = np.stack([-p, q, np.ones_like(p)], -1)
    return inner, n / np.linalg.norm(n, axis=-1, keepdims=True)


def test_depth_energy_matches_plain_reference():
    """Eq. 9 written directly with array slicing on the full grid equals the solver's energy."""
    s = synthetic_scene(32, n_blotches=2)
    rng = np.random.default_rng(7)
    img, m = s["image"], s["mask"]
    spec = 0.02 * rng.random(img.shape)
    d = s["depth_blur"] + 0.3 * rng.standard_normal(m.shape)
    d0 = s["depth_blur"]
    lam, w = PHASE2, 123.0
    prob = _DepthProblem(img, m, s["albedo"], s["sh"], spec, d, d0, lam, None, data_weight=w)
    # reference
    inner, n = _reference_inner_and_normals(m, d)
    data = ((s["albedo"] * shade(n, s["sh"]) + spec - img) ** 2).sum(-1)[inner].sum()
    lap = np.zeros_like(d)
    lap[1:-1, 1:-1] = d[:-2, 1:-1] + d[2:, 1:-1] + d[1:-1, :-2] + d[1:-1, 2:] - 4 * d[1:-1, 1:-1]
    g = img.mean(-1)
    dd = d - d0
    gx = (np.diff(g, axis=1) - lam[3] * np.diff(dd, axis=1))[m[:, :-1] & m[:, 1:]]
    gy = (np.diff(g, axis=0) - lam[3] * np.diff(dd, axis=0))[m[:-1] & m[1:]]
    ref = (w * data + lam[0] * ((d - d0)[m] ** 2).sum() + lam[1] * (lap[inner] ** 2).sum()
           + lam[2] * ((gx ** 2).sum() + (gy ** 2).sum()))
    assert prob.energy(prob.u_init) == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------- robust method
def test_depth_pixel_weights_and_displacement_laplacian_match_reference():
    """The weighted data term and ``||L (d - d0)||^2`` against a plain slicing implementation, and the
    Jacobian of the weighted problem against finite differences."""
    s = synthetic_scene(24, n_blotches=2)
    rng = np.random.default_rng(3)
    img, m = s["image"], s["mask"]
    pw = rng.random(m.shape)
    d = s["depth_blur"] + 0.3 * rng.standard_normal(m.shape)
    d0 = s["depth_blur"]
    lam, w = (0.2, 0.7, 0.0, 0.0), 50.0
    prob = _DepthProblem(img, m, s["albedo"], s["sh"], None, d, d0, lam, None, data_weight=w, pixel_weight=pw,
                         laplacian_on_displacement=True)
    inner, n = _reference_inner_and_normals(m, d)
    data = (pw[..., None] * (s["albedo"] * shade(n, s["sh"]) - img) ** 2).sum(-1)[inner].sum()
    dd = d - d0
    lap = np.zeros_like(d)
    lap[1:-1, 1:-1] = dd[:-2, 1:-1] + dd[2:, 1:-1] + dd[1:-1, :-2] + dd[1:-1, 2:] - 4 * dd[1:-1, 1:-1]
    ref = w * data + lam[0] * (dd[m] ** 2).sum() + lam[1] * (lap[inner] ** 2).sum()
    assert prob.energy(prob.u_init) == pytest.approx(ref, rel=1e-12)
    u = prob.u_init
    J = prob.jacobian(u).toarray()
    h = 1e-6
    Jfd = np.stack([(prob.residuals(u + h * e) - prob.residuals(u - h * e)) / (2 * h) for e in np.eye(prob.n)], 1)
    assert np.abs(J - Jfd).max() < 1e-6 * max(1.0, np.abs(J).max())
    R = prob.residuals(u)
    rab = prob.data_derivatives(u)
    g = prob.data_jacobian(rab).T @ rab[0].T.ravel() + prob.gradient_const(u)
    np.testing.assert_allclose(g, J.T @ R, atol=1e-9 * np.abs(J.T @ R).max())
    with pytest.raises(ValueError, match="pixel_weight"):
        _DepthProblem(img, m, s["albedo"], s["sh"], None, d, d0, lam, None, pixel_weight=-pw)


def test_band_light_recovers_first_order_light_under_smooth_albedo():
    # a shallow dome with mid-scale bumps under a known first-order light and a smooth albedo ramp:
    # the band-pass fit must recover the light's direction and relative strength
    H = W = 96
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    u, v = (xx - 47.5) / 40, (yy - 47.5) / 40
    rr = u * u + v * v
    m = rr < 0.85
    d = 12 * np.sqrt(np.clip(1 - rr, 0, None)) + 2.0 * np.sin(xx / 4) * np.cos(yy / 5)  # normals near the mean one
    n = _depth_normals(d, m)
    sh = np.zeros(9)
    sh[0], sh[1], sh[2], sh[3] = 3.0, 0.4, 0.9, -0.6
    alb = (0.5 + 0.2 * u)[..., None] * np.array([1.0, 0.8, 0.6])
    img = alb * shade(n, sh)[..., None]
    fit = band_light(img, n, m, 6.0)
    # relative first-order gradient of log S at the mean normal
    nb = n[m].mean(0)
    S_nb = shade(nb[None], sh)[0]
    true = np.array([sh[3], sh[1], sh[2]]) * 0.488603 / S_nb
    got = np.array([fit[3, 0], fit[1, 0], fit[2, 0]]) * 0.488603
    # the tangential components (what a normal perturbation sees) to 5 %; the z component carries the
    # log-linearisation's bias (n_z varies only to second order), measured +10-20 % here
    np.testing.assert_allclose(got[:2], true[:2], rtol=0.05)
    assert 0.9 * true[2] < got[2] < 1.3 * true[2]
    assert np.allclose(fit[:, 0], fit[:, 2])


def test_fine_options_and_legacy_keywords(scene):
    s = scene
    with pytest.raises(ValueError, match="method"):
        FineOptions(method="magic")
    with pytest.raises(ValueError, match="kappa"):
        FineOptions(kappa=0)
    assert FineOptions().method == "robust" and FineOptions.paper().method == "paper"
    with pytest.warns(DeprecationWarning, match="FineOptions.paper"):
        r = fine_stage(s["image"], s["depth_blur"], s["mask"], phases=(PHASE1,), outer_iterations=1,
                       depth_iterations=1)
    assert r.method == "paper"
    r2 = fine_stage(s["image"], s["depth_blur"], s["mask"],
                    options=dict(method="paper", phases=(PHASE1,), outer_iterations=1, depth_iterations=1))
    np.testing.assert_array_equal(r.depth, r2.depth)
    with pytest.raises(TypeError, match="unexpected"):
        fine_stage(s["image"], s["depth_blur"], s["mask"], not_an_option=1)
    with pytest.raises(TypeError, match="FineOptions"):
        fine_stage(s["image"], s["depth_blur"], s["mask"], options=3)
    with pytest.warns(DeprecationWarning, match="geomfit.scenes"):
        import geomfit.fine as gf
        old = gf.synthetic_scene(16, n_blotches=0)
    np.testing.assert_array_equal(old["image"], synthetic_scene(16, n_blotches=0)["image"])


def test_depth_options_presets_validation_and_legacy_keywords(scene):
    s = scene
    assert DepthOptions().lam == PHASE1 and DepthOptions.phase1().lam == PHASE1
    assert DepthOptions.phase2().lam == PHASE2 and DepthOptions.phase2(iterations=2).iterations == 2
    with pytest.raises(ValueError, match="linear_solver"):
        DepthOptions(linear_solver="lu")
    with pytest.raises(ValueError, match="lam must hold 4"):
        DepthOptions(lam=3.0)
    args = (s["image"], s["depth_blur"], s["mask"], s["albedo"], s["sh"])
    with pytest.raises(TypeError, match="DepthOptions"):
        solve_depth(*args, options=PHASE2)
    with pytest.raises(TypeError, match="unexpected"):
        solve_depth(*args, not_an_option=1)
    # the same calls old-style (deprecated keywords) and new-style are bitwise equal: the factor path
    # with a reused factor and the Jacobi-CG path with a per-pixel weight
    _, info = solve_depth(*args, depth0=s["depth_blur"], options=DepthOptions.phase1(iterations=2),
                          return_info=True)
    pw = np.linspace(0.2, 1.0, s["mask"].size).reshape(s["mask"].shape)
    cases = [
        (dict(lam=PHASE2, iterations=3, tol=1e-6, damping=1e-3, pcg_tol=0.05, reuse_factor=False, data_weight=300.0),
         dict(factor=info.factor)),
        (dict(lam=(1e-3, 0.01, 0.0, 0.0), iterations=3, laplacian_on_displacement=True, linear_solver="jacobi",
              pcg_maxiter=30, gradient_scale=0.5), dict(pixel_weight=pw)),
    ]
    for legacy, extra in cases:
        with pytest.warns(DeprecationWarning, match="DepthOptions"):
            d_old, i_old = solve_depth(*args, depth0=s["depth_blur"], return_info=True, **extra, **legacy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            d_new, i_new = solve_depth(*args, depth0=s["depth_blur"], options=DepthOptions(**legacy),
                                       return_info=True, **extra)
            d_dict = solve_depth(*args, depth0=s["depth_blur"], options=dict(legacy), **extra)
        np.testing.assert_array_equal(d_old, d_new)
        np.testing.assert_array_equal(d_old, d_dict)
        assert i_old.energies == i_new.energies and i_old.pcg_iterations == i_new.pcg_iterations
        assert len(i_new.energies) > 1  # the call did work (steps accepted), so equality means something
    # keywords over options: the keyword wins, the other fields come from options
    with pytest.warns(DeprecationWarning):
        d_mix = solve_depth(*args, options=DepthOptions.phase2(iterations=3, tol=1e-6), iterations=1)
    d_one = solve_depth(*args, options=DepthOptions.phase2(iterations=1, tol=1e-6))
    np.testing.assert_array_equal(d_mix, d_one)


def test_fine_stage_calls_solve_depth_without_deprecated_keywords(scene):
    s = scene
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        fine_stage(s["image"], s["depth_blur"], s["mask"])
        fine_stage(s["image"], s["depth_blur"], s["mask"],
                   options=FineOptions.paper(phases=(PHASE1, PHASE2), outer_iterations=1, depth_iterations=1))


def test_robust_default_is_finite_and_keeps_input_where_untrusted(scene):
    s = scene
    r = fine_stage(s["image"], s["depth_blur"], s["mask"])
    assert r.method == "robust"
    assert np.isfinite(r.depth[s["mask"]]).all() and np.isfinite(r.normals).all()
    np.testing.assert_array_equal(r.depth[~s["mask"]], s["depth_blur"][~s["mask"]])
    assert r.confidence.shape == s["mask"].shape and (r.confidence >= 0).all() and (r.confidence <= 1).all()
    # black pixels carry no data weight
    img = s["image"].copy()
    img[40:50, 40:50] = 0.0
    r2 = fine_stage(img, s["depth_blur"], s["mask"])
    assert (r2.confidence[40:50, 40:50] == 0).all()


def test_ratio_albedo_ignores_pixels_the_light_model_leaves_dark():
    # known smooth albedo under unit shading; the predicted shading wrongly says "dark" in a disc (a
    # light-model failure, like a nostril or the shadowed cheek under a too-strong fitted light) and
    # a specular spot makes the image 4x brighter: the plain low-passed ratio blows up there, the
    # floored and clipped one stays close to the true albedo and marks those pixels untrusted
    H = W = 80
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    m = np.ones((H, W), bool)
    alb = (0.4 + 0.2 * xx / W)[..., None] * np.array([1.0, 0.8, 0.6])
    S_true = np.ones((H, W, 3))
    img = alb * S_true
    disc = (xx - 30) ** 2 + (yy - 40) ** 2 < 36
    spot = (xx - 60) ** 2 + (yy - 20) ** 2 < 9
    img[spot] *= 4.0
    S0 = S_true.copy()
    S0[disc] = 0.03
    plain, _, _ = _ratio_albedo(img, S0, m, m, 2.0, 0.0, np.inf, np)
    got, trust, _ = _ratio_albedo(img, S0, m, m, 2.0, 0.5, 2.5, np)
    assert plain[disc].mean(-1).max() > 5 * alb[disc].mean(-1).max()  # the defect this guards against
    assert not trust[disc].any() and not trust[spot].any() and trust.mean() > 0.9
    np.testing.assert_allclose(got, alb, rtol=0.08)
    med = np.median(img.mean(-1))
    assert got.mean(-1).max() <= 2.5 * med * (1 + 1e-9)


def test_albedo_floor_improves_known_albedo_under_side_light():
    from geomfit.scenes import james_available, james_scene

    ok, why = james_available()
    if not ok:
        pytest.skip(why)
    s = james_scene(96, light="side", noise=0.003)
    m = s["mask"]

    def err(o):
        r = fine_stage(s["image"], s["depth_blur"], m, landmarks=s["landmarks"], options=o)
        A, B = r.albedo[m], s["albedo"][m]
        A = A * (np.median(B, 0) / np.median(A, 0))  # the albedo-light scale ambiguity
        return np.median(np.abs(A - B) / np.maximum(B, 1e-3)), np.quantile(A.mean(-1) / np.median(B.mean(-1)), 0.99)

    e_plain, q_plain = err(FineOptions.robust(shading_floor=0.0, albedo_clip=np.inf))
    e_new, q_new = err(FineOptions.robust())
    print(f"albedo error plain {e_plain:.3f} (99 % quantile {q_plain:.1f}x median) -> {e_new:.3f} ({q_new:.1f}x)")
    # measured at 96 px: 0.289 -> 0.170, 99 % quantile 205x -> 2.3x median
    assert e_new < 0.8 * e_plain and q_new < 3.0 < q_plain


def test_band_weight_keeps_mid_band_albedo_texture_out_of_the_depth():
    # a 10 % albedo stripe pattern inside the band weight's pass band (wavelength 4 b): without the band
    # weight the stage carves it into the depth; with it the stripes get no data weight and the normals
    # stay at the input's; without the texture the band term changes next to nothing
    s = synthetic_scene(96, n_blotches=0)
    m = s["mask"]
    b = 0.02 * np.sqrt(m.sum())
    x = np.arange(96)[None, :] * np.ones((96, 1))
    stripes = 1.0 + 0.1 * np.sin(2 * np.pi * x / (4 * b))
    img = np.clip(s["image"] * stripes[..., None], 0, 1)
    e0 = normal_error(depth_normals(s["depth_blur"]), s)
    on = fine_stage(img, s["depth_blur"], m)
    off = fine_stage(img, s["depth_blur"], m, options=FineOptions.robust(band_scale=0))
    e_on, e_off = normal_error(on.normals, s), normal_error(off.normals, s)
    assert e_off > 1.02 * e0  # the texture became geometry
    assert e_on <= 1.001 * e0 and e_on < e_off
    assert np.median(on.confidence[m]) < 0.1 * np.median(off.confidence[m])
    plain_on = fine_stage(s["image"], s["depth_blur"], m)
    plain_off = fine_stage(s["image"], s["depth_blur"], m, options=FineOptions.robust(band_scale=0))
    assert normal_error(plain_on.normals, s) == pytest.approx(normal_error(plain_off.normals, s), rel=2e-3)
    with pytest.raises(ValueError, match="band_level"):
        FineOptions.robust(band_level=0)
    with pytest.raises(ValueError, match="albedo_eps"):
        FineOptions.robust(albedo_eps=-1e-3)


def _guided_reference(R, trust, sigma, eps):
    # the guided filter written plainly: window sums over trusted pixels, pixel by pixel (edge-clamped
    # windows, as uniform_filter's mode="nearest")
    H, W, C = R.shape
    r = int(round(2.0 * sigma))
    L = np.log(np.maximum(R, 1e-6))
    g = L.mean(-1)

    def win(i, j):
        ii = np.clip(np.arange(i - r, i + r + 1), 0, H - 1)
        jj = np.clip(np.arange(j - r, j + r + 1), 0, W - 1)
        return np.ix_(ii, jj)

    A = np.zeros((H, W, C))
    B = np.zeros((H, W, C))
    for i in range(H):
        for j in range(W):
            w = win(i, j)
            t = trust[w].astype(float)
            n = max(t.sum() / t.size, 1e-9) * t.size
            mg = (t * g[w]).sum() / n
            vg = max((t * g[w] ** 2).sum() / n - mg * mg, 0.0)
            for c in range(C):
                mp = (t * L[..., c][w]).sum() / n
                A[i, j, c] = ((t * g[w] * L[..., c][w]).sum() / n - mg * mp) / (vg + eps)
                B[i, j, c] = mp - A[i, j, c] * mg
    out = np.zeros((H, W, C))
    for i in range(H):
        for j in range(W):
            w = win(i, j)
            out[i, j] = np.exp(A[w].reshape(-1, C).mean(0) * g[i, j] + B[w].reshape(-1, C).mean(0))
    return out


def test_guided_albedo_filter_matches_plain_reference_and_keeps_edges_not_detail():
    from geomfit.fine import _guided_log

    rng = np.random.default_rng(5)
    R = np.exp(0.2 * rng.standard_normal((14, 13, 3)))
    trust = rng.random((14, 13)) > 0.2
    np.testing.assert_allclose(_guided_log(R, trust, 1.2, 1e-3, np), _guided_reference(R, trust, 1.2, 1e-3),
                               rtol=1e-10)
    # a 30 % albedo step survives; a 1 % shading ripple on either side is averaged away
    x = np.arange(64)[None, :] * np.ones((32, 1))
    step = np.where(x < 32, 1.0, 0.7) * (1 + 0.01 * np.sin(2 * np.pi * x / 4))
    R = np.repeat(step[..., None], 3, -1)
    out = _guided_log(R, np.ones((32, 64), bool), 2.0, 1e-3, np)[..., 0]
    assert abs(out[:, 29].mean() - 1.0) < 0.02 and abs(out[:, 34].mean() - 0.7) < 0.02
    ripple_in, ripple_out = np.ptp(step[16, 4:24]), np.ptp(out[16, 4:24])
    assert ripple_out < 0.2 * ripple_in
