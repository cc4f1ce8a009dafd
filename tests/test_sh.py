"""Spherical-harmonics basis, lighting least squares and convention conversions (geomfit.sh)."""
import numpy as np
import pytest
from scipy.special import sph_harm_y

from geomfit.sh import (deca_basis, deep3d_basis, fit_sh_lighting, from_deca, from_deep3d, irradiance_to_radiance,
                        radiance_to_irradiance, sh_basis, shade, to_deca, to_deep3d)


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sphere(size=48):
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    c = (size - 1) / 2
    x, y = (xx - c) / (0.48 * size), -(yy - c) / (0.48 * size)
    r2 = x * x + y * y
    mask = r2 < 1
    z = np.sqrt(np.clip(1 - r2, 0, None))
    n = np.stack([x, y, z], -1)
    n[~mask] = (0, 0, 1)
    return n, mask


def _real_sh_scipy(l, m, n):
    """Real SH from SciPy's complex ones (Condon-Shortley phase), the textbook definition."""
    theta = np.arccos(np.clip(n[:, 2], -1, 1))
    phi = np.arctan2(n[:, 1], n[:, 0])
    Y = sph_harm_y(l, abs(m), theta, phi)
    if m > 0:
        return np.sqrt(2) * (-1) ** m * Y.real
    if m < 0:
        return np.sqrt(2) * (-1) ** m * Y.imag
    return Y.real


def test_basis_matches_textbook_real_sh():
    n = _unit(np.random.default_rng(0), 200)
    Y = sh_basis(n)
    order = [(0, 0), (1, -1), (1, 0), (1, 1), (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]
    for k, (l, m) in enumerate(order):
        np.testing.assert_allclose(Y[:, k], _real_sh_scipy(l, m, n), atol=1e-12, err_msg=f"Y_{l}{m}")


def test_lambertian_factors_exact_for_band_limited_radiance():
    # constant radiance 1 -> irradiance pi; radiance = omega_z -> irradiance 2 pi / 3 n_z (exact)
    n = _unit(np.random.default_rng(1), 50)
    L = np.zeros(9)
    L[0] = np.sqrt(4 * np.pi)
    np.testing.assert_allclose(shade(n, radiance_to_irradiance(L)), np.pi, rtol=1e-12)
    L = np.zeros(9)
    L[2] = np.sqrt(4 * np.pi / 3)  # omega_z = sqrt(4 pi / 3) Y_10
    np.testing.assert_allclose(shade(n, radiance_to_irradiance(L)), 2 * np.pi / 3 * n[:, 2], atol=1e-12)
    # l = 2: radiance 3 omega_z^2 - 1 = 4 sqrt(pi/5) Y_20 -> irradiance pi/4 of it
    L = np.zeros(9)
    L[6] = 4 * np.sqrt(np.pi / 5)
    np.testing.assert_allclose(shade(n, radiance_to_irradiance(L)), np.pi / 4 * (3 * n[:, 2] ** 2 - 1), atol=1e-12)
    np.testing.assert_allclose(irradiance_to_radiance(radiance_to_irradiance(L)), L)


@pytest.mark.parametrize("shared", [False, True])
def test_fit_recovers_known_coefficients_on_sphere(shared):
    rng = np.random.default_rng(2)
    n, mask = _sphere()
    sh = rng.normal(size=(9, 3)) * 0.3
    sh[0] += 2.5
    if shared:
        sh[:] = sh[:, :1]
    albedo = rng.uniform(0.3, 0.9, size=n.shape[:2] + (3,))
    img = albedo * shade(n, sh)
    img[~mask] = np.nan  # must not leak in
    est = fit_sh_lighting(img, n, albedo, mask, shared=shared)
    np.testing.assert_allclose(est if not shared else np.repeat(est[:, None], 3, 1), sh, atol=1e-10)


def test_fit_dense_and_gathered_paths_agree_and_specular_is_removed():
    rng = np.random.default_rng(3)
    n, mask = _sphere(40)
    sh = rng.normal(size=(9, 3))
    spec = rng.uniform(0, 0.1, size=n.shape[:2] + (3,))
    img = 0.7 * shade(n, sh) + spec
    full = np.ones(mask.shape, bool)
    a = fit_sh_lighting(img, n, 0.7, full, specular=spec)          # dense path
    b = fit_sh_lighting(img, n, 0.7, full & (np.arange(40) < 10)[:, None], specular=spec)  # gathered
    np.testing.assert_allclose(a, sh, atol=1e-10)
    np.testing.assert_allclose(b, sh, atol=1e-8)


def test_fit_grey_image_returns_9_vector():
    n, mask = _sphere(32)
    sh = np.array([2.0, 0.3, 0.5, -0.2, 0.05, 0.0, 0.1, -0.05, 0.02])
    est = fit_sh_lighting(shade(n, sh), n, 1.0, mask)
    assert est.shape == (9,)
    np.testing.assert_allclose(est, sh, atol=1e-10)


def test_fit_bad_input():
    n, mask = _sphere(16)
    img = np.ones(mask.shape + (3,))
    with pytest.raises(ValueError, match="normals"):
        fit_sh_lighting(img, n[:-1], 1.0, mask)
    with pytest.raises(ValueError, match="mask"):
        fit_sh_lighting(img, n, 1.0, mask[:-1])
    with pytest.raises(ValueError, match="at least 9"):
        fit_sh_lighting(img, n, 1.0, np.zeros_like(mask))
    flat = np.zeros_like(n)
    flat[..., 2] = 1
    with pytest.raises(ValueError, match="not determined"):
        fit_sh_lighting(img, flat, 1.0, mask)
    bad = img.copy()
    bad[mask.nonzero()[0][0], mask.nonzero()[1][0]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_sh_lighting(bad, n, 1.0, mask & (np.arange(16) < 6)[:, None] | mask)


def _deep3d_reference(n, gamma27):
    """Deep3DFaceRecon's shading, transcribed from its compute_color (gamma + 0.8 on the DC term)."""
    a = [np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0)]
    c = [1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi)]
    g = gamma27.reshape(3, 9).copy()
    g[:, 0] += 0.8
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    Y = np.stack([a[0] * c[0] * np.ones_like(x), -a[1] * c[1] * y, a[1] * c[1] * z, -a[1] * c[1] * x,
                  a[2] * c[2] * x * y, -a[2] * c[2] * y * z, 0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * z * z - 1),
                  -a[2] * c[2] * x * z, 0.5 * a[2] * c[2] * (x * x - y * y)], 1)
    return Y @ g.T


