"""Sparse finite-difference operators on an image grid (row-major pixel order, index = row * W + col),
and the masked (normalised-convolution) Gaussian filter.

Used by the shape-from-shading solver (:mod:`geomfit.fine`). Operators are built once with NumPy
indices and returned as SciPy sparse matrices, or as CuPy sparse matrices when ``xp`` is CuPy.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .backend import get_array_module, ndimage_module, sparse_to_device

__all__ = ["central_gradient_operators", "forward_difference_operators", "laplacian_operator",
           "interior_mask", "edge_masks", "masked_gaussian"]


def masked_gaussian(a, mask, sigma: float, mode: str = "nearest"):
    """Gaussian filter of ``a`` (H, W) or (H, W, C) restricted to the bool ``mask`` (normalised
    convolution: filtered masked values over the filtered mask); 0 where the mask has no support.
    NumPy or CuPy, on the device of ``a``; ``mode`` is the boundary mode of ``gaussian_filter``."""
    xp = get_array_module(a, mask)
    nd = ndimage_module(xp)
    den = nd.gaussian_filter(mask.astype(xp.float64), sigma, mode=mode)
    if a.ndim == 3:
        num = xp.stack([nd.gaussian_filter(xp.where(mask, a[..., c], 0.0), sigma, mode=mode)
                        for c in range(a.shape[2])], -1)
        return num / xp.maximum(den, 1e-12)[..., None]
    return nd.gaussian_filter(xp.where(mask, a, 0.0), sigma, mode=mode) / xp.maximum(den, 1e-12)


def _to(xp, A):
    return sparse_to_device(A, xp)


def _check_shape(shape):
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"grid shape must be (H, W) with H, W >= 2, got {shape}")
    return int(shape[0]), int(shape[1])


def central_gradient_operators(shape, xp=np):
    """Sparse ``Gx, Gy`` (N x N, N = H W) equal to ``numpy.gradient(d)`` (``edge_order=1``).

    ``Gx @ d.ravel() == np.gradient(d, axis=1).ravel()`` (along columns) and
    ``Gy @ d.ravel() == np.gradient(d, axis=0).ravel()`` (along rows, i.e. downwards): central
    differences inside, one-sided differences on the image border.
    """
    H, W = _check_shape(shape)
    idx = np.arange(H * W).reshape(H, W)

    def op(axis):
        n = W if axis == 1 else H
        lo = np.empty(n, dtype=np.int64)
        hi = np.empty(n, dtype=np.int64)
        lo[1:-1] = np.arange(n - 2)
        hi[1:-1] = np.arange(2, n)
        lo[0], hi[0] = 0, 1
        lo[-1], hi[-1] = n - 2, n - 1
        scale = np.full(n, 0.5)
        scale[0] = scale[-1] = 1.0
        if axis == 1:
            r = idx.ravel()
            c_hi = idx[:, hi].ravel()
            c_lo = idx[:, lo].ravel()
            s = np.broadcast_to(scale[None, :], (H, W)).ravel()
        else:
            r = idx.ravel()
            c_hi = idx[hi, :].ravel()
            c_lo = idx[lo, :].ravel()
            s = np.broadcast_to(scale[:, None], (H, W)).ravel()
        rows = np.concatenate([r, r])
        cols = np.concatenate([c_hi, c_lo])
        vals = np.concatenate([s, -s])
        return sp.csr_matrix((vals, (rows, cols)), shape=(H * W, H * W))

    return _to(xp, op(1)), _to(xp, op(0))


def forward_difference_operators(shape, xp=np):
    """Forward differences ``Dx`` (H (W-1) x N) and ``Dy`` ((H-1) W x N).

    ``(Dx @ d.ravel()).reshape(H, W-1) == np.diff(d, axis=1)``, likewise ``Dy`` with ``axis=0``.
    """
    H, W = _check_shape(shape)
    idx = np.arange(H * W).reshape(H, W)
    a, b = idx[:, :-1].ravel(), idx[:, 1:].ravel()
    m = a.size
    Dx = sp.csr_matrix((np.r_[-np.ones(m), np.ones(m)], (np.r_[np.arange(m), np.arange(m)], np.r_[a, b])),
                       shape=(m, H * W))
    a, b = idx[:-1, :].ravel(), idx[1:, :].ravel()
    m = a.size
    Dy = sp.csr_matrix((np.r_[-np.ones(m), np.ones(m)], (np.r_[np.arange(m), np.arange(m)], np.r_[a, b])),
                       shape=(m, H * W))
    return _to(xp, Dx), _to(xp, Dy)


def laplacian_operator(shape, xp=np):
    """The graph Laplacian ``L = -(Dx^T Dx + Dy^T Dy)`` (N x N).

    On interior pixels it is the 5-point stencil ``d[i-1,j] + d[i+1,j] + d[i,j-1] + d[i,j+1] - 4 d[i,j]``;
    on the border it has Neumann (zero-flux) rows.
    """
    Dx, Dy = forward_difference_operators(shape)
    return _to(xp, -(Dx.T @ Dx + Dy.T @ Dy))


def interior_mask(mask):
    """Pixels of ``mask`` whose four neighbours are in ``mask`` too (never on the image border)."""
    m = np.asarray(mask, dtype=bool)
    out = np.zeros_like(m)
    out[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return out


def edge_masks(mask):
    """Horizontal (H, W-1) and vertical (H-1, W) edges with both end pixels in ``mask``."""
    m = np.asarray(mask, dtype=bool)
    return m[:, :-1] & m[:, 1:], m[:-1, :] & m[1:, :]
