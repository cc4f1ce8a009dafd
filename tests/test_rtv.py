"""Tests of geomfit.rtv against plain references written from Xu et al. 2012's equations."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from geomfit import rtv


# ----------------------------------------------------------------------------------------------
# plain slow references (explicit sums / dense assembly), written from the paper's equations
# ----------------------------------------------------------------------------------------------

def ref_gauss(sigma):
    ksize = int(math.floor(5 * sigma + 0.5)) | 1
    r = ksize // 2
    g = [math.exp(-k * k / (2 * sigma * sigma)) for k in range(-r, r + 1)]
    s = sum(g)
    return r, [v / s for v in g]


def ref_weights_paper(S, sigma, sharpness, eps):
    """u_x = sum_{p in window(q)} g(p,q) / (|sum_{q'} g(p,q') dS_q'| + eps), w_x = 1/(|dS_q| + eps_s)."""
    if S.ndim == 2:
        S = S[:, :, None]
    H, W, C = S.shape
    r, g = ref_gauss(sigma)
    out = []
    for axis in (1, 0):
        d = np.diff(S, axis=axis)  # (h, w, C) on the edge grid
        h, w = d.shape[:2]
        L = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                acc = np.zeros(C)
                for a in range(-r, r + 1):
                    for b in range(-r, r + 1):
                        ii, jj = i + a, j + b
                        if 0 <= ii < h and 0 <= jj < w:
                            acc += g[a + r] * g[b + r] * d[ii, jj]
                L[i, j] = np.mean(np.abs(acc))
        u = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                for a in range(-r, r + 1):
                    for b in range(-r, r + 1):
                        ii, jj = i + a, j + b
                        if 0 <= ii < h and 0 <= jj < w:
                            u[i, j] += g[a + r] * g[b + r] / (L[ii, jj] + eps)
        out.append(u / (np.abs(d).mean(axis=2) + sharpness))
    return out[0], out[1]


def assemble(diag, wx, wy):
    """Dense-by-loops assembly of diag(D) + L_w (row-major pixel order)."""
    H, W = diag.shape
    idx = lambda i, j: i * W + j  # noqa: E731
    A = sp.lil_matrix((H * W, H * W))
    for i in range(H):
        for j in range(W):
            A[idx(i, j), idx(i, j)] += diag[i, j]
    for i in range(H):
        for j in range(W - 1):
            p, q, w = idx(i, j), idx(i, j + 1), wx[i, j]
            A[p, p] += w; A[q, q] += w; A[p, q] -= w; A[q, p] -= w  # noqa: E702
    for i in range(H - 1):
        for j in range(W):
            p, q, w = idx(i, j), idx(i + 1, j), wy[i, j]
            A[p, p] += w; A[q, q] += w; A[p, q] -= w; A[q, p] -= w  # noqa: E702
    return A.tocsc()


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C", [1, 3])
def test_weights_match_explicit_sums(C):
    rng = np.random.default_rng(0)
    S = rng.random((9, 11, C)) if C > 1 else rng.random((9, 11))
    wx, wy = rtv.rtv_weights(S, sigma=1.0, sharpness=0.02, eps=1e-3)
    rx, ry = ref_weights_paper(S, 1.0, 0.02, 1e-3)
    assert wx.shape == (9, 10) and wy.shape == (8, 11)
    np.testing.assert_allclose(wx, rx, rtol=1e-12)
    np.testing.assert_allclose(wy, ry, rtol=1e-12)


def test_weights_identical_channels_equal_grayscale():
    rng = np.random.default_rng(1)
    g = rng.random((12, 10))
    for variant in ("paper", "tsmooth"):
        a = rtv.rtv_weights(g, variant=variant)
        b = rtv.rtv_weights(np.repeat(g[:, :, None], 3, axis=2), variant=variant)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_weights_tsmooth_variant_matches_matlab_formula():
    # the authors' computeTextureWeights, written out with explicit loops for the blur
    rng = np.random.default_rng(2)
    S = rng.random((8, 9))
    sigma, sharp, eps = 1.5, 0.02, 1e-3
    r, g = ref_gauss(sigma)
    H, W = S.shape
    B = np.zeros_like(S)
    for i in range(H):
        for j in range(W):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    if 0 <= i + a < H and 0 <= j + b < W:
                        B[i, j] += g[a + r] * g[b + r] * S[i + a, j + b]
    fx = np.zeros_like(S); fx[:, :-1] = np.diff(S, axis=1)  # noqa: E702
    fy = np.zeros_like(S); fy[:-1] = np.diff(S, axis=0)  # noqa: E702
    wto = 1 / np.maximum(np.hypot(fx, fy), sharp)
    rx = wto[:, :-1] / np.maximum(np.abs(np.diff(B, axis=1)), eps)
    ry = wto[:-1] / np.maximum(np.abs(np.diff(B, axis=0)), eps)
    wx, wy = rtv.rtv_weights(S, sigma, sharp, eps, variant="tsmooth")
    np.testing.assert_allclose(wx, rx, rtol=1e-12)
    np.testing.assert_allclose(wy, ry, rtol=1e-12)


def test_weights_bad_input():
    with pytest.raises(ValueError, match="shape"):
        rtv.rtv_weights(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        rtv.rtv_weights(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="sigma"):
        rtv.rtv_weights(np.zeros((4, 4)), sigma=0)
    with pytest.raises(ValueError, match="variant"):
        rtv.rtv_weights(np.zeros((4, 4)), variant="nope")
    with pytest.raises(TypeError, match="dtype"):
        rtv.rtv_weights(np.zeros((4, 4), dtype=bool))
    # uint8 is scaled like MATLAB's im2double
    u = (np.arange(20, dtype=np.uint8).reshape(4, 5) * 12)
    a = rtv.rtv_weights(u)
    b = rtv.rtv_weights(u / 255.0)
    np.testing.assert_allclose(a[0], b[0])


# ----------------------------------------------------------------------------------------------
# screened Poisson solver
# ----------------------------------------------------------------------------------------------

def _random_system(rng, H, W, C=None, spread=3.0):
    D = rng.random((H, W))
    wx = 10 ** rng.uniform(-spread, spread, (H, W - 1))
    wy = 10 ** rng.uniform(-spread, spread, (H - 1, W))
    b = rng.standard_normal((H, W) if C is None else (H, W, C))
    return D, wx, wy, b


@pytest.mark.parametrize("H,W,C", [(37, 53, None), (40, 31, 3), (1, 300, 2), (300, 1, None), (2, 2, None),
                                   (64, 64, 1)])
def test_solver_matches_spsolve(H, W, C):
    rng = np.random.default_rng(H * 1000 + W)
    D, wx, wy, b = _random_system(rng, H, W, C)
    x, info = rtv.solve_screened_poisson(D, wx, wy, b, tol=1e-12, return_info=True)
    A = assemble(D, wx, wy)
    ref = spla.spsolve(A, b.reshape(H * W, -1)).reshape(b.shape)
    assert x.shape == b.shape
    assert np.all(info["residual"] <= 1e-12)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def test_solver_rtv_system_and_warm_start():
    rng = np.random.default_rng(3)
    img = np.kron(rng.random((6, 8)), np.ones((12, 12))) + 0.05 * rng.standard_normal((72, 96))
    wx, wy = rtv.rtv_weights(img)
    D = np.ones_like(img)
    x, info = rtv.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, tol=1e-10, return_info=True)
    ref = spla.spsolve(assemble(D, 0.01 * wx, 0.01 * wy), img.ravel()).reshape(img.shape)
    assert np.abs(x - ref).max() < 1e-8
    assert info["iterations"] <= 20  # multigrid-preconditioned: few iterations (CG alone needs hundreds)
    x2, info2 = rtv.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, x0=ref, tol=1e-10, return_info=True)
    assert info2["iterations"] <= 1
    np.testing.assert_allclose(x2, ref, atol=1e-9)


