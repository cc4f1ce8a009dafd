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
    rows, cols, vals = [], [], []
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
