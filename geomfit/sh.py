"""Second-order spherical-harmonics (SH) Lambertian shading: basis, least-squares lighting, conversions.

Convention (geomfit's, used everywhere in the library)
-----------------------------------------------------
Normals are unit vectors in the camera frame: x right, y up, z towards the camera (the frame of
:func:`geomfit.fine.depth_normals`). The nine basis functions are Ramamoorthi & Hanrahan's
(2001) real spherical harmonics **without** the Lambertian convolution factors, in this order::

    k  (l, m)   Y_k(n)
    0  (0, 0)   0.282095
    1  (1,-1)   0.488603 y
    2  (1, 0)   0.488603 z
    3  (1, 1)   0.488603 x
    4  (2,-2)   1.092548 x y
    5  (2,-1)   1.092548 y z
    6  (2, 0)   0.315392 (3 z^2 - 1)
    7  (2, 1)   1.092548 x z
    8  (2, 2)   0.546274 (x^2 - y^2)

Shading is ``S(n) = sum_k sh[k] * Y_k(n)`` (Jin et al. 2021, Eq. 5), so geomfit's coefficients ``sh`` are
**irradiance** coefficients: they already contain the convolution factors. Radiance (environment
map) coefficients ``L_lm`` convert with :func:`radiance_to_irradiance`, which multiplies by
``A_0 = pi``, ``A_1 = 2 pi / 3``, ``A_2 = pi / 4``. Coefficient arrays are ``(9,)`` (grey) or
``(9, C)`` (one column per colour channel).

Deep3DFaceRecon (Deng et al. 2019) and DECA (Feng et al. 2021) span the same nine functions with
other constants, signs and orders (DECA also omits a pi in the constant term; Deep3DFaceRecon adds
0.8 to its constant coefficient). :func:`from_deep3d`, :func:`to_deep3d`, :func:`from_deca` and
:func:`to_deca` convert exactly; the shading agrees to round-off, the coefficients do not.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module

__all__ = [
    "SH_CONSTANTS",
    "sh_basis",
    "shade",
    "fit_sh_lighting",
    "radiance_to_irradiance",
    "irradiance_to_radiance",
    "deep3d_basis",
    "deca_basis",
    "sh_from_basis",
    "sh_to_basis",
    "from_deep3d",
    "to_deep3d",
    "from_deca",
    "to_deca",
]

_C0 = 0.5 * np.sqrt(1.0 / np.pi)            # 0.282095
_C1 = np.sqrt(3.0 / (4.0 * np.pi))          # 0.488603
_C2 = 0.5 * np.sqrt(15.0 / np.pi)           # 1.092548
_C3 = 0.25 * np.sqrt(5.0 / np.pi)           # 0.315392
_C4 = 0.25 * np.sqrt(15.0 / np.pi)          # 0.546274
#: The constants of the nine basis functions, in geomfit's order.
SH_CONSTANTS = np.array([_C0, _C1, _C1, _C1, _C2, _C2, _C3, _C2, _C4])
_BAND = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
_A = np.array([np.pi, 2.0 * np.pi / 3.0, np.pi / 4.0])  # Lambertian convolution factors per band


def _check_normals(normals, name="normals"):
    xp = get_array_module(normals)
    if not hasattr(normals, "shape") or normals.ndim < 1 or normals.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., 3), got {getattr(normals, 'shape', type(normals))}")
    return xp


def sh_basis(normals):
    """The nine second-order real SH basis functions at unit normals (geomfit's convention).

    Parameters
    ----------
    normals : array (..., 3)
        Unit normals ``(x, y, z)`` in the camera frame (x right, y up, z towards the camera).
        NumPy or CuPy.

    Returns
    -------
    Y : array (..., 9)
        ``Y_k(n)`` with Ramamoorthi & Hanrahan's constants (0.282095, 0.488603, 1.092548,
        0.315392, 0.546274) and **without** the Lambertian factors pi, 2 pi/3, pi/4: shading is
        ``Y @ sh`` with irradiance coefficients ``sh`` (see the module docstring for the order).

    Notes
    -----
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition
    Letters 2021, Eq. 5: ``S(n) = sum_k r_k Y_k(n)``.

    References
    ----------
    R. Ramamoorthi, P. Hanrahan, "An efficient representation for irradiance environment maps",
    SIGGRAPH 2001.
    """
    xp = _check_normals(normals)
    return xp.moveaxis(_sh_basis_rows(normals[..., 0], normals[..., 1], normals[..., 2]), 0, -1)


def _sh_basis_rows(x, y, z):
    """The basis as a contiguous (9, ...) array (row k = Y_k): the fast layout for normal equations."""
    xp = get_array_module(x)
    dt = x.dtype if x.dtype in (xp.float32, xp.float64) else xp.float64
    out = xp.empty((9,) + x.shape, dtype=dt)
    out[0] = _C0
    xp.multiply(y, _C1, out=out[1])
    xp.multiply(z, _C1, out=out[2])
    xp.multiply(x, _C1, out=out[3])
    xp.multiply(x * y, _C2, out=out[4])
    xp.multiply(y * z, _C2, out=out[5])
    xp.multiply(z * z, 3.0 * _C3, out=out[6])
    out[6] -= _C3
    xp.multiply(x * z, _C2, out=out[7])
    xp.multiply(x * x - y * y, _C4, out=out[8])
    return out


def _sh_basis_grad(normals):
    """d Y_k / d n as an array (..., 9, 3) (the polynomial gradient; project onto the tangent plane)."""
    xp = get_array_module(normals)
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    g = xp.zeros(normals.shape[:-1] + (9, 3), dtype=normals.dtype)
    g[..., 1, 1] = _C1
    g[..., 2, 2] = _C1
    g[..., 3, 0] = _C1
    g[..., 4, 0] = _C2 * y
    g[..., 4, 1] = _C2 * x
    g[..., 5, 1] = _C2 * z
    g[..., 5, 2] = _C2 * y
    g[..., 6, 2] = 6.0 * _C3 * z
    g[..., 7, 0] = _C2 * z
    g[..., 7, 2] = _C2 * x
    g[..., 8, 0] = 2.0 * _C4 * x
    g[..., 8, 1] = -2.0 * _C4 * y
    return g


def _check_sh(sh, xp):
    sh = xp.asarray(sh, dtype=xp.float64)
    if sh.ndim not in (1, 2) or sh.shape[0] != 9:
        raise ValueError(f"sh must have shape (9,) or (9, C), got {sh.shape}")
    if not bool(xp.all(xp.isfinite(sh))):
        raise ValueError("sh contains NaN or inf")
    return sh


def shade(normals, sh):
    """Lambertian SH shading ``S(n) = Y(n) @ sh`` (Jin et al. 2021, Eq. 5).

    Parameters
    ----------
    normals : array (..., 3)
        Unit normals (geomfit's frame).
    sh : array (9,) or (9, C)
        Irradiance coefficients in geomfit's convention.

    Returns
    -------
    S : array (...) for ``sh`` (9,), or (..., C) for ``sh`` (9, C).
    """
    xp = _check_normals(normals)
    sh = _check_sh(sh, xp)
    return sh_basis(normals) @ sh


def radiance_to_irradiance(L):
    """Multiply radiance SH coefficients ``L_lm`` (geomfit's order) by ``A_l = (pi, 2pi/3, pi/4)``."""
    xp = get_array_module(L)
    L = xp.asarray(L, dtype=xp.float64)
    a = xp.asarray(_A[_BAND])
    return L * (a if L.ndim == 1 else a[:, None])


def irradiance_to_radiance(E):
    """Inverse of :func:`radiance_to_irradiance`."""
    xp = get_array_module(E)
    E = xp.asarray(E, dtype=xp.float64)
    a = xp.asarray(_A[_BAND])
    return E / (a if E.ndim == 1 else a[:, None])


# ----------------------------------------------------------------------------------------------
# Other projects' conventions
# ----------------------------------------------------------------------------------------------

def deep3d_basis(normals):
    """Deep3DFaceRecon's (Deng et al. 2019) nine SH functions, in its order and with its constants.

    ``a = (pi, 2pi/sqrt(3), 2pi/sqrt(8))``, ``c = (1/sqrt(4pi), sqrt(3)/sqrt(4pi), 3 sqrt(5)/sqrt(12pi))``;
    functions ``a0 c0, -a1 c1 y, a1 c1 z, -a1 c1 x, a2 c2 x y, -a2 c2 y z, a2 c2 / (2 sqrt 3) (3z^2-1),
    -a2 c2 x z, a2 c2 / 2 (x^2 - y^2)`` (same camera frame as geomfit's).
    """
    xp = _check_normals(normals)
    a = (np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0))
    c = (1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi))
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return xp.stack([
        a[0] * c[0] * xp.ones_like(x),
        -a[1] * c[1] * y,
        a[1] * c[1] * z,
        -a[1] * c[1] * x,
        a[2] * c[2] * x * y,
        -a[2] * c[2] * y * z,
        0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * z * z - 1),
        -a[2] * c[2] * x * z,
        0.5 * a[2] * c[2] * (x * x - y * y),
    ], axis=-1)


