"""Relative total variation (Xu, Yan, Xia and Jia 2012) and a fast screened-Poisson grid solver.

Seed 004 (Eq. 7) uses the relative total variation (RTV) of the albedo as its detail-reducing term;
this module provides

* :func:`rtv_weights` -- the per-edge weights of the quadratic form that RTV is linearised into
  (the ``u_x w_x`` / ``u_y w_y`` of Xu et al., Eqs. 11-12),
* :func:`rtv_energy` -- the RTV objective of Xu et al. Eq. 4 (for checks),
* :func:`solve_screened_poisson` -- solves ``(diag(D) + L_w) x = b`` on the image grid, where
  ``L_w`` is the weighted 5-point graph Laplacian; CPU: multigrid-preconditioned conjugate
  gradients in Numba kernels, GPU (CuPy input): the same algorithm with CUDA kernels,
* :func:`rtv_smooth` -- structure extraction from texture, Xu et al.'s iteration.

Conventions
-----------
Images are (H, W) or (H, W, C), channels last. Horizontal edges join pixel ``(i, j)`` and
``(i, j + 1)`` and are stored in arrays of shape (H, W - 1); vertical edges join ``(i, j)`` and
``(i + 1, j)`` and are stored in arrays of shape (H - 1, W). The quadratic
``Q(S) = sum wx (S[:, 1:] - S[:, :-1])**2 + sum wy (S[1:] - S[:-1])**2`` is ``S^T L_w S``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from .backend import get_array_module, is_cupy

__all__ = ["rtv_weights", "rtv_energy", "solve_screened_poisson", "rtv_smooth", "gaussian_taps"]

_VARIANTS = ("paper", "tsmooth")


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _as_float_image(image, name="image"):
    """Validate an image (H, W) or (H, W, C); integers are scaled to [0, 1] (MATLAB's im2double)."""
    xp = get_array_module(image)
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        image = np.asarray(image)
        xp = np
    if image.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, C), got shape {tuple(image.shape)}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got shape {tuple(image.shape)}")
    if image.ndim == 3 and image.shape[2] < 1:
        raise ValueError(f"{name} has no channels (shape {tuple(image.shape)})")
    kind = np.dtype(image.dtype).kind
    if kind == "b":
        raise TypeError(f"{name} must be a numeric image, got dtype bool")
    if kind in "ui":
        info = np.iinfo(image.dtype)
        if kind == "i" and int(image.min()) < 0:
            raise ValueError(f"{name} is a signed integer image with negative values; pass floats")
        image = image.astype(xp.float64) / float(info.max)
    elif kind == "f":
        image = image.astype(xp.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a real image (float or unsigned integer), got dtype {image.dtype}")
    if not bool(xp.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return image, xp


def _check_positive(name, value, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value!r}")
    return v


def _ndimage(xp):
    if xp is np:
        import scipy.ndimage as ndi
    else:  # pragma: no cover - needs CuPy
        import cupyx.scipy.ndimage as ndi  # type: ignore
    return ndi


# ----------------------------------------------------------------------------------------------
# Gaussian window
# ----------------------------------------------------------------------------------------------

def gaussian_taps(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian window used for RTV's ``g_sigma``.

    The window has ``ksize = round(5 sigma) | 1`` taps (the authors' MATLAB ``conv2_sep``:
    ``fspecial('gaussian', [1, ksize], sigma)``), i.e. radius ``ksize // 2``; it sums to one.
    """
    sigma = _check_positive("sigma", sigma)
    ksize = int(math.floor(5.0 * sigma + 0.5)) | 1
    r = ksize // 2
    k = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(k * k) / (2.0 * sigma * sigma))
    return g / g.sum()


def _gauss2d(a, taps, xp):
    """Separable Gaussian with zero padding outside the array (MATLAB ``conv2(..., 'same')``)."""
    ndi = _ndimage(xp)
    t = xp.asarray(taps)
    out = ndi.correlate1d(a, t, axis=0, mode="constant", cval=0.0)
    return ndi.correlate1d(out, t, axis=1, mode="constant", cval=0.0)


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------

def rtv_weights(image, sigma: float = 3.0, sharpness: float = 0.02, eps: float = 1e-3,
                variant: str = "paper") -> Tuple[object, object]:
    """Per-edge weights of the quadratic that linearises relative total variation.

    Xu et al. (2012) write the RTV regulariser
    ``sum_p D_x(p) / (L_x(p) + eps) + D_y(p) / (L_y(p) + eps)`` with windowed total variation
    ``D_x(p) = sum_q g_sigma(p, q) |d_x S_q|`` and windowed inherent variation
    ``L_x(p) = |sum_q g_sigma(p, q) d_x S_q|`` (seed 004 Eq. 7 is ``D_x / L_x``), and linearise it
    about the current ``S`` into ``sum_q u_xq w_xq (d_x S_q)^2 + u_yq w_yq (d_y S_q)^2`` with
    (their Eqs. 11-12)::

        u_x = G_sigma * (1 / (|G_sigma * d_x S| + eps)),   w_x = 1 / (|d_x S| + sharpness)

    This function returns ``wx = u_x w_x`` and ``wy = u_y w_y`` on the edges of the pixel grid.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, C), NumPy or CuPy
        The current estimate ``S``. Unsigned integers are scaled to [0, 1].
    sigma : float
        Standard deviation (pixels) of the Gaussian window ``g_sigma`` (the texture scale).
    sharpness : float
        ``eps_s`` of Xu et al.: the floor on ``|d S|`` in ``w``; smaller keeps edges sharper.
    eps : float
        ``eps`` of Xu et al. (1e-3): the floor of the windowed inherent variation.
    variant : {"paper", "tsmooth"}
        ``"paper"`` (default): the formulas above on the edge grid. Differences are forward
        differences on the (H, W-1) / (H-1, W) edge grids; the Gaussian sums run over edges inside
        the image (zero padding, the window is not renormalised at the border), both in ``L`` and in
        the outer sum of ``u``. ``"tsmooth"``: the authors' MATLAB ``computeTextureWeights``:
        ``u_x = 1 / max(|d_x (G_sigma * S)|, eps)`` (no outer Gaussian; the image is blurred before
        differencing, zero padded) and a shared ``w = 1 / max(sqrt(d_x S^2 + d_y S^2), sharpness)``
        per pixel (last row/column differences padded with zero).

    Returns
    -------
    wx : ndarray (H, W - 1)
        Weights of the horizontal forward differences ``S[:, j+1] - S[:, j]``.
    wy : ndarray (H - 1, W)
        Weights of the vertical forward differences ``S[i+1, :] - S[i, :]``.

    Notes
    -----
    Multichannel images get one set of weights shared by all channels (as in the authors' code):
    the absolute differences ``|d S|`` and ``|G * d S|`` are averaged over the channels before the
    reciprocals are taken, so an image with C identical channels gets the grayscale weights.
    The Gaussian window has ``round(5 sigma) | 1`` taps (see :func:`gaussian_taps`).
    Weights are positive, at most ``1 / (eps * sharpness)`` (5e4 for the defaults) times the
    window's mass.

    References
    ----------
    L. Xu, Q. Yan, Y. Xia, J. Jia, "Structure extraction from texture via relative total
    variation", ACM Trans. Graph. 31(6), 2012 (Eqs. 2-4, 11-12); seed 004 Eq. 7.
    """
    S, xp = _as_float_image(image)
    sigma = _check_positive("sigma", sigma)
    sharpness = _check_positive("sharpness", sharpness)
    eps = _check_positive("eps", eps)
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if S.ndim == 2:
        S = S[:, :, None]
    taps = gaussian_taps(sigma)
    C = S.shape[2]
    if variant == "paper":
        dx = S[:, 1:, :] - S[:, :-1, :]
        dy = S[1:, :, :] - S[:-1, :, :]
        # |G * d S| per channel, averaged over channels; |d S| averaged over channels
        Lx = xp.abs(_gauss2d_stack(dx, taps, xp)).mean(axis=2)
        Ly = xp.abs(_gauss2d_stack(dy, taps, xp)).mean(axis=2)
        ux = _gauss2d(1.0 / (Lx + eps), taps, xp)
        uy = _gauss2d(1.0 / (Ly + eps), taps, xp)
        wx = ux / (xp.abs(dx).mean(axis=2) + sharpness)
        wy = uy / (xp.abs(dy).mean(axis=2) + sharpness)
        return wx, wy
    # variant == "tsmooth": the authors' MATLAB code
    fx = xp.zeros_like(S)
    fy = xp.zeros_like(S)
    fx[:, :-1] = S[:, 1:] - S[:, :-1]
    fy[:-1] = S[1:] - S[:-1]
    wto = 1.0 / xp.maximum(xp.sqrt(fx * fx + fy * fy).mean(axis=2), sharpness)
    B = _gauss2d_stack(S, taps, xp)
    gx = xp.abs(B[:, 1:] - B[:, :-1]).mean(axis=2)
    gy = xp.abs(B[1:] - B[:-1]).mean(axis=2)
    wx = wto[:, :-1] / xp.maximum(gx, eps)
    wy = wto[:-1, :] / xp.maximum(gy, eps)
    return wx, wy


def _gauss2d_stack(a, taps, xp):
    """Gaussian of each channel of an (h, w, C) stack (zero padding)."""
    ndi = _ndimage(xp)
    t = xp.asarray(taps)
    out = ndi.correlate1d(a, t, axis=0, mode="constant", cval=0.0)
    return ndi.correlate1d(out, t, axis=1, mode="constant", cval=0.0)