def _deca_reference(n, sh_coeff):
    """DECA's add_SHlight, transcribed (sh_coeff (9, 3))."""
    pi = np.pi
    f = np.array([1 / np.sqrt(4 * pi), ((2 * pi) / 3) * np.sqrt(3 / (4 * pi)), ((2 * pi) / 3) * np.sqrt(3 / (4 * pi)),
                  ((2 * pi) / 3) * np.sqrt(3 / (4 * pi)), (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
                  (pi / 4) * 3 * np.sqrt(5 / (12 * pi)), (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
                  (pi / 4) * (3 / 2) * np.sqrt(5 / (12 * pi)), (pi / 4) * (1 / 2) * np.sqrt(5 / (4 * pi))])
    N = n
    B = np.stack([np.ones(len(N)), N[:, 0], N[:, 1], N[:, 2], N[:, 0] * N[:, 1], N[:, 0] * N[:, 2],
                  N[:, 1] * N[:, 2], N[:, 0] ** 2 - N[:, 1] ** 2, 3 * N[:, 2] ** 2 - 1], 1) * f
    return B @ sh_coeff


def test_deep3d_conversion_reproduces_shading_and_round_trips():
    rng = np.random.default_rng(4)
    n = _unit(rng, 300)
    gamma = rng.normal(size=27) * 0.2
    sh = from_deep3d(gamma)
    np.testing.assert_allclose(shade(n, sh), _deep3d_reference(n, gamma), atol=1e-12)
    assert not np.allclose(sh, gamma.reshape(3, 9).T)  # coefficients differ, shading agrees
    np.testing.assert_allclose(to_deep3d(sh).ravel(), gamma, atol=1e-12)
    np.testing.assert_allclose(to_deep3d(from_deep3d(gamma.reshape(3, 9))), gamma.reshape(3, 9), atol=1e-12)


def test_deca_conversion_reproduces_shading_and_round_trips():
    rng = np.random.default_rng(5)
    n = _unit(rng, 300)
    coeff = rng.normal(size=(9, 3))
    sh = from_deca(coeff)
    np.testing.assert_allclose(shade(n, sh), _deca_reference(n, coeff), atol=1e-12)
    assert not np.allclose(sh, coeff)
    np.testing.assert_allclose(to_deca(sh), coeff, atol=1e-12)
    # bases evaluate like the transcriptions
    np.testing.assert_allclose(deca_basis(n) @ coeff, _deca_reference(n, coeff), atol=1e-12)
    g = rng.normal(size=27)
    np.testing.assert_allclose(deep3d_basis(n) @ (g.reshape(3, 9).T + np.r_[0.8, np.zeros(8)][:, None]),
                               _deep3d_reference(n, g), atol=1e-12)


def test_shade_bad_sh_shape():
    with pytest.raises(ValueError, match="sh must have shape"):
        shade(np.array([[0, 0, 1.0]]), np.ones(8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        sh_basis(np.ones((4, 2)))


def test_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    n, mask = _sphere(32)
    sh = np.random.default_rng(6).normal(size=(9, 3))
    img = 0.5 * shade(n, sh)
    est = fit_sh_lighting(cp.asarray(img), cp.asarray(n), 0.5, cp.asarray(mask))
    np.testing.assert_allclose(cp.asnumpy(est), sh, atol=1e-9)
