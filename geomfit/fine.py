"""Fine stage: lighting, albedo and shape from shading on a depth map.

Two methods (:class:`FineOptions`):

* ``method="robust"`` (the default; docs/fine.md "The robust method"): geomfit's method for real,
  noisy, textured photos: a first-order light from the band-pass correlation of the log image with
  the input normals (:func:`band_light`), the albedo as the edge-preserving (guided-filter) low-pass
  of the ratio image, a noise-aware data weight with per-pixel weights that fall where the
  chromaticity (pigment, hair, frames), the residual or its mid band says texture, and a
  Levenberg-Marquardt solve for a displacement over the input with its low frequencies pinned.
* ``method="paper"``: Jin et al., "High-fidelity 3D face reconstruction with multi-scale details",
  Pattern Recognition Letters 2021, Sec. 3.4, Eqs. 4-9, with the image model
  ``I = gamma * S(n(d)) + epsilon * beta`` (albedo ``gamma``, second-order SH shading ``S``
  (:mod:`geomfit.sh`, Eq. 5), specular ``beta``, normals ``n`` of the depth ``d``).  The paper
  optimises every term with Adam; here each block is solved with a method that uses its structure:

  - lighting: linear least squares (9 x 9 normal equations), :func:`geomfit.sh.fit_sh_lighting`;
  - albedo (Eq. 6): the RTV term (Eq. 7) by iteratively re-weighted least squares with
    :func:`geomfit.rtv.rtv_weights`, every step one screened-Poisson solve;
  - specular (Eq. 8): closed form per pixel;
  - depth (Eq. 9): Levenberg-Marquardt with the analytic Jacobian and sparse normal equations
    factored by :func:`geomfit.backend.factorize_spd` (CHOLMOD on the CPU, CG on the GPU).

Conventions: image (H, W, 3) linear RGB in [0, 1]; depth (H, W) orthographic in pixel units, larger
= closer to the camera; normals ``n ~ (-dd/dx, +dd/drow, 1)`` (x right, y up, z towards the camera)
by central differences (one-sided on the image border).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from .backend import (asnumpy, factorize_spd, get_array_module, ndimage_module, pcg, sparse_module, sparse_on_device,
                      symmetric_from_csr)
from .grid import (central_gradient_operators, edge_masks, forward_difference_operators, interior_mask,
                   laplacian_operator, masked_gaussian)
from .photo import as_float_image
from .render import depth_normals
from .rtv import rtv_weights, solve_screened_poisson
from .sh import _sh_basis_grad, fit_sh_lighting, sh_basis, shade

__all__ = [
    "FineResult",
    "FineOptions",
    "band_light",
    "fine_stage",
    "solve_albedo",
    "solve_specular",
    "solve_depth",
    "landmark_regions",
    "region_mean_albedo",
    "prepare_image",
    "synthetic_scene",
    "DepthInfo",
    "DepthOptions",
    "PHASE1",
    "PHASE2",
    "DATA_WEIGHT",
    "REGIONS",
]

#: Eq. 9 weights (lambda_d1..lambda_d4) of the two depth phases (Jin et al. 2021, Sec. 4.1).
PHASE1 = (0.001, 0.05, 0.001, 0.001)
PHASE2 = (0.001, 0.03, 0.025, 2.5)
#: Default weight of the data terms ``||I' - I||^2`` of Eqs. 6 and 9: intensities on the 8-bit scale
#: (255^2). With intensities in [0, 1] (weight 1) the paper's lambdas over-smooth the albedo and
#: the depth (see docs/fine.md for the measurements).
DATA_WEIGHT = 255.0 ** 2

# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------

def prepare_image(image, xp=None):
    """Validate and convert an image to linear RGB float64 (H, W, 3) in [0, 1].

    * float input is taken as linear RGB and must lie in [0, 1] (NaN/inf refused);
    * integer input is taken as sRGB-encoded: scaled to [0, 1] by :func:`geomfit.photo.as_float_image`
      (uint8 / 255, uint16 / 65535), then decoded with the sRGB transfer function (IEC 61966-2-1);
    * grey (H, W) or (H, W, 1) is replicated to three channels; RGBA (H, W, 4) drops alpha.

    Raises
    ------
    TypeError
        Unsupported dtype (bool, complex).
    ValueError
        Wrong shape, values outside [0, 1], NaN or inf.
    """
    if xp is None:
        xp = get_array_module(image)
    if not hasattr(image, "shape"):
        image = np.asarray(image)
    img = xp.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = xp.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {img.shape}")
    if img.shape[2] == 4:
        img = img[..., :3]
    if img.shape[0] < 3 or img.shape[1] < 3:
        raise ValueError(f"image is too small: {img.shape[:2]}")
    dt = np.dtype(img.dtype)
    if dt.kind in "ui":
        x = as_float_image(img)
        return xp.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    if dt.kind != "f":
        raise TypeError(f"image dtype {dt} is not supported: pass float linear RGB in [0, 1] or uint8/uint16 sRGB")
    img = img.astype(xp.float64)
    if not bool(xp.isfinite(img).all()):
        raise ValueError("image contains NaN or inf")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"float image must be linear RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(for 8-bit data pass the uint8 array, or divide by 255)")
    return xp.clip(img, 0.0, 1.0)


def _prepare_mask(mask, shape, xp, min_pixels=64):
    if mask is None:
        raise ValueError("mask is required")
    m = xp.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)}, got {m.shape}")
    m = m.astype(bool)
    n = int(m.sum())
    if n == 0:
        raise ValueError("mask is empty")
    if n < min_pixels:
        raise ValueError(f"mask has {n} pixels, at least {min_pixels} are needed")
    return m


def _prepare_depth(depth, mask, xp):
    d = xp.asarray(depth)
    if d.shape != mask.shape:
        raise ValueError(f"depth must have shape {mask.shape} (the image's), got {d.shape}")
    if np.dtype(d.dtype).kind not in "fiu":
        raise TypeError(f"depth dtype {d.dtype} is not numeric")
    d = d.astype(xp.float64)
    if not bool(xp.isfinite(d[mask]).all()):
        raise ValueError("depth has NaN or inf inside the mask")
    return d  # values outside the mask never enter the energies and are returned unchanged


# ----------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------

def _depth_normals(depth, mask=None):
    """:func:`geomfit.render.depth_normals`, with the depth outside ``mask`` ignored (one-sided
    differences on the mask border) and ``(0, 0, 1)`` outside the mask."""
    xp = get_array_module(depth)
    if mask is None:
        return depth_normals(depth)
    n = depth_normals(xp.where(mask, depth, xp.nan))
    n = xp.where(mask[..., None], n, xp.asarray([0.0, 0.0, 1.0]))
    return n


# ----------------------------------------------------------------------------------------------
# Albedo (Eq. 6-7) and specular (Eq. 8)
# ----------------------------------------------------------------------------------------------

def _as_hwc(x, H, W, C, xp, name):
    a = xp.asarray(x, dtype=xp.float64)
    if a.ndim == 2 and a.shape == (H, W):
        a = a[..., None]
    try:
        return xp.broadcast_to(a, (H, W, C))
    except ValueError:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to {(H, W, C)}") from None


def solve_albedo(image, shading, specular=None, mask=None, albedo_avg=None, lam_skin=0.3, lam_rtv=2.5,
                 iterations=3, sigma=3.0, sharpness=0.02, eps=1e-3, albedo0=None, data_weight=DATA_WEIGHT,
                 tol=1e-8):
    """Albedo with the skin-colour and RTV detail-reducing terms (Jin et al. 2021, Eqs. 6-7).

    Minimises over ``gamma`` (per channel)::

        w sum_{p in mask} (gamma S + beta - I)^2 + lam_skin ||gamma - gamma_avg||^2 + lam_rtv RTV(gamma)

    The RTV term (Xu et al. 2012) is minimised by iteratively re-weighted least squares: at each
    step ``RTV(gamma) ~ sum wx (d_x gamma)^2 + wy (d_y gamma)^2`` with the weights of the current
    albedo (:func:`geomfit.rtv.rtv_weights`), and the quadratic is one screened-Poisson solve with
    ``diag = w mask S^2 + lam_skin``. Outside the mask only the skin-colour and RTV terms act.

    Parameters
    ----------
    image : array (H, W, C)
        Linear image.
    shading : array (H, W, C) or (H, W)
        SH shading ``S(n)`` (:func:`geomfit.sh.shade`).
    specular : array (H, W, C), (H, W) or None
        ``epsilon * beta``; None for 0.
    mask : bool array (H, W)
        Pixels with a data term.
    albedo_avg : array (H, W, C) or (C,)
        Mean skin colour per region (``gamma_avg``), e.g. :func:`region_mean_albedo`.
    lam_skin, lam_rtv : float
        ``lambda_gamma1`` and ``lambda_gamma2`` (paper: 0.3, 2.5).
    iterations : int
        IRLS steps (0 gives the solution without the RTV term).
    sigma, sharpness, eps : float
        RTV scale, texture sharpness and the regulariser of the windowed gradient.
    albedo0 : array (H, W, C), optional
        Albedo the first RTV weights are computed from (default: the solution without RTV).
    data_weight : float
        Weight ``w`` of the data term (default :data:`DATA_WEIGHT`, intensities on the 8-bit scale).
    tol : float
        Relative residual of each screened-Poisson solve.

    Returns
    -------
    albedo : array (H, W, C)

    References
    ----------
    Jin et al. 2021, Sec. 3.4, Eqs. 6-7; L. Xu, Q. Yan, Y. Xia, J. Jia, "Structure
    extraction from texture via relative total variation", SIGGRAPH Asia 2012.
    """
    xp = get_array_module(image, shading)
    I = xp.asarray(image, dtype=xp.float64)
    if I.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got {I.shape}")
    H, W, C = I.shape
    S = _as_hwc(shading, H, W, C, xp, "shading")
    beta = 0.0 if specular is None else _as_hwc(specular, H, W, C, xp, "specular")
    m = xp.ones((H, W), bool) if mask is None else xp.asarray(mask, dtype=bool)
    if m.shape != (H, W):
        raise ValueError(f"mask must have shape {(H, W)}, got {m.shape}")
    if albedo_avg is None:
        raise ValueError("albedo_avg (gamma_avg) is required")
    avg = _as_hwc(albedo_avg, H, W, C, xp, "albedo_avg")
    if lam_skin <= 0 and lam_rtv <= 0:
        raise ValueError("lam_skin or lam_rtv must be positive (the albedo is undetermined outside the mask)")
    if not data_weight > 0:
        raise ValueError(f"data_weight must be > 0, got {data_weight}")
    mf = m[..., None].astype(xp.float64) * float(data_weight)
    diag = mf * S * S + lam_skin
    rhs = mf * S * (I - beta) + lam_skin * avg
    if lam_rtv <= 0 or iterations <= 0:
        return rhs / diag
    gamma = rhs / diag if albedo0 is None else _as_hwc(albedo0, H, W, C, xp, "albedo0").copy()
    same_diag = bool(xp.all(diag == diag[..., :1]))
    for _ in range(iterations):
        wx, wy = rtv_weights(gamma, sigma=sigma, sharpness=sharpness, eps=eps)
        wx = xp.asarray(wx) * lam_rtv
        wy = xp.asarray(wy) * lam_rtv
        if same_diag:
            gamma = solve_screened_poisson(diag[..., 0], wx, wy, rhs, x0=gamma, tol=tol)
        else:  # one solve per channel (the diagonal differs): channels, not pixels
            gamma = xp.stack([solve_screened_poisson(diag[..., c], wx, wy, rhs[..., c], x0=gamma[..., c], tol=tol)
                              for c in range(C)], -1)
    return gamma


def solve_specular(image, diffuse, beta0, mask=None, lam=0.5, nonnegative=True):
    """Specular term by Eq. 8 of Jin et al. 2021, in closed form per pixel.

    Minimises ``||diffuse + beta - I||^2 + lam ||beta - beta0||^2``:
    ``beta = (I - diffuse + lam beta0) / (1 + lam)``, clipped at 0 when ``nonnegative`` (the exact
    minimiser under ``beta >= 0``: specular light only adds). Zero outside the mask.

    Parameters
    ----------
    image, diffuse : array (H, W, C)
        The image and the diffuse rendering ``gamma * S``.
    beta0 : array (H, W, C)
        The prior ``beta_0``. geomfit freezes it to the residual ``I - gamma S`` left after the
        lighting/albedo initialisation (with the current residual, Eq. 8's minimiser would be
        ``beta0`` itself).
    mask : bool array (H, W), optional
    lam : float
        ``lambda_beta`` (paper: 0.5).

    Returns
    -------
    beta : array (H, W, C)
    """
    xp = get_array_module(image, diffuse, beta0)
    I = xp.asarray(image, dtype=xp.float64)
    if I.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got {I.shape}")
    H, W, C = I.shape
    D = _as_hwc(diffuse, H, W, C, xp, "diffuse")
    b0 = _as_hwc(beta0, H, W, C, xp, "beta0")
    if lam < 0:
        raise ValueError("lam must be >= 0")
    beta = (I - D + lam * b0) / (1.0 + lam)
    if nonnegative:
        beta = xp.maximum(beta, 0.0)
    if mask is not None:
        beta = beta * xp.asarray(mask, dtype=bool)[..., None]
    return beta


# ----------------------------------------------------------------------------------------------
# Depth (Eq. 9)
# ----------------------------------------------------------------------------------------------

def _row_pairs(X, Y):
    """All products ``X[p, j] * Y[p, k]`` of entries sharing a row ``p``: arrays ``(p, j, k, coef)``.

    ``X^T diag(w) Y = sum_p w_p X[p, :]^T Y[p, :]``, so these pairs map a weight vector ``w`` to the
    entries of ``X^T diag(w) Y`` linearly (vectorised row-wise Cartesian products, no loops).
    """
    X, Y = X.tocsr(), Y.tocsr()
    X.sort_indices()
    Y.sort_indices()
    cx, cy = np.diff(X.indptr), np.diff(Y.indptr)
    rx = np.repeat(np.arange(X.shape[0]), cx)  # row of every X entry
    rep = cy[rx]  # Y partners of every X entry
    ex = np.repeat(np.arange(X.nnz), rep)
    offs = np.arange(ex.size) - np.repeat(np.cumsum(rep) - rep, rep)
    ey = np.repeat(Y.indptr[rx], rep) + offs
    return rx[ex], X.indices[ex], Y.indices[ey], X.data[ex] * Y.data[ey]


class _DepthGrid:
    """Everything of Eq. 9 that depends only on the grid, the mask and the data mask.

    The restricted difference operators (``Gx, Gy`` central differences on the data rows, ``L`` the
    5-point Laplacian on the interior rows, ``D`` forward differences on the edges inside the mask),
    ``L^T L`` and ``D^T D``, and the fixed sparsity pattern of the Gauss-Newton matrix: the data
    Jacobian of channel ``c`` is ``diag(a_c) Gx + diag(b_c) Gy``, so ``J^T J = Gx^T diag(waa) Gx +
    Gx^T diag(wab) Gy + Gy^T diag(wab) Gx + Gy^T diag(wbb) Gy`` with ``waa = sum_c a_c^2``,
    ``wab = sum_c a_c b_c``, ``wbb = sum_c b_c^2``, and the values of ``J^T J + C`` on the pattern are
    ``M @ [waa; wab; wbb] + l1 vI + l2 vL + l3 l4^2 vD`` with a sparse ``M`` and the pattern images
    ``vI, vL, vD`` of ``I, L^T L, D^T D`` built once. Every Gauss-Newton assembly is then one sparse
    mat-vec (no sparse-sparse products), the pattern never changes (whatever the weights), and
    CHOLMOD's symbolic analysis is done once (:meth:`geomfit.backend.SPDFactor.refactor`). Depth
    solves on the same mask share one grid (:func:`solve_depth` passes it on with the factor).
    """

    def __init__(self, shape, mask, data_mask, xp):
        H, W = shape
        m = asnumpy(mask).astype(bool)
        inner = interior_mask(m)
        data = inner & (asnumpy(data_mask).astype(bool) if data_mask is not None else True)
        if inner.sum() < 1 or data.sum() < 1:
            raise ValueError("the mask has no interior pixels (all four neighbours inside): it is too thin")
        self.shape, self.xp = (H, W), xp
        self.mask, self.data = m, data
        self.cols = cols = np.flatnonzero(m.ravel())
        self.rows_data = rows_d = np.flatnonzero(data.ravel())
        self.rows_inner = rows_i = np.flatnonzero(inner.ravel())
        Gx, Gy = central_gradient_operators((H, W))
        Gx, Gy = Gx[rows_d][:, cols].tocsr(), Gy[rows_d][:, cols].tocsr()
        L = laplacian_operator((H, W))[rows_i][:, cols].tocsr()
        Dx, Dy = forward_difference_operators((H, W))
        ex, ey = edge_masks(m)
        self.edges = (ex, ey)
        self.Dx_e, self.Dy_e = Dx[ex.ravel()].tocsr(), Dy[ey.ravel()].tocsr()  # on the full grid (image term)
        D = sp.vstack([self.Dx_e[:, cols], self.Dy_e[:, cols]]).tocsr()
        n, nd = cols.size, rows_d.size
        self.n = n
        LtL, DtD = (L.T @ L).tocsr(), (D.T @ D).tocsr()
        eye = sp.identity(n, format="csr")
        # the pattern: every entry any weights can produce
        aG = abs(Gx) + abs(Gy)
        P = (aG.T @ aG + abs(LtL) + abs(DtD) + eye).tocsr()
        P.sort_indices()
        indptr, indices = P.indptr.astype(np.int64), P.indices.astype(np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        keys = rows * n + indices  # sorted (CSR with sorted indices)

        def pos(r, c):
            return np.searchsorted(keys, np.asarray(r, np.int64) * n + c)

        def image(A):  # values of a sparse matrix on the pattern
            Ac = A.tocoo()
            return np.bincount(pos(Ac.row, Ac.col), weights=Ac.data, minlength=keys.size)

        parts_pos, parts_col, parts_val = [], [], []
        for X, Y, w in ((Gx, Gx, 0), (Gx, Gy, 1), (Gy, Gx, 1), (Gy, Gy, 2)):
            p_, j, k, coef = _row_pairs(X, Y)
            parts_pos.append(pos(j, k))
            parts_col.append(w * nd + p_)
            parts_val.append(coef)
        M = sp.csr_matrix((np.concatenate(parts_val), (np.concatenate(parts_pos), np.concatenate(parts_col))),
                          shape=(keys.size, 3 * nd))
        vI, vL, vD = image(eye), image(LtL), image(DtD)
        diag_pos = pos(np.arange(n), np.arange(n))
        def dev(A):
            return sparse_on_device(A, xp)

        self.Gx, self.Gy, self.L, self.D = dev(Gx), dev(Gy), dev(L), dev(D)
        self.LtL, self.DtD = dev(LtL), dev(DtD)
        self.M = dev(M)
        self.indptr, self.indices, self.diag_pos, self.vI, self.vL, self.vD = (
            xp.asarray(a) for a in (indptr, indices, diag_pos, vI, vL, vD))

    def matches(self, shape, mask, data_mask, xp) -> bool:
        """Whether this grid serves a problem on ``shape``, ``mask`` and ``data_mask`` (on ``xp``)."""
        if xp is not self.xp or tuple(shape) != self.shape:
            return False
        m = asnumpy(mask).astype(bool)
        if not np.array_equal(m, self.mask):
            return False
        data = interior_mask(m) & (asnumpy(data_mask).astype(bool) if data_mask is not None else True)
        return bool(np.array_equal(data, self.data))

    def constant(self, lam):
        """``l1 I + l2 L^T L + l3 l4^2 D^T D`` on the pattern."""
        l1, l2, l3, l4 = lam
        return l1 * self.vI + l2 * self.vL + (l3 * l4 * l4) * self.vD

    def values(self, a, b, cst):
        """Entries of ``J^T J + C`` on the pattern, from the data derivatives ``a, b`` (n_data, C)."""
        xp = self.xp
        w = xp.concatenate([(a * a).sum(1), (a * b).sum(1), (b * b).sum(1)])
        return self.M @ w + cst

    def matrix(self, values, damping=0.0):
        """The matrix with ``values`` plus ``damping * diag`` (Marquardt), CSC on the CPU (symmetric,
        so the CSR arrays serve as CSC), CSR on the GPU."""
        xp = self.xp
        v = values.copy()
        if damping:
            v[self.diag_pos] *= 1.0 + damping
        return symmetric_from_csr(v, self.indices, self.indptr, self.n, xp)


class _DepthProblem:
    """Eq. 9 restricted to the depth values inside the mask, as stacked residuals ``R(u)``.

    ``E(u) = ||R(u)||^2`` with ``R = [data (n_data * C); sqrt(l1)(u - u0); sqrt(l2) L u;
    sqrt(l3)(l4 D u - D g)]``: data rows on pixels whose 4 neighbours are in the mask (so every
    stencil reads unknowns only), Laplacian rows on the same pixels, gradient rows on the edges
    inside the mask, ``g`` the grey image (channel mean). ``grid``: a :class:`_DepthGrid` of an
    earlier problem, reused when it matches the mask and data mask.
    """

    def __init__(self, image, mask, albedo, sh, specular, depth, depth0, lam, data_mask=None, data_weight=1.0,
                 gradient_scale=1.0, grid=None, pixel_weight=None, laplacian_on_displacement=False):
        xp = get_array_module(image, depth)
        self.xp = xp
        H, W, C = image.shape
        self.shape = (H, W)
        if grid is None or not grid.matches((H, W), mask, data_mask, xp):
            grid = _DepthGrid((H, W), mask, data_mask, xp)
        self.grid = g = grid
        self.cols, self.rows_data, self.rows_inner, self.edges = g.cols, g.rows_data, g.rows_inner, g.edges
        self.Gx, self.Gy, self.L, self.D = g.Gx, g.Gy, g.L, g.D
        gray = asnumpy(image).mean(-1).ravel()
        Dg = float(gradient_scale) * np.concatenate([g.Dx_e @ gray, g.Dy_e @ gray])
        l1, l2, l3, l4 = (float(v) for v in lam)
        if min(l1, l2, l3, l4) < 0 or l1 + l2 + l3 * l4 * l4 <= 0:
            raise ValueError(f"depth weights must be >= 0 and not all zero, got {lam}")
        self.lam = (l1, l2, l3, l4)
        self.n = g.n
        self.cst = g.constant(self.lam)
        self.Dg = xp.asarray(Dg)
        ridx = xp.asarray(self.rows_data)
        self.I = image.reshape(-1, C)[ridx]
        self.gamma = albedo.reshape(-1, C)[ridx]
        self.beta = 0.0 if specular is None else specular.reshape(-1, C)[ridx]
        sh = xp.asarray(sh, dtype=xp.float64)
        self.sh = xp.broadcast_to(sh[:, None], (9, C)) if sh.ndim == 1 else sh
        self.u0 = xp.asarray(depth0, dtype=xp.float64).ravel()[xp.asarray(self.cols)]
        self.u_init = xp.asarray(depth, dtype=xp.float64).ravel()[xp.asarray(self.cols)]
        self.C = C
        if not data_weight > 0:
            raise ValueError(f"data_weight must be > 0, got {data_weight}")
        self.sw = float(np.sqrt(data_weight))
        if pixel_weight is not None:
            pw = xp.asarray(pixel_weight, dtype=xp.float64)
            if pw.shape != (H, W):
                raise ValueError(f"pixel_weight must have shape {(H, W)}, got {pw.shape}")
            if not bool(xp.isfinite(pw).all()) or bool((pw < 0).any()):
                raise ValueError("pixel_weight must be finite and >= 0")
            self.sw = self.sw * xp.sqrt(pw.ravel()[ridx])[:, None]
        self.lap_disp = bool(laplacian_on_displacement)

    @property
    def Cst(self):
        """The constant part ``l1 I + l2 L^T L + l3 l4^2 D^T D`` as a sparse matrix (for tests)."""
        spm = sparse_module(self.xp)
        l1, l2, l3, l4 = self.lam
        return (l1 * spm.identity(self.n, format="csr") + l2 * self.grid.LtL + (l3 * l4 * l4) * self.grid.DtD).tocsr()

    # -- pieces ---------------------------------------------------------------------------------
    def _normals(self, u):
        xp = self.xp
        p = self.Gx @ u
        q = self.Gy @ u
        nv = xp.sqrt(1.0 + p * p + q * q)
        n = xp.stack([-p / nv, q / nv, 1.0 / nv], axis=-1)
        return n, nv

    def data_residual(self, u):
        n, _ = self._normals(u)
        return self.sw * (self.gamma * (sh_basis(n) @ self.sh) + self.beta - self.I)

    def data_derivatives(self, u):
        """Residual (n_data, C) and its derivatives a = dr/dp, b = dr/dq (n_data, C)."""
        xp = self.xp
        n, nv = self._normals(u)
        r = self.sw * (self.gamma * (sh_basis(n) @ self.sh) + self.beta - self.I)
        gS = xp.einsum("pkj,kc->pcj", _sh_basis_grad(n), self.sh)  # dS/dn (n_data, C, 3)
        t = gS - (gS * n[:, None, :]).sum(-1, keepdims=True) * n[:, None, :]  # tangent projection
        a = -self.sw * self.gamma * t[..., 0] / nv[:, None]
        b = self.sw * self.gamma * t[..., 1] / nv[:, None]
        return r, a, b

    def const_residual(self, u):
        xp = self.xp
        l1, l2, l3, l4 = self.lam
        lu = self.L @ (u - self.u0) if self.lap_disp else self.L @ u
        return xp.concatenate([np.sqrt(l1) * (u - self.u0), np.sqrt(l2) * lu,
                               np.sqrt(l3) * (l4 * (self.D @ (u - self.u0)) - self.Dg)])

    def residuals(self, u):
        xp = self.xp
        return xp.concatenate([self.data_residual(u).T.ravel(), self.const_residual(u)])

    def energy(self, u):
        xp = self.xp
        r = self.data_residual(u)
        c = self.const_residual(u)
        return float((r * r).sum() + (c * c).sum())

    def data_jacobian(self, r_a_b):
        spm = sparse_module(self.xp)
        _, a, b = r_a_b
        blocks = [spm.diags(a[:, c]) @ self.Gx + spm.diags(b[:, c]) @ self.Gy for c in range(self.C)]
        return spm.vstack(blocks).tocsr()

    def gauss_newton(self, u):
        """The Gauss-Newton values ``J^T J + C`` on the grid's pattern and the half gradient
        ``J^T R`` of :meth:`energy` at ``u``."""
        rab = self.data_derivatives(u)
        r, a, b = rab
        g = (self.Gx.T @ (a * r).sum(1) + self.Gy.T @ (b * r).sum(1)) + self.gradient_const(u)
        return self.grid.values(a, b, self.cst), g

    def jacobian(self, u):
        """Stacked sparse Jacobian of :meth:`residuals` (for tests)."""
        spm = sparse_module(self.xp)
        l1, l2, l3, l4 = self.lam
        Jd = self.data_jacobian(self.data_derivatives(u))
        eye = spm.identity(self.n, format="csr")
        return spm.vstack([Jd, np.sqrt(l1) * eye, np.sqrt(l2) * self.L, np.sqrt(l3) * l4 * self.D]).tocsr()

    def gradient_const(self, u):
        l1, l2, l3, l4 = self.lam
        ul = u - self.u0 if self.lap_disp else u
        return l1 * (u - self.u0) + l2 * (self.L.T @ (self.L @ ul)) + l3 * l4 * (self.D.T @ (l4 * (self.D @ (u - self.u0)) - self.Dg))


@dataclass
class DepthInfo:
    """Convergence record of :func:`solve_depth`: energies (Eq. 9) after each accepted step (the
    first entry is the initial energy), the wall-clock seconds at which each was reached, the number
    of linear solves (factor solves, including those inside PCG), factorisations and PCG iterations,
    the final damping, and the last factor (pass it back as ``factor=`` to a later call on the same
    mask)."""
    energies: List[float] = field(default_factory=list)
    times: List[float] = field(default_factory=list)
    solves: int = 0
    factorizations: int = 0
    pcg_iterations: int = 0
    damping: float = 0.0
    factor: object = None


@dataclass
class DepthOptions:
    """Settings of :func:`solve_depth` (Jin et al. 2021, Eq. 9 and Sec. 4.1), one per depth phase.

    The presets are the paper's two phases: ``DepthOptions.phase1()`` (``lam`` = :data:`PHASE1`, also
    the default) and ``DepthOptions.phase2()`` (``lam`` = :data:`PHASE2`); both take changes as
    keywords, e.g. ``DepthOptions.phase2(iterations=3, pcg_maxiter=0)``.

    Parameters
    ----------
    lam : 4 floats
        ``lambda_d1 .. lambda_d4`` of Eq. 9 (default: the paper's phase 1, :data:`PHASE1`).
    iterations : int
        Maximum number of accepted Levenberg-Marquardt steps.
    tol : float
        Stop when a step lowers the energy by less than ``tol`` (relative).
    damping : float
        Initial Marquardt damping (relative to the diagonal).
    data_weight : float
        Weight of the data term (default :data:`DATA_WEIGHT`, intensities on the 8-bit scale).
    gradient_scale : float
        Scale of the grey image in the gradient term.
    reuse_factor : bool
        Use the ``factor`` passed to :func:`solve_depth` as a preconditioner (True) or only its
        symbolic analysis (False: the first step refactors, e.g. when ``lam`` changed).
    pcg_tol, pcg_maxiter : float, int
        Forcing tolerance and iteration cap of the inexact steps (``pcg_maxiter=0``: every step is an
        exact factor solve).
    laplacian_on_displacement : bool
        The Laplacian term acts on ``d - d0`` instead of ``d`` (keeps the input's own curvature).
    linear_solver : {"factor", "jacobi"}
        ``"factor"``: factorisation-preconditioned inexact steps (see :func:`solve_depth`);
        ``"jacobi"``: every step by Jacobi-preconditioned CG (``pcg_tol``, ``pcg_maxiter``), no
        factorisation (for well-conditioned, strongly pinned problems such as the robust method's).
    """

    lam: Tuple[float, float, float, float] = PHASE1
    iterations: int = 5
    tol: float = 1e-4
    damping: float = 1e-4
    data_weight: float = DATA_WEIGHT
    gradient_scale: float = 1.0
    reuse_factor: bool = True
    pcg_tol: float = 0.1
    pcg_maxiter: int = 20
    laplacian_on_displacement: bool = False
    linear_solver: str = "factor"

    def __post_init__(self):
        try:
            n = len(self.lam)
        except TypeError:
            n = -1
        if n != 4:
            raise ValueError(f"lam must hold 4 weights (lambda_d1..lambda_d4), got {self.lam}")
        if self.linear_solver not in ("factor", "jacobi"):
            raise ValueError(f"linear_solver must be 'factor' or 'jacobi', got {self.linear_solver!r}")
        if not self.iterations >= 0:
            raise ValueError(f"DepthOptions.iterations must be >= 0, got {self.iterations}")
        if not self.pcg_maxiter >= 0:
            raise ValueError(f"DepthOptions.pcg_maxiter must be >= 0, got {self.pcg_maxiter}")
        for name in ("damping", "data_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DepthOptions.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def phase1(cls, **changes) -> "DepthOptions":
        """The paper's first depth phase (``lam`` = :data:`PHASE1`, Jin et al. 2021, Sec. 4.1)."""
        return cls(**{"lam": PHASE1, **changes})

    @classmethod
    def phase2(cls, **changes) -> "DepthOptions":
        """The paper's second depth phase (``lam`` = :data:`PHASE2`, Jin et al. 2021, Sec. 4.1)."""
        return cls(**{"lam": PHASE2, **changes})


_DEPTH_OPTION_KEYS = ("lam", "iterations", "tol", "damping", "data_weight", "gradient_scale", "reuse_factor",
                      "pcg_tol", "pcg_maxiter", "laplacian_on_displacement", "linear_solver")


def _options_from(cls, options, legacy, *, allowed, where, hint, legacy_base):
    """``options`` (an instance of ``cls``, a dict of its fields or None) with deprecated keyword
    arguments ``legacy`` applied on top (a DeprecationWarning naming them); ``legacy_base()`` is the
    base when only keywords are given. Unknown keywords raise TypeError, as a plain signature would."""
    import dataclasses
    import warnings

    if isinstance(options, dict):
        options = cls(**options)
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__} or a dict, got {type(options).__name__}")
    if legacy:
        bad = sorted(set(legacy) - set(allowed))
        if bad:
            raise TypeError(f"{where}() got unexpected keyword arguments {bad}")
        warnings.warn(f"{where}(..., " + ", ".join(sorted(legacy)) + f"=...) is deprecated: pass {hint}",
                      DeprecationWarning, stacklevel=4)
        options = dataclasses.replace(options if options is not None else legacy_base(), **legacy)
    return options if options is not None else cls()


def _resolve_depth_options(options, legacy) -> DepthOptions:
    return _options_from(DepthOptions, options, legacy, allowed=_DEPTH_OPTION_KEYS, where="solve_depth",
                         hint="options=DepthOptions(...) (DepthOptions.phase1(...) / .phase2(...); these "
                              "keywords go in the next release)", legacy_base=DepthOptions)


def solve_depth(image, depth, mask, albedo, sh, specular=None, depth0=None, options=None, *, data_mask=None,
                pixel_weight=None, factor=None, return_info=False, **legacy):
    """Refine a depth map by shape from shading (Jin et al. 2021, Eq. 9) with Levenberg-Marquardt.

    Minimises over the depth values inside ``mask``::

        E(d) = sum_{p, c} (gamma S(n(d)) + beta - I)^2 + l1 ||d - d0||^2 + l2 ||L d||^2
               + l3 ||grad g - l4 grad d||^2

    with ``L`` the 5-point Laplacian, ``grad`` forward differences and ``g`` the grey image (channel
    mean). Each step linearises the shading through the normals (analytic Jacobian) and solves the
    sparse normal equations ``(J^T J + C + mu diag) delta = -grad E / 2``; the step is accepted
    only if the energy falls (Marquardt's damping adapted).

    The normal equations are solved inexactly where that is cheaper (a truncated Newton /
    inexact Levenberg-Marquardt method): the matrix is assembled on one fixed sparsity pattern,
    factored with :func:`geomfit.backend.factorize_spd` when no usable factor exists, and later
    steps run preconditioned conjugate gradients (:func:`geomfit.backend.pcg`, relative residual
    ``pcg_tol``, at most ``pcg_maxiter`` iterations) with the last factor as preconditioner. When a
    PCG step does not lower the energy, the damping grows and the next try is solved with a fresh
    factor; a PCG run that does not reach ``pcg_tol`` marks the factor stale, so the next step
    refactors (numerically only: the symbolic analysis is kept). With ``pcg_maxiter=0`` every step is an
    exact factor solve. On the GPU without cholespy the "factor" is itself iterative, and every
    step is solved by it directly.

    Parameters
    ----------
    image : array (H, W, C)
        Linear image.
    depth : array (H, W)
        Start depth (pixel units, larger = closer); values outside the mask are kept.
    mask : bool array (H, W)
    albedo : array (H, W, C)
    sh : array (9, C) or (9,)
        Lighting in geomfit's SH convention.
    specular : array (H, W, C), optional
        ``epsilon * beta``.
    depth0 : array (H, W), optional
        The prior ``d0`` (default: ``depth``).
    options : DepthOptions or dict, optional
        The weights ``lam`` and the solver settings (default ``DepthOptions()``: the paper's phase 1).
        The same fields as keywords (``lam=``, ``iterations=``, ``tol=``, ``damping=``,
        ``data_weight=``, ``gradient_scale=``, ``reuse_factor=``, ``pcg_tol=``, ``pcg_maxiter=``,
        ``laplacian_on_displacement=``, ``linear_solver=``) are deprecated: accepted for one release
        with a ``DeprecationWarning``, applied over ``options``.
    data_mask : bool array (H, W), optional
        Pixels allowed in the data term (e.g. not saturated); default all of ``mask``.
    pixel_weight : array (H, W), optional
        Non-negative per-pixel factor on the data term (the robust method's confidence).
    factor : SPDFactor, optional
        ``info.factor`` of an earlier call with the same ``mask`` and ``data_mask``: its symbolic
        analysis is reused and, with ``options.reuse_factor``, it preconditions the first steps.
    return_info : bool
        Also return a :class:`DepthInfo`.

    Returns
    -------
    depth : array (H, W)
    info : DepthInfo (when ``return_info``)

    References
    ----------
    Jin et al. 2021, Sec. 3.4, Eq. 9 and Sec. 4.1 (weights); Dembo, Eisenstat and
    Steihaug, "Inexact Newton methods", SIAM J. Numer. Anal. 19 (1982) (the truncated steps).
    """
    t0 = time.perf_counter()
    o = _resolve_depth_options(options, legacy)
    lam, iterations, tol, damping = o.lam, o.iterations, o.tol, o.damping
    data_weight, gradient_scale, reuse_factor = o.data_weight, o.gradient_scale, o.reuse_factor
    pcg_tol, pcg_maxiter, linear_solver = o.pcg_tol, o.pcg_maxiter, o.linear_solver
    laplacian_on_displacement = o.laplacian_on_displacement
    xp = get_array_module(image, depth)
    I = xp.asarray(image, dtype=xp.float64)
    if I.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got {I.shape}")
    H, W, C = I.shape
    m = _prepare_mask(mask, (H, W), xp, min_pixels=9)
    d = _prepare_depth(depth, m, xp)
    d0 = d if depth0 is None else _prepare_depth(depth0, m, xp)
    alb = xp.ascontiguousarray(_as_hwc(albedo, H, W, C, xp, "albedo"))
    spec = None if specular is None else xp.ascontiguousarray(_as_hwc(specular, H, W, C, xp, "specular"))
    prob = _DepthProblem(I, m, alb, sh, spec, d, d0, lam, data_mask, data_weight, gradient_scale,
                         grid=getattr(factor, "_depth_grid", None), pixel_weight=pixel_weight,
                         laplacian_on_displacement=laplacian_on_displacement)
    grid = prob.grid
    u = prob.u_init
    E = prob.energy(u)
    info = DepthInfo(energies=[E], times=[time.perf_counter() - t0])
    mu = float(damping)
    F = factor if (factor is not None and getattr(factor, "_depth_grid", None) is grid) else None
    stale = F is None or not reuse_factor  # True: the next solve must (re)factor the current matrix

    def refactor(A):
        nonlocal F
        if F is None:
            F = factorize_spd(A)
        else:
            F.refactor(A)
        F._depth_grid = grid
        info.factorizations += 1

    for _ in range(int(iterations)):
        vals, g = prob.gauss_newton(u)
        accepted = False
        for _try in range(10):
            A = grid.matrix(vals, mu)
            inexact = not stale and F.exact and pcg_maxiter > 0
            if linear_solver == "jacobi":  # no factorisation: Jacobi-preconditioned CG, truncated
                dinv = 1.0 / A.diagonal()
                step, k, ok = pcg(A, -g, lambda r: dinv * r, tol=pcg_tol, maxiter=pcg_maxiter)
                info.pcg_iterations += k
                info.solves += k
                inexact = True
            elif inexact:
                step, k, ok = pcg(A, -g, F.solve, tol=pcg_tol, maxiter=pcg_maxiter)
                info.pcg_iterations += k
                info.solves += k if ok else k + 1  # preconditioner applications inside pcg
                stale = not ok
            else:
                refactor(A)
                step = F.solve(-g)
                info.solves += 1
                stale = False
            E_new = prob.energy(u + step)
            if np.isfinite(E_new) and E_new < E:
                accepted = True
                break
            stale = stale or inexact  # after a rejected truncated step, the next try solves exactly
            mu = max(mu * 4.0, 1e-6)
        if not accepted:
            break
        u = u + step
        dE = E - E_new
        E = E_new
        mu = mu / 3.0
        info.energies.append(E)
        info.times.append(time.perf_counter() - t0)
        if dE < tol * E:
            break
    info.damping = mu
    info.factor = F
    out = xp.ascontiguousarray(d).copy()
    out.reshape(-1)[xp.asarray(prob.cols)] = u
    return (out, info) if return_info else out


# ----------------------------------------------------------------------------------------------
# Regions and average albedo
# ----------------------------------------------------------------------------------------------

#: Labels of :func:`landmark_regions`.
REGIONS = {"background": 0, "skin": 1, "brows": 2, "eyes": 3, "lips": 4, "mouth": 5}


def landmark_regions(landmarks, shape, mask=None):
    """Semantic regions for the skin-colour term from 68 iBUG landmarks.

    The paper used a face-parsing network (Yu et al.); geomfit draws polygons instead: eyes
    (points 37-42, 43-48), lips (outer 49-60 minus inner 61-68), mouth interior (61-68), brows
    (17-22, 23-27 drawn as thick polylines, thickness 8 % of the inter-ocular distance); the rest
    of ``mask`` (default: the convex hull of the landmarks) is skin.

    Parameters
    ----------
    landmarks : array (68, 2)
        ``(x, y)`` pixel coordinates (x = column, y = row), iBUG order.
    shape : (H, W)
    mask : bool array (H, W), optional

    Returns
    -------
    regions : int array (H, W)
        Labels of :data:`REGIONS` (0 outside).
    """
    import cv2

    lm = asnumpy(landmarks).astype(np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must have shape (68, 2), got {lm.shape}")
    if not np.isfinite(lm).all():
        raise ValueError("landmarks contain NaN or inf")
    H, W = int(shape[0]), int(shape[1])
    pts = np.round(lm).astype(np.int32)
    reg = np.zeros((H, W), np.uint8)
    if mask is None:
        cv2.fillConvexPoly(reg, cv2.convexHull(pts), REGIONS["skin"])
    else:
        reg[asnumpy(mask).astype(bool)] = REGIONS["skin"]
    inside = reg > 0
    iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
    thick = max(2, int(round(0.08 * iod)))
    layer = np.zeros_like(reg)
    for a, b in ((17, 22), (22, 27)):
        cv2.polylines(layer, [pts[a:b]], False, REGIONS["brows"], thick)
    cv2.fillPoly(layer, [pts[48:60]], REGIONS["lips"])
    cv2.fillPoly(layer, [pts[60:68]], REGIONS["mouth"])
    cv2.fillPoly(layer, [pts[36:42], pts[42:48]], REGIONS["eyes"])
    sel = (layer > 0) & inside
    reg[sel] = layer[sel]
    return reg.astype(np.int32)


def region_mean_albedo(image, regions, mask=None):
    """``gamma_avg``: the mean colour of ``image`` over each labelled region, as an (H, W, C) map.

    Pixels of label 0 (and outside ``mask``) get the mean over all labelled pixels. Regions are
    averaged with a vectorised ``bincount``.
    """
    xp = get_array_module(image)
    I = xp.asarray(image, dtype=xp.float64)
    H, W, C = I.shape
    reg = xp.asarray(regions).astype(xp.int64)
    if reg.shape != (H, W):
        raise ValueError(f"regions must have shape {(H, W)}, got {reg.shape}")
    if bool((reg < 0).any()):
        raise ValueError("regions must be non-negative integer labels")
    valid = reg > 0 if mask is None else (reg > 0) & xp.asarray(mask, dtype=bool)
    if not bool(valid.any()):
        raise ValueError("regions: no labelled pixel inside the mask")
    lab = xp.where(valid, reg, 0).ravel()
    K = int(lab.max()) + 1
    cnt = xp.bincount(lab, minlength=K).astype(xp.float64)
    means = xp.stack([xp.bincount(lab, weights=I[..., c].ravel(), minlength=K) for c in range(C)], -1)
    overall = means[1:].sum(0) / cnt[1:].sum()
    means = xp.where(cnt[:, None] > 0, means / xp.maximum(cnt, 1)[:, None], overall[None, :])
    means[0] = overall
    return means[lab].reshape(H, W, C)


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

@dataclass
class FineOptions:
    """Settings of :func:`fine_stage`.  Two methods, each with a preset:

    * ``FineOptions.robust()`` (the default, ``method="robust"``): geomfit's method for real photos
      (docs/fine.md "The robust method"): a first-order light from the band-pass correlation of the
      log image with the input normals, a smooth albedo (the low-passed ratio image), a noise- and
      texture-aware data weight, a bounded high-frequency displacement over the input, and a
      confidence that keeps the input depth where the image cannot tell detail from texture.
    * ``FineOptions.paper()`` (``method="paper"``): Jin et al. 2021's Eqs. 4-9 as published (RTV
      albedo, specular, the two depth phases), with geomfit's solvers.

    Fields of the paper method
    --------------------------
    phases, lam_skin, lam_rtv, lam_spec, specular, shared_light, init_rounds, outer_iterations,
    depth_iterations, rtv_iterations, data_weight, gradient_scale, albedo_data_weight, inexact_depth:
    see :func:`fine_stage` (the paper's lambda_d1..d4, lambda_gamma1/2, lambda_beta; the data weight
    255^2 puts intensities on the 8-bit scale).

    Fields of the robust method
    ---------------------------
    light_scale : float
        Band-pass scale of the light fit, as a fraction of the face size ``sqrt(mask pixels)``.
    albedo_scale : float
        Gaussian sigma (fraction of the face size) of the low-passed ratio image used as albedo (the
        guided filter's window radius is twice it).
    albedo_eps : float
        The guided filter's ``eps`` on the log ratio (He, Sun & Tang 2010): local variations with a
        variance above it stay in the albedo (albedo edges), smaller ones go to the depth.  0: a plain
        Gaussian low-pass.
    noise_window : float
        Gaussian sigma (pixels) of the local high-frequency residual energy.
    noise_quantile : float
        Quantile of that local energy taken as the image's noise level ``sigma_n`` (and of the
        chromaticity's high-pass energy taken as its noise level ``sigma_c``).
    noise_floor : float
        Lower bound of ``sigma_n`` (about the noise of a clean 8-bit photo in linear units; keeps
        noise-free renders and smooth JPEGs from getting an unbounded weight).
    texture_power : float
        Per-pixel data weight ``(sigma_c / e_c) ** texture_power`` with ``e_c`` the local
        high-pass energy of the chromaticity ``I / sum(I)``: shading detail under white light leaves
        the chromaticity alone, pigment, hair, stubble and frames do not.
    residual_texture : bool
        Also multiply by ``(sigma_n / e) ** texture_power`` with ``e`` the local high-pass energy of
        the residual (achromatic texture such as grey stubble; it also damps strong true detail).
    shading_floor : float
        The albedo ``G * (I / S0)`` divides by at least this fraction of the skin's median predicted
        shading, and pixels below it (where the fitted light predicts little light: nostrils, the
        shadowed side) are left out of the albedo's low-pass and of the data term (0: no floor).
    albedo_clip : float
        Pixels whose ratio ``I / S0`` is brighter than this many times the skin median (specular
        highlights, light-model failures) are left out the same way, and the albedo is capped there.
    kappa : float
        Data weight ``kappa / sigma_n^2`` (the noise-aware weight).
    pin : float
        Weight of ``||d - d0||^2`` relative to the data term's scale (pins the low frequencies).
    smoothness : float
        Weight of ``||L (d - d0)||^2`` (Laplacian of the displacement).
    robust_iterations : int
        Levenberg-Marquardt steps of the depth solve.
    cg_tol, cg_maxiter : float, int
        Each step is solved by Jacobi-preconditioned CG to this relative residual (the pin makes the
        system well conditioned; no factorisation). ``inexact_depth=False`` solves every step
        exactly with a factorisation instead.
    band_scale, band_level, band_power : float
        Mid-band texture weight: ``(band_level / e_b) ** band_power`` where ``e_b`` is the local RMS
        (Gaussian window ``2 b``) of the log residual ``log I - log(albedo S0)`` band-passed between
        Gaussians of sigma ``b / 2`` and ``2 b``, ``b = band_scale`` x the face size.  A 1 % albedo
        error in that band already tilts the recovered normals by about a degree (docs/fine.md), and
        shading detail of skin is about that size; where the band carries more, it is texture the
        albedo's low-pass kept (pores, stubble, baked shading of a photo texture), and the pixel keeps
        its input depth.  ``band_scale=0`` turns it off.
    curvature_quantile : float
        The displacement is kept in proportion to the local curvature of the input depth, full from
        this quantile of it up (detail is lost where the blurred input bends; 0 turns the gate off).
    dark : float
        Pixels darker than ``dark`` times the median skin brightness (hair, brows, frames, nostrils)
        get no data weight.

    Shared: ``saturation``, ``min_pixels`` (see :func:`fine_stage`).
    """

    method: str = "robust"
    # paper
    phases: Tuple[Tuple[float, float, float, float], ...] = (PHASE1, PHASE2)
    lam_skin: float = 0.3
    lam_rtv: float = 2.5
    lam_spec: float = 0.5
    specular: bool = True
    shared_light: bool = False
    init_rounds: int = 2
    outer_iterations: int = 2
    depth_iterations: int = 3
    rtv_iterations: int = 3
    data_weight: float = DATA_WEIGHT
    gradient_scale: float = 1.0
    albedo_data_weight: Optional[float] = None
    inexact_depth: bool = True
    # robust
    light_scale: float = 0.1
    albedo_scale: float = 0.02
    noise_window: float = 3.0
    noise_quantile: float = 0.2
    texture_power: float = 4.0
    kappa: float = 3e-4
    pin: float = 0.15
    smoothness: float = 0.01
    robust_iterations: int = 3
    curvature_quantile: float = 0.0
    dark: float = 0.35
    noise_floor: float = 2e-3
    cg_tol: float = 0.05
    cg_maxiter: int = 30
    residual_texture: bool = True
    shading_floor: float = 0.4
    albedo_clip: float = 3.0
    albedo_eps: float = 1e-3
    band_scale: float = 0.02
    band_level: float = 0.01
    band_power: float = 4.0
    # shared
    saturation: float = 0.995
    min_pixels: int = 64

    def __post_init__(self):
        if self.method not in ("robust", "paper"):
            raise ValueError(f"FineOptions.method must be 'robust' or 'paper', got {self.method!r}")
        for name in ("light_scale", "albedo_scale", "noise_window", "kappa", "band_level"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FineOptions.{name} must be > 0, got {getattr(self, name)}")
        if not self.albedo_clip > 1:
            raise ValueError(f"FineOptions.albedo_clip must be > 1, got {self.albedo_clip}")
        for name in ("pin", "smoothness", "texture_power", "dark", "shading_floor", "band_scale", "band_power",
                     "albedo_eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FineOptions.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("noise_quantile", "curvature_quantile"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"FineOptions.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def robust(cls, **changes) -> "FineOptions":
        """geomfit's default method for real photos (see the class docstring)."""
        return cls(method="robust", **changes)

    @classmethod
    def paper(cls, **changes) -> "FineOptions":
        """Jin et al. 2021, Eqs. 4-9 and Sec. 4.1's weights (the published formulation)."""
        return cls(method="paper", **changes)


_LEGACY_STAGE_KEYS = ("phases", "lam_skin", "lam_rtv", "lam_spec", "specular", "shared_light", "init_rounds",
                      "outer_iterations", "depth_iterations", "rtv_iterations", "saturation", "min_pixels",
                      "data_weight", "gradient_scale", "albedo_data_weight", "inexact_depth")


def _resolve_options(options, legacy) -> FineOptions:
    return _options_from(FineOptions, options, legacy, allowed=_LEGACY_STAGE_KEYS, where="fine_stage",
                         hint="options=FineOptions.paper(...) (these keywords select the paper's method and "
                              "go in the next release)", legacy_base=FineOptions.paper)


# ----------------------------------------------------------------------------------------------
# The robust method's pieces
# ----------------------------------------------------------------------------------------------

def _masked_gauss(a, m, sigma, xp):
    """:func:`geomfit.grid.masked_gaussian` with nearest-pixel boundaries."""
    return masked_gaussian(a, m, sigma, mode="nearest")


def band_light(image, normals, mask, scale, iterations=5):
    """First-order SH light from the band-pass correlation of the log image with the normals.

    Fits ``hp(log g) ~ l . hp(n)`` over ``mask`` (``g`` the grey image, ``hp(x) = x - G_scale * x``
    the high-pass of a masked Gaussian of sigma ``scale`` pixels) by iteratively re-weighted least
    squares (Huber weights at 2 robust sigmas), and returns SH irradiance coefficients (geomfit's
    convention) whose shading is ``1 + l . (n - n_mean)`` to first order.  An albedo that varies
    slowly (below the band) drops out of ``hp(log g)``, and texture finer than the input normals is
    uncorrelated with ``hp(n)``: the light comes from the face's own mid-scale shape (nose, brows,
    cheeks) rather than from the albedo, which is what the fit of Jin et al. 2021 Eq. 5 with a
    region-mean albedo confuses on real skin (docs/fine.md).

    Parameters
    ----------
    image : array (H, W, 3)
        Linear RGB.
    normals : array (H, W, 3)
        Normals of the input depth.
    mask : bool array (H, W)
        Pixels to fit on (skin).
    scale : float
        Band-pass sigma in pixels.

    Returns
    -------
    sh : array (9, 3)
        The same first-order light in every channel.
    """
    from .sh import _C0, _C1

    xp = get_array_module(image, normals)
    m = xp.asarray(mask, dtype=bool)
    if int(m.sum()) < 16:
        raise ValueError("band_light: fewer than 16 pixels to fit the light on")
    L = xp.log(xp.maximum(image.mean(-1), 1e-3))
    y = (L - _masked_gauss(L, m, scale, xp))[m]
    X = xp.stack([(normals[..., k] - _masked_gauss(normals[..., k], m, scale, xp))[m] for k in range(3)], -1)
    w = xp.ones(y.shape[0])
    ell = xp.zeros(3)
    for _ in range(int(iterations)):
        A = (X * w[:, None]).T @ X + 1e-9 * xp.eye(3)
        ell = xp.linalg.solve(A, (X * w[:, None]).T @ y)
        r = y - X @ ell
        s = 1.4826 * float(xp.median(xp.abs(r))) + 1e-12
        w = 1.0 / xp.maximum(1.0, xp.abs(r) / (2.0 * s))
    nb = normals[m].mean(0)
    sh = xp.zeros((9, 3))
    sh[3] = ell[0] / _C1
    sh[1] = ell[1] / _C1
    sh[2] = ell[2] / _C1
    sh[0] = (1.0 - float(ell @ nb)) / _C0
    return sh


def _guided_log(R, trust, sigma, eps, xp):
    """Edge-preserving low-pass of a ratio image: the guided filter (He, Sun & Tang, "Guided image
    filtering", ECCV 2010 / TPAMI 2013) of ``log R`` per channel, guided by its own log-luminance, with
    box statistics over the ``trust`` pixels only (window radius ``2 sigma``).  Variations whose local
    variance exceeds ``eps`` (albedo edges: moles, brows, blotches) are kept; smaller ones (shading
    detail) are averaged away."""
    nd = ndimage_module(xp)
    size = 2 * int(round(2.0 * sigma)) + 1
    t = trust.astype(xp.float64)
    L = xp.log(xp.maximum(R, 1e-6))
    g = L.mean(-1)

    def box(a):
        return nd.uniform_filter(a * t, size, mode="nearest")

    n = xp.maximum(box(xp.ones_like(g)), 1e-9)
    mg = box(g) / n
    vg = xp.maximum(box(g * g) / n - mg * mg, 0.0)
    out = []
    for c in range(L.shape[-1]):
        mp = box(L[..., c]) / n
        a = (box(g * L[..., c]) / n - mg * mp) / (vg + eps)
        b = mp - a * mg
        ma = nd.uniform_filter(a, size, mode="nearest")
        mb = nd.uniform_filter(b, size, mode="nearest")
        out.append(xp.exp(ma * g + mb))
    return xp.stack(out, -1)


def _ratio_albedo(I, S0, dm, skin, sigma, shading_floor, clip, xp, eps=0.0):
    """Smooth albedo from the ratio ``I / S0`` of the trusted pixels; returns ``(albedo, trust, smooth)``.

    A pixel is trusted when its predicted shading is at least ``shading_floor`` times the skin's
    median shading (where the first-order light predicts little light, ``I / S0`` divides by a small,
    unreliable number: nostrils, the shadowed side) and its ratio's brightness is at most ``clip``
    times the skin's median ratio (specular highlights, light-model failures).  ``smooth`` is the
    Gaussian low-pass ``G * (I / S0)`` as a normalised convolution over the trusted pixels, so a
    blown-out pixel does not spread; pixels with little trusted support take a 4x wider average (the
    skin median where even that has none), and the brightness is capped at ``clip`` times the
    median.  With ``eps > 0`` the trusted pixels' ``albedo`` is instead the edge-preserving guided
    filter of the ratio (:func:`_guided_log`), which keeps albedo edges sharper than the shading
    detail (``smooth`` is still returned: the texture weight measures what it leaves); otherwise
    ``albedo is smooth``.
    """
    if shading_floor <= 0 and not np.isfinite(clip):
        a = _masked_gauss(I / S0, dm, sigma, xp)
        return a, dm, a
    nd = ndimage_module(xp)
    ref = skin & dm if bool((skin & dm).any()) else dm
    S = S0.mean(-1)  # (H, W, 3) shading; white light: the channels agree
    s_med = float(xp.median(S[ref]))
    R = I / xp.maximum(S0, shading_floor * s_med)
    lum = R.mean(-1)
    r_med = float(xp.median(lum[ref]))
    trust = dm & (S >= shading_floor * s_med) & (lum <= clip * r_med)
    if int(trust.sum()) < 16:
        trust = dm
    tf = trust.astype(xp.float64)
    c_s = nd.gaussian_filter(tf, sigma, mode="nearest")
    c_l = nd.gaussian_filter(tf, 4.0 * sigma, mode="nearest")
    a_l = _masked_gauss(R, trust, 4.0 * sigma, xp)
    fallback = xp.median(R[trust], axis=0)
    a_l = xp.where((c_l > 1e-3)[..., None], a_l, fallback)
    mix = xp.clip(c_s / 0.3, 0.0, 1.0)[..., None]
    cap = clip * r_med

    def finish(a_s):
        a = mix * a_s + (1.0 - mix) * a_l
        return a * xp.minimum(1.0, cap / xp.maximum(a.mean(-1), 1e-12))[..., None]

    a_g = _masked_gauss(R, trust, sigma, xp)
    smooth = finish(a_g)
    if not eps > 0:
        return smooth, trust, smooth
    a_e = xp.where(trust[..., None], _guided_log(R, trust, sigma, eps, xp), a_g)
    return finish(a_e), trust, smooth


_HF_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]) / 6.0  # unit-gain on white noise


def _robust_stage(I, d_in, m, dm, reg, o: FineOptions, xp, timings):
    """The robust method (see :class:`FineOptions`): returns depth, albedo, sh, pixel weights, info."""
    nd = ndimage_module(xp)
    t = time.perf_counter()
    face = float(np.sqrt(float(m.sum())))
    n0 = _depth_normals(d_in, m)
    skin = dm & ((reg == REGIONS["skin"]) if bool((reg == REGIONS["skin"]).any()) else (reg > 0))
    if int(skin.sum()) < 16:
        skin = dm
    sh = band_light(I, n0, skin, o.light_scale * face)
    S0 = xp.maximum(shade(n0, sh), 1e-3)
    albedo, trust, albedo_band = _ratio_albedo(I, S0, dm, skin, o.albedo_scale * face, o.shading_floor,
                                               o.albedo_clip, xp, eps=o.albedo_eps)
    timings["light_albedo"] = time.perf_counter() - t
    t = time.perf_counter()
    # noise- and texture-aware weights (discrepancy of the residual the smooth model leaves)
    res = xp.where(dm, (I - albedo * S0).mean(-1), 0.0)
    K = xp.asarray(_HF_KERNEL)
    hf = nd.convolve(res, K, mode="nearest")
    inner = xp.asarray(nd.binary_erosion(dm, iterations=2)) if int(dm.sum()) > 64 else dm
    e = xp.sqrt(xp.maximum(_masked_gauss(hf * hf, inner, o.noise_window, xp), 0.0))
    ref = skin & inner if bool((skin & inner).any()) else dm
    sigma_n = max(float(xp.quantile(e[ref], o.noise_quantile)), o.noise_floor)
    # texture: high-frequency energy of the chromaticity (white light shades all channels alike, so
    # shading detail leaves the chromaticity unchanged; pigment, hair and frames change it)
    chrom = I / xp.maximum(I.sum(-1, keepdims=True), 1e-6)
    hc = sum(nd.convolve(xp.where(dm, chrom[..., c], 0.0), K, mode="nearest") ** 2 for c in range(3))
    ec = xp.sqrt(xp.maximum(_masked_gauss(hc, inner, o.noise_window, xp), 0.0))
    sigma_c = max(float(xp.quantile(ec[ref], o.noise_quantile)), o.noise_floor / 3.0)
    weight = (sigma_c / xp.maximum(ec, sigma_c)) ** o.texture_power
    if o.residual_texture:  # and where the residual itself is far above the noise level
        weight = weight * (sigma_n / xp.maximum(e, sigma_n)) ** o.texture_power
    lum = I.mean(-1)
    lref = float(xp.median(lum[ref]))
    weight = weight * xp.clip((lum / max(lref, 1e-6) - o.dark) / 0.2, 0.0, 1.0)
    if bool((reg > REGIONS["skin"]).any()):  # eyes, brows, mouth interior from landmarks; lips kept
        weight = weight * ((reg <= REGIONS["skin"]) | (reg == REGIONS["lips"]))
    if o.band_scale > 0:  # mid-band texture: local band energy of the log residual above what shading detail gives
        b = o.band_scale * face
        lres = xp.where(dm, xp.log(xp.maximum(I.mean(-1), 1e-4)) - xp.log(xp.maximum((albedo_band * S0).mean(-1), 1e-4)), 0.0)
        dog = _masked_gauss(lres, dm, 0.5 * b, xp) - _masked_gauss(lres, dm, 2.0 * b, xp)
        eb = xp.sqrt(xp.maximum(_masked_gauss(xp.where(dm, dog, 0.0) ** 2, inner, 2.0 * b, xp), 0.0))
        weight = weight * (o.band_level / xp.maximum(eb, o.band_level)) ** o.band_power
    weight = xp.where(dm & trust, weight, 0.0)  # pixels whose albedo was not measurable: no data term
    w = o.kappa / sigma_n ** 2
    l1 = o.pin * w * float((I[dm] ** 2).mean()) + 1e-6
    timings["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    dopt = DepthOptions(lam=(l1, o.smoothness, 0.0, 0.0), iterations=o.robust_iterations, tol=1e-3, data_weight=w,
                        pcg_tol=o.cg_tol, pcg_maxiter=o.cg_maxiter, laplacian_on_displacement=True,
                        linear_solver="jacobi" if o.inexact_depth else "factor")
    d, info = solve_depth(I, d_in, m, albedo, sh, None, depth0=d_in, options=dopt, data_mask=dm, pixel_weight=weight,
                          return_info=True)
    timings["depth"] = time.perf_counter() - t
    t = time.perf_counter()
    dd = xp.where(m, d - d_in, 0.0)
    if o.curvature_quantile > 0:
        lap = nd.laplace(xp.where(m, d_in, 0.0), mode="nearest")
        inner3 = xp.asarray(nd.binary_erosion(m, iterations=3)) if int(m.sum()) > 64 else m
        cv = xp.sqrt(xp.maximum(_masked_gauss(xp.where(m, lap, 0.0) ** 2, inner3, 2.0, xp), 0.0))
        c_ref = float(xp.quantile(cv[inner3], o.curvature_quantile)) if bool(inner3.any()) else 0.0
        gate = xp.clip(cv / c_ref, 0.0, 1.0) if c_ref > 0 else xp.zeros_like(cv)
        dd = dd * gate
    d = xp.where(m, d_in + dd, d_in)
    timings["gate"] = time.perf_counter() - t
    stats = {"factorizations": info.factorizations, "pcg_iterations": info.pcg_iterations,
             "noise_sigma": sigma_n, "data_weight": w, "pin": l1}
    return d, albedo, sh, weight, info.energies, stats


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------

@dataclass
class FineResult:
    """Output of :func:`fine_stage`.

    Attributes
    ----------
    depth : (H, W) refined depth.
    normals : (H, W, 3) unit normals of ``depth`` (geomfit's frame).
    albedo : (H, W, 3) albedo ``gamma``.
    sh : (9, 3) (or (9,) when ``shared_light``) SH irradiance coefficients (geomfit's convention).
    specular : (H, W, 3) specular ``beta``.
    regions : (H, W) int region labels used for ``gamma_avg``.
    albedo_avg : (H, W, 3) ``gamma_avg``.
    energy : dict phase name -> list of Eq. 9 energies (initial, then after each depth step).
    timings : dict step -> seconds.
    data_mask : (H, W) bool, the mask pixels used in data terms (saturated/black pixels excluded).
    """
    depth: object
    normals: object
    albedo: object
    sh: object
    specular: object
    regions: object
    albedo_avg: object
    energy: Dict[str, List[float]]
    timings: Dict[str, float]
    data_mask: object
    depth_stats: Dict[str, int] = field(default_factory=dict)
    confidence: object = None
    method: str = "paper"


def fine_stage(image, depth, mask, landmarks=None, regions=None, albedo=None, options=None, **legacy):
    """The fine stage: lighting, albedo and shape from shading on a depth map.

    Two methods (``options.method``, :class:`FineOptions`):

    ``"robust"`` (default; geomfit's method for real photos, docs/fine.md "The robust method"):

    1. a first-order light from the band-pass correlation of the log image with the input normals
       (:func:`band_light`), the albedo = the guided-filter low-pass of the ratio ``I / S`` (He, Sun
       & Tang, "Guided image filtering", ECCV 2010): albedo edges stronger than shading detail stay;
    2. a noise-aware data weight ``kappa / sigma_n^2`` with ``sigma_n`` the noise floor of the
       residual's high-pass energy, and per-pixel weights that fall as ``(sigma_n / e)^p`` where the
       local residual energy ``e`` says texture, as ``(band_level / e_b)^p`` where the mid band of the
       log residual carries more than skin shading detail does, and vanish on dark (hair, frames) and
       non-skin landmark regions (eyes, brows, mouth interior);
    3. a Levenberg-Marquardt depth solve of the weighted shading term plus ``pin ||d - d0||^2 +
       smoothness ||L (d - d0)||^2`` (a bounded displacement, low frequencies pinned to the input);
    4. optionally (``curvature_quantile > 0``; off by default) the displacement is kept in proportion
       to the input's local curvature (detail is missing where the blurred input bends).

    ``"paper"`` (Jin et al. 2021, Sec. 3.4 and 4.1, with geomfit's solvers):

    1. ``gamma_avg`` per region (mean image colour; regions from ``regions``, else from
       ``landmarks`` with :func:`landmark_regions`, else the mask as one skin region); the albedo
       starts at ``gamma_avg`` (or ``albedo``).
    2. SH lighting by least squares with the specular off (Eqs. 4-5, epsilon = 0), then the albedo
       with skin-colour and RTV terms (Eq. 6); repeated ``init_rounds`` times.
    3. ``beta_0`` = the residual ``max(I - gamma S, 0)``.
    4. For each phase of depth weights (default the paper's two: :data:`PHASE1`, :data:`PHASE2`),
       ``outer_iterations`` rounds of: specular (Eq. 8, epsilon = 1), depth (Eq. 9,
       ``depth_iterations`` Levenberg-Marquardt steps, ``d0`` = the input depth), albedo (Eq. 6).

    Parameters
    ----------
    image : array (H, W, 3)
        Linear RGB in [0, 1] (see :func:`prepare_image` for uint8, grey and RGBA input).
    depth : array (H, W)
        Depth rendered from the medium mesh: orthographic, pixel units, larger = closer. Must be
        finite inside the mask.
    mask : bool array (H, W)
        Face pixels (at least ``min_pixels``).
    landmarks : array (68, 2), optional
        iBUG landmarks ``(x, y)``, used for the regions of the skin-colour term.
    regions : int array (H, W), optional
        Region labels (> 0) overriding ``landmarks``.
    albedo : array (H, W, 3) or (3,), optional
        Initial albedo of the paper method (e.g. the 3DMM mean texture rendered); default ``gamma_avg``.
    options : FineOptions or dict, optional
        The method and its settings (default ``FineOptions()``, the robust method).
    **legacy
        The keyword arguments of earlier releases (below), accepted for one release with a
        ``DeprecationWarning``; they select the paper method unless ``options`` is given.
    phases : sequence of 4-tuples
        ``(lambda_d1, lambda_d2, lambda_d3, lambda_d4)`` per depth phase.
    lam_skin, lam_rtv, lam_spec : float
        ``lambda_gamma1``, ``lambda_gamma2``, ``lambda_beta`` (paper: 0.3, 2.5, 0.5).
    specular : bool
        epsilon = 1 during the depth phases (paper) or 0.
    shared_light : bool
        One set of SH coefficients for all channels.
    init_rounds : int
        Lighting / albedo alternations of the initialisation.
    outer_iterations, depth_iterations : int
        Rounds of (specular, depth, albedo) per phase, and Levenberg-Marquardt steps per depth solve.
    rtv_iterations : int
        IRLS steps of the first albedo solve (later solves take one warm-started step each).
    saturation : float
        Pixels with a channel >= ``saturation`` or all channels <= 1e-4 are left out of the data
        terms (documented fallback for clipped highlights and black pixels).
    min_pixels : int
        Smallest accepted mask.
    data_weight : float
        Weight of the data terms of Eqs. 6 and 9 (default :data:`DATA_WEIGHT` = 255^2: the paper's
        lambdas act as if intensities were 8-bit; with 1 they over-smooth, see docs/fine.md).
    gradient_scale : float
        Scale of the grey image in Eq. 9's gradient term.
    albedo_data_weight : float, optional
        Override ``data_weight`` in Eq. 6 only.
    inexact_depth : bool
        Let the depth solves take truncated PCG steps preconditioned by an earlier factor
        (:func:`solve_depth`; one symbolic analysis and a few numeric factorisations for the whole
        stage). False: every Levenberg-Marquardt step is an exact solve (as on the GPU without
        cholespy, so CPU and GPU results agree to solver tolerance).

    Returns
    -------
    FineResult

    Raises
    ------
    ValueError, TypeError
        Bad image/depth/mask (shape, dtype, range, NaN in the depth inside the mask, too few mask
        pixels), an image black or saturated over (almost) the whole mask.

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern
    Recognition Letters 2021, Sec. 3.4 (Eqs. 4-9) and 4.1 (hyper-parameters).
    """
    o = _resolve_options(options, legacy)
    (phases, lam_skin, lam_rtv, lam_spec, specular, shared_light, init_rounds, outer_iterations, depth_iterations,
     rtv_iterations, saturation, min_pixels, data_weight, gradient_scale, albedo_data_weight, inexact_depth) = (
        getattr(o, k) for k in _LEGACY_STAGE_KEYS)
    timings: Dict[str, float] = {}
    t_all = time.perf_counter()
    xp = get_array_module(image, depth, mask)
    I = prepare_image(image, xp)
    H, W, _ = I.shape
    m = _prepare_mask(mask, (H, W), xp, min_pixels=min_pixels)
    d_in = _prepare_depth(depth, m, xp)
    sat = (I >= saturation).any(-1) | (I <= 1e-4).all(-1)
    dm = m & ~sat
    if int(dm.sum()) < max(min_pixels, int(0.1 * int(m.sum()))):
        raise ValueError(f"the image is black or saturated over {100 * float(1 - dm.sum() / m.sum()):.0f} % "
                         "of the mask: no shading to recover the shape from")
    if int(interior_mask(asnumpy(dm)).sum()) < 9:
        raise ValueError("the mask has too few interior pixels for shape from shading")
    if regions is not None:
        reg = xp.asarray(regions)
        if reg.shape != (H, W):
            raise ValueError(f"regions must have shape {(H, W)}, got {reg.shape}")
        reg = xp.where(m, reg.astype(xp.int64), 0)
        if not bool((reg > 0).any()):
            raise ValueError("regions has no positive label inside the mask")
    elif landmarks is not None:
        reg = xp.asarray(landmark_regions(landmarks, (H, W), asnumpy(m)))
    else:
        reg = m.astype(xp.int64)
    reg_np = asnumpy(reg)
    if o.method == "robust":
        d, gamma, sh, weight, hist, stats = _robust_stage(I, d_in, m, dm, reg, o, xp, timings)
        timings["total"] = time.perf_counter() - t_all
        if not bool(xp.isfinite(d[m]).all()) or not bool(xp.isfinite(gamma).all()):
            raise FloatingPointError("fine_stage produced non-finite values (please report this input)")
        return FineResult(depth=d, normals=_depth_normals(d, m), albedo=gamma, sh=sh, specular=xp.zeros_like(I),
                          regions=reg_np, albedo_avg=gamma, energy={"robust": hist}, timings=timings, data_mask=dm,
                          depth_stats=stats, confidence=weight, method="robust")
    avg = region_mean_albedo(I, xp.where(dm, reg, 0) if bool(((reg > 0) & dm).any()) else reg, None)
    if albedo is None:
        gamma = avg.copy()
    else:
        gamma = xp.ascontiguousarray(_as_hwc(albedo, H, W, 3, xp, "albedo")).copy()

    # 1-2: lighting and albedo (epsilon = 0)
    t = time.perf_counter()
    n = _depth_normals(d_in, m)
    Y = sh_basis(n)
    sh = fit_sh_lighting(I, n, gamma, dm, shared=shared_light)
    for k in range(int(init_rounds)):
        S = Y @ sh
        gamma = solve_albedo(I, S, None, dm, avg, lam_skin, lam_rtv, iterations=rtv_iterations if k == 0 else 1,
                             albedo0=None if k == 0 else gamma,
                             data_weight=albedo_data_weight or data_weight)
        sh = fit_sh_lighting(I, n, gamma, dm, shared=shared_light)
    S = _as_hwc(Y @ sh, H, W, 3, xp, "shading")
    timings["light_albedo"] = time.perf_counter() - t

    # 3: specular prior
    beta0 = xp.maximum(I - gamma * S, 0.0) * dm[..., None]
    beta = xp.zeros_like(I)

    # 4: depth phases
    d = d_in
    energy: Dict[str, List[float]] = {}
    factor = None  # one factor object for all depth solves: symbolic analysis once, PCG preconditioner
    stats = {"factorizations": 0, "pcg_iterations": 0}
    for k, lam in enumerate(phases):
        name = f"phase{k + 1}"
        hist: List[float] = []
        t = time.perf_counter()
        for _ in range(int(outer_iterations)):
            if specular:
                beta = solve_specular(I, gamma * S, beta0, dm, lam_spec)
            dopt = DepthOptions(lam=lam, iterations=depth_iterations, data_weight=data_weight,
                                gradient_scale=gradient_scale, reuse_factor=bool(hist),
                                pcg_maxiter=20 if inexact_depth else 0)
            d, info = solve_depth(I, d, m, gamma, sh, beta, depth0=d_in, options=dopt, data_mask=dm, factor=factor,
                                  return_info=True)
            factor = info.factor
            stats["factorizations"] += info.factorizations
            stats["pcg_iterations"] += info.pcg_iterations
            hist.extend(info.energies if not hist else info.energies[1:])
            n = _depth_normals(d, m)
            S = _as_hwc(shade(n, sh), H, W, 3, xp, "shading")
            gamma = solve_albedo(I, S, beta, dm, avg, lam_skin, lam_rtv, iterations=1,
                                 albedo0=gamma, data_weight=albedo_data_weight or data_weight)
        energy[name] = hist
        timings[name] = time.perf_counter() - t
    if specular:
        beta = solve_specular(I, gamma * S, beta0, dm, lam_spec)
    timings["total"] = time.perf_counter() - t_all
    for name, arr in (("depth", d[m]), ("albedo", gamma), ("specular", beta)):
        if not bool(xp.isfinite(arr).all()):
            raise FloatingPointError(f"fine_stage produced non-finite {name} (please report this input)")
    return FineResult(depth=d, normals=_depth_normals(d, m), albedo=gamma, sh=sh, specular=beta,
                      regions=reg_np, albedo_avg=avg, energy=energy, timings=timings, data_mask=dm,
                      depth_stats=stats, method="paper")


# ----------------------------------------------------------------------------------------------
# Synthetic scene (moved)
# ----------------------------------------------------------------------------------------------

def synthetic_scene(*args, **kwargs):
    """Deprecated alias of :func:`geomfit.scenes.synthetic_scene` (moved there; this alias goes in
    the next release)."""
    import warnings

    from .scenes import synthetic_scene as _scene

    warnings.warn("geomfit.fine.synthetic_scene moved to geomfit.scenes.synthetic_scene",
                  DeprecationWarning, stacklevel=2)
    return _scene(*args, **kwargs)
