"""Tests of geomfit.rtv against plain references written from Xu et al. 2012's equations."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from geomfit import rtv

from test_multigrid import assemble


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


def test_integer_images_of_any_dtype_are_scaled_like_uint8():
    # regression: an int64 image of 8-bit values was divided by the type's maximum (~1e-17)
    rng = np.random.default_rng(15)
    u8 = rng.integers(0, 256, size=(12, 14, 3)).astype(np.uint8)
    ref = rtv.rtv_smooth(u8.astype(np.float64) / 255.0, iterations=2)
    for dt in (np.int64, np.int32, np.int16, np.uint32, np.uint8):
        S = rtv.rtv_smooth(u8.astype(dt), iterations=2)
        np.testing.assert_allclose(S, ref, rtol=1e-12, atol=1e-14, err_msg=str(dt))
    u16 = (u8.astype(np.uint16) * 257)  # 16-bit values in a wider integer type: / 65535
    np.testing.assert_allclose(rtv.rtv_smooth(u16.astype(np.int64), iterations=2), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="negative"):
        rtv.rtv_smooth(u8.astype(np.int64) - 256)
    with pytest.raises(ValueError, match="16 bits"):
        rtv.rtv_smooth(u8.astype(np.int64) * 1000)