def deca_basis(normals):
    """DECA's (Feng et al. 2021) nine SH functions, in its order and with its constants.

    Order ``1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1`` times ``1/sqrt(4pi)`` (no pi: DECA omits the
    Lambertian factor of the constant term), ``(2pi/3) sqrt(3/(4pi))`` (x3),
    ``(pi/4) 3 sqrt(5/(12pi))`` (x3), ``(pi/4)(3/2) sqrt(5/(12pi))``, ``(pi/4)(1/2) sqrt(5/(4pi))``.
    """
    xp = _check_normals(normals)
    pi = np.pi
    f = (1 / np.sqrt(4 * pi), (2 * pi / 3) * np.sqrt(3 / (4 * pi)), (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
         (pi / 4) * 1.5 * np.sqrt(5 / (12 * pi)), (pi / 4) * 0.5 * np.sqrt(5 / (4 * pi)))
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return xp.stack([
        f[0] * xp.ones_like(x), f[1] * x, f[1] * y, f[1] * z,
        f[2] * x * y, f[2] * x * z, f[2] * y * z, f[3] * (x * x - y * y), f[4] * (3 * z * z - 1),
    ], axis=-1)


def _conversion_matrix(basis):
    """M (9 x 9) with ``basis(n) = sh_basis(n) @ M`` exactly (both span the same 9 polynomials).

    Solved by least squares on a fixed set of directions (exact up to round-off)."""
    rng = np.random.default_rng(0)
    n = rng.normal(size=(64, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    M, *_ = np.linalg.lstsq(sh_basis(n), basis(n), rcond=None)
    return M


def sh_from_basis(coeffs, basis):
    """Convert coefficients of another 9-function SH basis to geomfit's convention.

    ``shade(n, sh_from_basis(c, basis)) == basis(n) @ c`` for every unit normal ``n``.

    Parameters
    ----------
    coeffs : array (9,) or (9, C)
    basis : callable, normals (..., 3) -> (..., 9)
        The other project's basis functions in geomfit's normal frame (flip axes inside it if the
        other project's frame differs).
    """
    xp = get_array_module(coeffs)
    coeffs = _check_sh(coeffs, xp)
    M = xp.asarray(_conversion_matrix(basis))
    return M @ coeffs


def sh_to_basis(sh, basis):
    """Inverse of :func:`sh_from_basis`: geomfit's coefficients expressed in another basis."""
    xp = get_array_module(sh)
    sh = _check_sh(sh, xp)
    M = xp.asarray(np.linalg.inv(_conversion_matrix(basis)))
    return M @ sh


def _as_9c(gamma, xp, name):
    g = xp.asarray(gamma, dtype=xp.float64)
    if g.shape == (27,):
        return g.reshape(3, 9).T  # Deep3D stores (3, 9) flattened: channel-major
    if g.shape == (3, 9):
        return g.T
    if g.shape in ((9,), (9, 3)):
        return g
    raise ValueError(f"{name}: coefficients must have shape (27,), (3, 9), (9, 3) or (9,), got {g.shape}")


def from_deep3d(gamma, add_init_lit=True):
    """Deep3DFaceRecon lighting ``gamma`` -> geomfit irradiance coefficients (9, 3).

    Parameters
    ----------
    gamma : array (27,) (as predicted: reshaped (3, 9), channel-major), (3, 9) or (9, 3)
    add_init_lit : bool
        Deep3DFaceRecon adds 0.8 to each channel's constant coefficient before shading; do the same.
    """
    xp = get_array_module(gamma)
    g = _as_9c(gamma, xp, "from_deep3d")
    if add_init_lit:
        g = g.copy()
        g[0] = g[0] + 0.8
    return sh_from_basis(g, deep3d_basis)


def to_deep3d(sh, subtract_init_lit=True):
    """geomfit coefficients (9, C) -> Deep3DFaceRecon ``gamma`` as (C, 9) (flatten for its 27-vector)."""
    xp = get_array_module(sh)
    g = sh_to_basis(sh, deep3d_basis)
    if subtract_init_lit:
        g = g.copy()
        g[0] = g[0] - 0.8
    return g.T


def from_deca(sh_coeff):
    """DECA ``sh_coeff`` (9, 3) -> geomfit irradiance coefficients (9, 3)."""
    return sh_from_basis(sh_coeff, deca_basis)


def to_deca(sh):
    """geomfit coefficients (9, C) -> DECA ``sh_coeff`` (9, C)."""
    return sh_to_basis(sh, deca_basis)


# ----------------------------------------------------------------------------------------------
# Least squares lighting
# ----------------------------------------------------------------------------------------------

def fit_sh_lighting(image, normals, albedo, mask, shared=False, specular=None):
    """Least-squares SH lighting for a Lambertian image (Jin et al. 2021, Eqs. 4-5 with epsilon = 0).

    Minimises ``sum_{p in mask} sum_c (albedo_c(p) * Y(n_p) @ sh_c + specular_c(p) - I_c(p))^2``
    over ``sh``. The 9 x 9 normal equations are formed with one matrix product per channel
    (``(a Y)^T (a Y)``), so 1 megapixel takes tens of milliseconds.

    Parameters
    ----------
    image : array (H, W, C) or (H, W)
        Linear intensities.
    normals : array (H, W, 3)
        Unit normals (geomfit's frame).
    albedo : array (H, W, C), (H, W), (C,) or scalar
        Albedo (broadcast against ``image``).
    mask : bool array (H, W)
        Pixels used.
    shared : bool
        One coefficient vector for all channels (``(9,)`` result) instead of one per channel.
    specular : array like ``image``, optional
        Additive term subtracted from the image first (Eq. 4's ``epsilon beta``).

    Returns
    -------
    sh : array (9, C) or (9,) (``shared=True`` or a 2-D image)

    Raises
    ------
    ValueError
        Mismatched shapes, fewer than 9 usable pixels, NaN/inf in the inputs, or a rank-deficient
        system (e.g. all normals equal or zero albedo).

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition Letters 2021,
    Sec. 3.4, Eqs. 4-5.
    """
    xp = get_array_module(image, normals, albedo, mask)
    image = xp.asarray(image, dtype=xp.float64)
    grey = image.ndim == 2
    if grey:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    H, W, C = image.shape
    normals = xp.asarray(normals, dtype=xp.float64)
    if normals.shape != (H, W, 3):
        raise ValueError(f"normals must have shape {(H, W, 3)}, got {normals.shape}")
    mask = xp.asarray(mask)
    if mask.shape != (H, W):
        raise ValueError(f"mask must have shape {(H, W)}, got {mask.shape}")
    albedo = xp.asarray(albedo, dtype=xp.float64)
    if albedo.ndim == 2 and albedo.shape == (H, W):
        albedo = albedo[..., None]
    try:
        albedo = xp.broadcast_to(albedo, (H, W, C))
    except ValueError:
        raise ValueError(f"albedo of shape {albedo.shape} does not broadcast to the image {(H, W, C)}") from None
    m = mask.astype(bool)
    npix = int(m.sum())
    if npix < 9:
        raise ValueError(f"fit_sh_lighting: mask has {npix} pixels, at least 9 are needed")
    I = image
    if specular is not None:
        spec = xp.asarray(specular, dtype=xp.float64)
        if spec.ndim == 2:
            spec = spec[..., None]
        I = I - xp.broadcast_to(spec, (H, W, C))
    dense = npix >= 0.5 * H * W and bool(xp.isfinite(I.sum() + albedo.sum() + normals.sum()))
    if dense:  # weight by the mask instead of copying the pixels out
        I = I.reshape(-1, C)
        a = albedo.reshape(-1, C)
        mw = m.reshape(-1)
        x, y, z = (normals[..., k].reshape(-1) for k in range(3))
    else:  # gather the pixels
        I = I[m]
        a = albedo[m]
        mw = None
        x, y, z = (normals[..., k][m] for k in range(3))
        if not bool(xp.isfinite(I.sum() + a.sum() + x.sum() + y.sum() + z.sum())):
            raise ValueError("fit_sh_lighting: NaN or inf in image, albedo or normals inside the mask")
    AtA = xp.zeros((C, 9, 9))
    Atb = xp.zeros((C, 9))
    N = x.shape[0]
    chunk = 1 << 15  # blocks that stay in cache: the normal equations are memory-bound otherwise
    aY = xp.empty((9, chunk))
    for s0 in range(0, N, chunk):  # blocks of pixels, channels: not pixels
        s1 = min(N, s0 + chunk)
        Yt = _sh_basis_rows(x[s0:s1], y[s0:s1], z[s0:s1])
        buf = aY[:, :s1 - s0]
        for c in range(C):
            w = a[s0:s1, c] if mw is None else a[s0:s1, c] * mw[s0:s1]
            xp.multiply(Yt, w, out=buf)
            AtA[c] += buf @ buf.T
            Atb[c] += buf @ I[s0:s1, c]
    if shared or grey:
        AtA = AtA.sum(0, keepdims=True)
        Atb = Atb.sum(0, keepdims=True)
    sol = []
    for c in range(AtA.shape[0]):
        M = AtA[c]
        ev = xp.linalg.eigvalsh(M)
        if not float(ev[-1]) > 0 or float(ev[0]) < 1e-12 * float(ev[-1]):
            raise ValueError("fit_sh_lighting: the lighting is not determined (normals cover too few "
                             "directions or the albedo is zero inside the mask)")
        sol.append(xp.linalg.solve(M, Atb[c]))
    sh = xp.stack(sol, axis=1)
    return sh[:, 0] if sh.shape[1] == 1 else sh