def test_solver_zero_diag_regions_and_zero_rows():
    rng = np.random.default_rng(4)
    H, W = 20, 24
    D, wx, wy, b = _random_system(rng, H, W, 2, spread=1)
    D[:, :12] = 0.0  # screened only on the right half, still one connected region
    D[5, 5] = 0.0
    wx[7, 10:12] = 0.0  # pixel (7, 11): no edges and D = 0 -> zero row
    wy[6:8, 11] = 0.0
    D[7, 11] = 0.0
    b[7, 11] = 0.0
    x = rtv.solve_screened_poisson(D, wx, wy, b, tol=1e-12)
    keep = np.ones(H * W, bool)
    keep[7 * W + 11] = False
    A = assemble(D, wx, wy)[keep][:, keep]
    ref = spla.spsolve(A.tocsc(), b.reshape(H * W, 2)[keep])
    np.testing.assert_allclose(x.reshape(H * W, 2)[keep], ref, atol=1e-8 * np.abs(ref).max())
    assert np.all(x[7, 11] == 0)
    b[7, 11] = 1.0
    with pytest.raises(ValueError, match="zero rows"):
        rtv.solve_screened_poisson(D, wx, wy, b)


def test_solver_bad_input():
    D = np.ones((5, 6))
    wx, wy, b = np.ones((5, 5)), np.ones((4, 6)), np.ones((5, 6))
    with pytest.raises(ValueError, match="wx must have shape"):
        rtv.solve_screened_poisson(D, np.ones((5, 6)), wy, b)
    with pytest.raises(ValueError, match="wy must have shape"):
        rtv.solve_screened_poisson(D, wx, np.ones((5, 6)), b)
    with pytest.raises(ValueError, match="rhs"):
        rtv.solve_screened_poisson(D, wx, wy, np.ones((6, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        rtv.solve_screened_poisson(D, -wx, wy, b)
    with pytest.raises(ValueError, match="NaN"):
        rtv.solve_screened_poisson(D, wx, wy, b * np.nan)
    with pytest.raises(ValueError, match="singular"):
        rtv.solve_screened_poisson(np.zeros((5, 6)), wx, wy, b)
    with pytest.raises(TypeError, match="array"):
        rtv.solve_screened_poisson(D, wx, wy, [1, 2])
    with pytest.raises(ValueError, match="x0"):
        rtv.solve_screened_poisson(D, wx, wy, b, x0=np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------
# rtv_smooth against a plain reference from the paper's equations
# ----------------------------------------------------------------------------------------------

def _gauss_matrix(n, sigma):
    r, g = ref_gauss(sigma)
    G = np.zeros((n, n))
    for i in range(n):
        for k in range(-r, r + 1):
            if 0 <= i + k < n:
                G[i, i + k] = g[k + r]
    return G


def ref_rtv_smooth(I, lam, sigma, sharpness, iterations, eps=1e-3, decay=2.0, smin=0.5):
    """Xu et al.: u = G^T 1/(|G dS| + eps), w = 1/(|dS| + eps_s), (1 + lam L) S = I, dense Gaussians."""
    I3 = I if I.ndim == 3 else I[:, :, None]
    H, W, C = I3.shape
    S = I3.copy()
    s = sigma
    for _ in range(iterations):
        ws = []
        for axis, (h, w) in ((1, (H, W - 1)), (0, (H - 1, W))):
            d = np.diff(S, axis=axis).reshape(h * w, C)
            G = np.kron(_gauss_matrix(h, s), _gauss_matrix(w, s))
            L = np.abs(G @ d).mean(axis=1)
            u = G.T @ (1.0 / (L + eps))
            ws.append((u / (np.abs(d).mean(axis=1) + sharpness)).reshape(h, w))
        A = assemble(np.ones((H, W)), lam * ws[0], lam * ws[1])
        S = spla.spsolve(A, I3.reshape(H * W, C)).reshape(H, W, C)
        s = max(s / decay, smin)
    return S.reshape(I.shape)


@pytest.mark.parametrize("C", [1, 3])
def test_rtv_smooth_matches_reference(C):
    rng = np.random.default_rng(10 + C)
    base = np.zeros((24, 32))
    base[:, 16:] = 0.7
    tex = 0.1 * np.sign(np.sin(np.arange(32) * 2.1))[None, :] * np.sign(np.sin(np.arange(24) * 1.7))[:, None]
    img = base + tex + 0.02 * rng.standard_normal((24, 32))
    if C == 3:
        img = np.stack([img, 0.5 * img + 0.2, img[::-1] * 0.8], axis=2)
    S = rtv.rtv_smooth(img, lam=0.01, sigma=3.0, sharpness=0.02, iterations=4, tol=1e-12)
    ref = ref_rtv_smooth(img, 0.01, 3.0, 0.02, 4)
    assert S.shape == img.shape
    np.testing.assert_allclose(S, ref, atol=1e-6, rtol=0)


def test_rtv_smooth_constant_image_unchanged():
    img = np.full((30, 40, 3), 0.37)
    np.testing.assert_allclose(rtv.rtv_smooth(img), img, atol=1e-12)


def test_rtv_smooth_lowers_energy():
    rng = np.random.default_rng(5)
    img = np.kron(rng.random((3, 4)), np.ones((16, 16))) + 0.08 * rng.standard_normal((48, 64))
    S = rtv.rtv_smooth(img, sigma=2.0, sigma_decay=1.0, iterations=4)
    e_in = rtv.rtv_energy(img, img, lam=0.01, sigma=2.0)
    e_out = rtv.rtv_energy(S, img, lam=0.01, sigma=2.0)
    assert e_out < 0.5 * e_in


def test_rtv_smooth_keeps_step_removes_texture():
    # step edge of height 0.6 plus a fine checker texture of amplitude 0.1
    H, W = 64, 96
    i, j = np.mgrid[:H, :W]
    step = np.where(j < W // 2, 0.2, 0.8)
    tex = 0.1 * np.where((i // 2 + j // 2) % 2 == 0, 1.0, -1.0)
    img = step + tex
    S = rtv.rtv_smooth(img)
    inner = (slice(8, H - 8), slice(8, W // 2 - 6))
    # texture removed: the residual variation within a flat side is a small fraction of the input's
    assert S[inner].std() < 0.1 * img[inner].std()
    # step preserved: the jump across the edge stays within 10 % of 0.6 and is at most 3 px wide
    row = S[H // 2]
    jump = row[W // 2 + 4:W // 2 + 10].mean() - row[W // 2 - 10:W // 2 - 4].mean()
    assert abs(jump - 0.6) < 0.06
    assert np.count_nonzero((row > 0.3) & (row < 0.7)) <= 3
    # a Gaussian blur that removes the texture as well smears the edge (the contrast with RTV)
    import scipy.ndimage as ndi
    B = ndi.gaussian_filter(img, 3.0)
    assert np.count_nonzero((B[H // 2] > 0.3) & (B[H // 2] < 0.7)) > 3


def test_rtv_smooth_tsmooth_variant_and_uint8():
    rng = np.random.default_rng(6)
    img8 = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    a = rtv.rtv_smooth(img8, variant="tsmooth", iterations=2)
    b = rtv.rtv_smooth(img8 / 255.0, variant="tsmooth", iterations=2)
    np.testing.assert_allclose(a, b, atol=1e-12)
    # the tsmooth variant halves lambda: one iteration equals a direct solve with lam/2
    wx, wy = rtv.rtv_weights(img8 / 255.0, 3.0, 0.02, variant="tsmooth")
    A = assemble(np.ones((20, 24)), 0.005 * wx, 0.005 * wy)
    ref = spla.spsolve(A, (img8 / 255.0).reshape(-1, 3)).reshape(20, 24, 3)
    np.testing.assert_allclose(rtv.rtv_smooth(img8, variant="tsmooth", iterations=1, tol=1e-12), ref, atol=1e-9)


def test_rtv_smooth_bad_input():
    with pytest.raises(ValueError, match="iterations"):
        rtv.rtv_smooth(np.zeros((8, 8)), iterations=-1)
    with pytest.raises(ValueError, match="lam"):
        rtv.rtv_smooth(np.zeros((8, 8)), lam=-1)
    with pytest.raises(ValueError, match="shape"):
        rtv.rtv_smooth(np.zeros((8, 8, 3, 2)))
    with pytest.raises(ValueError, match="at least 2x2"):
        rtv.rtv_smooth(np.zeros((1, 8)))


# ----------------------------------------------------------------------------------------------
# multigrid components against explicit matrices
# ----------------------------------------------------------------------------------------------

def _explicit_P(Pw, Hc, Wc):
    H, W = Pw.shape[:2]
    P = np.zeros((H * W, Hc * Wc))
    for i in range(H):
        for j in range(W):
            for ci in range(2):
                for cj in range(2):
                    I, J = i // 2 + ci, j // 2 + cj
                    if Pw[i, j, ci, cj] != 0:
                        assert I < Hc and J < Wc
                        P[i * W + j, I * Wc + J] = Pw[i, j, ci, cj]
    return P


@pytest.mark.parametrize("H,W", [(7, 8), (8, 7), (9, 9)])
def test_multigrid_components_match_matrices(H, W):
    from geomfit.kernels import grid as g
    rng = np.random.default_rng(H + 10 * W)
    D, wx, wy, _ = _random_system(rng, H, W, spread=1)
    dA, inv = np.empty((H, W)), np.empty((H, W))
    g.diagonal(D, wx, wy, dA, inv)
    S = np.empty((3, 3, H, W))
    g.stencil_from_5pt(dA, wx, wy, S)
    A = assemble(D, wx, wy).toarray()
    np.testing.assert_allclose(rtv._dense_from_stencil(S), A, atol=1e-12)
    Pw = np.empty((H, W, 2, 2))
    g.interpolation(S, Pw)
    Hc, Wc = (H + 1) // 2, (W + 1) // 2
    P = _explicit_P(Pw, Hc, Wc)
    # coarse points are injected; Dendy's collapsed-stencil weight on a coarse row
    assert P[0, 0] == 1.0 and P[2 * W + 2, 1 * Wc + 1] == 1.0
    i, j = 2, 1
    k = i * W + j
    col = A[[k - W, k, k + W]].sum(axis=0)  # collapse the vertical direction
    np.testing.assert_allclose(Pw[i, j, 0, 0], -col[k - 1] / col[k], rtol=1e-12)
    Sc = np.empty((3, 3, Hc, Wc))
    g.galerkin(S, Pw, Sc)
    np.testing.assert_allclose(rtv._dense_from_stencil(Sc), P.T @ A @ P, atol=1e-10)
    # the 5-point specialisations used on the finest level agree with the generic kernels
    Pw5, Sc5 = np.empty_like(Pw), np.empty_like(Sc)
    g.interpolation5(dA, wx, wy, Pw5)
    g.galerkin5(dA, wx, wy, Pw5, Sc5)
    np.testing.assert_allclose(Pw5, Pw, atol=1e-14)
    np.testing.assert_allclose(Sc5, Sc, atol=1e-12)
    r = rng.random((H, W, 2))
    rc = np.empty((Hc, Wc, 2))
    g.restrict_p(Pw, r, rc)
    np.testing.assert_allclose(rc.reshape(-1, 2), P.T @ r.reshape(-1, 2), atol=1e-12)
    x = np.zeros((H, W, 2))
    e = rng.random((Hc, Wc, 2))
    g.prolong_p(Pw, x, e)
    np.testing.assert_allclose(x.reshape(-1, 2), P @ e.reshape(-1, 2), atol=1e-12)


@pytest.mark.parametrize("kind", ["box", "aggregation"])
def test_vcycle_is_symmetric_positive_definite(kind):
    # CG needs a symmetric positive definite preconditioner: check M on a basis
    rng = np.random.default_rng(8)
    H, W = 23, 19
    D, wx, wy, _ = _random_system(rng, H, W, spread=2)
    # (the box cycle runs in float32 by default; float64 here to check the algebra exactly)
    mg = rtv.BoxMultigrid(D, wx, wy, 1, dtype=np.float64) if kind == "box" else rtv.GridMultigrid(D, wx, wy, 1)
    assert len(mg.levels) >= 2
    n = H * W
    M = np.empty((n, n))
    for k in range(n):
        e = np.zeros((H, W, 1))
        e.flat[k] = 1.0
        M[:, k] = mg.vcycle(e).ravel()
    np.testing.assert_allclose(M, M.T, atol=1e-10 * np.abs(M).max())
    assert np.linalg.eigvalsh(0.5 * (M + M.T)).min() > 0
    # and it is a good approximate inverse: eigenvalues of M A near 1
    A = assemble(D, wx, wy).toarray()
    ev = np.linalg.eigvals(M @ A).real
    assert ev.max() < 1.0 + 1e-8 and ev.min() > 0.0


# ----------------------------------------------------------------------------------------------
# GPU code path: CUDA kernels under Numba's simulator, CuPy where installed
# ----------------------------------------------------------------------------------------------

@pytest.mark.cudasim
def test_cuda_kernels_match_cpu_kernels():
    from geomfit.backend import cuda_available
    if not cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not 1")
    from geomfit.kernels import grid as g
    rng = np.random.default_rng(9)
    H, W, C = 7, 9, 2
    D, wx, wy, b = _random_system(rng, H, W, C, spread=1)
    dA, inv, dA2, inv2 = (np.empty((H, W)) for _ in range(4))
    g.diagonal(D, wx, wy, dA, inv)
    g.cu_launch(g.cu_diagonal, (H, W), D, wx, wy, dA2, inv2)
    np.testing.assert_allclose(dA2, dA)
    x = rng.random((H, W, C))
    q1, q2 = np.empty_like(x), np.empty_like(x)
    g.matvec_dot(dA, wx, wy, x, q1, np.empty((H, C)))
    g.cu_launch(g.cu_matvec, (H, W), dA, wx, wy, x, q2)
    np.testing.assert_allclose(q2, q1, atol=1e-12)
    for color, zero in ((0, True), (1, False)):
        x1, x2 = x.copy(), x.copy()
        g.rb_sweep(inv, wx, wy, x1, b, color, zero)
        g.cu_launch(g.cu_rb_sweep, (H, W), inv, wx, wy, x2, b, color, zero)
        np.testing.assert_allclose(x2, x1, atol=1e-12)
    Hc, Wc = 4, 5
    r1, r2 = np.empty((Hc, Wc, C)), np.empty((Hc, Wc, C))
    g.restrict_sum(x, r1)
    g.cu_launch(g.cu_restrict_sum, (Hc, Wc), x, r2)
    np.testing.assert_allclose(r2, r1)
    x1, x2 = x.copy(), x.copy()
    g.prolong_add(x1, r1)
    g.cu_launch(g.cu_prolong_add, (H, W), x2, r1)
    np.testing.assert_allclose(x2, x1)
    c1 = (np.empty((Hc, Wc)), np.zeros((Hc, Wc - 1)), np.zeros((Hc - 1, Wc)))
    c2 = (np.empty((Hc, Wc)), np.zeros((Hc, Wc - 1)), np.zeros((Hc - 1, Wc)))
    g.coarsen(D, wx, wy, *c1)
    g.cu_launch(g.cu_coarsen, (Hc, Wc), D, wx, wy, *c2)
    for u, v in zip(c1, c2):
        np.testing.assert_allclose(v, u)


@pytest.mark.cudasim
def test_gpu_solver_path_under_simulator(monkeypatch):
    from geomfit.backend import cuda_available
    if not cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not 1")
    monkeypatch.setattr(rtv, "_FORCE_CUDA", True)
    rng = np.random.default_rng(12)
    H, W = 18, 16  # 288 unknowns: two multigrid levels
    D, wx, wy, b = _random_system(rng, H, W, 2, spread=1)
    x, info = rtv.solve_screened_poisson(D, wx, wy, b, tol=1e-10, return_info=True)
    assert info["levels"] == 2
    ref = spla.spsolve(assemble(D, wx, wy), b.reshape(H * W, 2)).reshape(H, W, 2)
    np.testing.assert_allclose(x, ref, atol=1e-8 * np.abs(ref).max())


def test_cupy_rtv_smooth_matches_numpy():
    cp = pytest.importorskip("cupy")
    from geomfit.backend import cupy_or_none
    if cupy_or_none() is None:
        pytest.skip("CuPy has no GPU")
    rng = np.random.default_rng(13)
    img = np.kron(rng.random((4, 5, 3)), np.ones((16, 16, 1))) + 0.05 * rng.standard_normal((64, 80, 3))
    S = rtv.rtv_smooth(img, tol=1e-10)
    Sg = rtv.rtv_smooth(cp.asarray(img), tol=1e-10)
    assert isinstance(Sg, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(Sg), S, atol=1e-7)
    wx, wy = rtv.rtv_weights(img)
    wxg, wyg = rtv.rtv_weights(cp.asarray(img))
    np.testing.assert_allclose(cp.asnumpy(wxg), wx, rtol=1e-10)


def test_single_precision_cycle_reaches_double_precision_tolerance():
    # the float32 V-cycle inside flexible CG in float64: 1e-12 is still reached, and as fast
    rng = np.random.default_rng(14)
    img = np.kron(rng.random((5, 6, 3)), np.ones((20, 20, 1))) + 0.05 * rng.standard_normal((100, 120, 3))
    wx, wy = rtv.rtv_weights(img)
    D = np.ones(img.shape[:2])
    x32, i32 = rtv.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, tol=1e-12, return_info=True)
    assert np.all(i32["residual"] <= 1e-12)
    ref = spla.spsolve(assemble(D, 0.01 * wx, 0.01 * wy), img.reshape(-1, 3)).reshape(img.shape)
    np.testing.assert_allclose(x32, ref, atol=1e-10)
    mg = rtv.BoxMultigrid(D, 0.01 * wx, 0.01 * wy, 3)
    assert mg.levels[0].x.dtype == np.float32


def test_serial_twins_have_their_own_cache_entries():
    # Numba keys its on-disk cache by qualified name and line: a serial twin compiled from the
    # parallel kernel's own function would overwrite (and be loaded as) the parallel kernel
    from geomfit.kernels import grid as g

    for name, par in g._PAR.items():
        ser = g._SER[name]
        if ser is par:
            continue
        assert ser.py_func.__qualname__ != par.py_func.__qualname__, name
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel"), name
