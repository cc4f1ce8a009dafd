"""geomfit.uv_texture / uv_render: photo -> UV texture through a fit, visibility, round trips."""
import os
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

import geomfit
from geomfit.fitting import project

DATA = pathlib.Path(os.environ.get("GEOMFIT_DATA", "/nonexistent"))


def _grid(n, z=0.0, x0=-1.0, x1=1.0, y0=-1.0, y1=1.0, u0=0.0, u1=1.0, bump=0.0):
    """A (n x n)-vertex grid in the plane z (plus an optional bump), uv spanning [u0, u1] x [0, 1]."""
    xs = np.linspace(x0, x1, n)
    ys = np.linspace(y0, y1, n)
    X, Y = np.meshgrid(xs, ys)
    Z = z + bump * np.exp(-(X ** 2 + Y ** 2) / 0.5)
    v = np.stack([X.ravel(), Y.ravel(), Z.ravel()], 1)
    U = u0 + (X - x0) / (x1 - x0) * (u1 - u0)
    V = (Y - y0) / (y1 - y0)  # v up = model y up
    tc = np.stack([U.ravel(), V.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])  # counter-clockwise seen from +z
    return v, f, tc


def _fit(v, f, tc, R, s, t, hw):
    proj = project(v, R, s, np.asarray(t, float), np.asarray(hw))
    return SimpleNamespace(vertices=v, rotation=R, projected=proj, scale=s,
                           model=SimpleNamespace(faces=f, texcoords=tc))


def _tex_fn(u, v):
    """An analytic smooth colour texture."""
    return np.stack([0.5 + 0.3 * np.sin(2 * np.pi * 2 * u) * np.cos(2 * np.pi * v),
                     0.4 + 0.3 * v, 0.3 + 0.2 * np.cos(2 * np.pi * 3 * u)], -1)


def _render_analytic(fit, hw):
    """Independent forward renderer: every covered pixel evaluates the analytic texture at its uv."""
    R = fit.rotation
    cam = fit.vertices @ R.T
    scr = np.concatenate([fit.projected, fit.scale * cam[:, 2:3]], 1)
    ras = geomfit.rasterize(scr, fit.model.faces, *hw)
    uv = geomfit.interpolate(ras, fit.model.texcoords)
    img = np.zeros(hw + (3,))
    img[ras.mask] = _tex_fn(uv[ras.mask][:, 0], uv[ras.mask][:, 1])
    return img, ras.mask


def test_synthetic_render_recovers_the_known_texture():
    v, f, tc = _grid(41, bump=0.3)
    R = geomfit.euler_to_matrix(np.deg2rad(10.0), np.deg2rad(-5.0), 0.0)
    hw = (420, 400)
    fit = _fit(v, f, tc, R, 180.0, (200.0, 210.0), hw)
    img, _ = _render_analytic(fit, hw)
    S = 64
    r = geomfit.uv_texture(img, fit, size=S)
    assert r.texture.shape == (S, S, 3) and r.visible.shape == (S, S) and r.visible.dtype == bool
    # texel centres -> the analytic texture
    cc, rr = np.meshgrid(np.arange(S), np.arange(S))
    truth = _tex_fn((cc + 0.5) / S, 1.0 - (rr + 0.5) / S)
    vis = r.visible
    assert vis.mean() > 0.9  # a frontal bumpy plate: nearly every texel is seen
    err = np.abs(r.texture[vis] - truth[vis])
    print("synthetic texture recovery: mean abs", err.mean(), "max", err.max())
    assert err.mean() < 5e-4
    # a wrong row convention (v down) would put the texture upside down
    flipped = truth[::-1]
    assert np.abs(r.texture[vis] - flipped[vis]).mean() > 20 * err.mean()
    # round trip: the texture rendered back reproduces the photo over visible pixels
    back, m = geomfit.uv_render(r.texture, fit, hw, valid=r.visible)
    assert m.sum() > 0.8 * _render_analytic(fit, hw)[1].sum()
    rt = np.abs(back[m] - img[m]).mean()
    print("synthetic round trip: mean abs", rt)
    assert rt < 3e-3


def test_occluded_and_back_facing_texels_are_invisible():
    # back plate (uv left half) at z = 0, a smaller front plate (uv right half) at z = 0.5 covering x in [-0.4, 0.4]
    vb, fb, tb = _grid(21, z=0.0, u0=0.0, u1=0.5)
    vf, ff, tf = _grid(11, z=0.5, x0=-0.4, x1=0.4, y0=-0.4, y1=0.4, u0=0.5, u1=1.0)
    v = np.concatenate([vb, vf])
    f = np.concatenate([fb, ff + len(vb)])
    tc = np.concatenate([tb, tf])
    hw = (200, 200)
    fit = _fit(v, f, tc, np.eye(3), 80.0, (100.0, 100.0), hw)
    img = np.random.default_rng(0).uniform(size=hw + (3,))
    S = 80
    r = geomfit.uv_texture(img, fit, size=S)
    # independent expectation from the geometry: a back-plate texel at (x, y) is hidden when |x|, |y| < 0.4
    cc, rr = np.meshgrid(np.arange(S), np.arange(S))
    u, vv = (cc + 0.5) / S, 1.0 - (rr + 0.5) / S
    back = u < 0.5
    x = -1.0 + 2.0 * (u / 0.5)
    y = -1.0 + 2.0 * vv
    hidden = back & (np.abs(x) < 0.38) & (np.abs(y) < 0.38)
    clear = back & ((np.abs(x) > 0.42) | (np.abs(y) > 0.42)) & (np.abs(x) < 0.97) & (np.abs(y) < 0.97)
    assert not r.visible[hidden].any()
    assert r.visible[clear].all()
    assert (r.texture[hidden] == 0).all()
    front_tex = (u > 0.52) & (u < 0.98) & (vv > 0.02) & (vv < 0.98)
    assert r.visible[front_tex].all()
    # turned around (180 degrees about y): every texel faces away
    Rb = geomfit.euler_to_matrix(np.pi, 0.0, 0.0)
    rb = geomfit.uv_texture(img, _fit(vb, fb, tb, Rb, 80.0, (100.0, 100.0), hw), size=S)
    assert rb.mask.sum() > 0 and not rb.visible.any()


def test_uv_texture_rejects_bad_input():
    v, f, tc = _grid(5)
    fit = _fit(v, f, tc, np.eye(3), 10.0, (20.0, 20.0), (40, 40))
    img = np.zeros((40, 40, 3))
    with pytest.raises(TypeError, match="projected"):
        geomfit.uv_texture(img, SimpleNamespace(vertices=v, rotation=np.eye(3)))
    with pytest.raises(ValueError, match="texture coordinates"):
        geomfit.uv_texture(img, _fit(v, f, None, np.eye(3), 10.0, (20.0, 20.0), (40, 40)))
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        geomfit.uv_texture(bad, fit)
    with pytest.raises(ValueError, match="size"):
        geomfit.uv_texture(img, fit, size=0)
    with pytest.raises(ValueError, match="texcoords"):
        geomfit.uv_texture(img, fit, texcoords=tc[:3])


def test_uint8_photo_is_scaled():
    v, f, tc = _grid(9, bump=0.2)
    hw = (60, 60)
    fit = _fit(v, f, tc, np.eye(3), 25.0, (30.0, 30.0), hw)
    img = np.full(hw + (3,), 0.25)
    r8 = geomfit.uv_texture((img * 255).round().astype(np.uint8), fit, size=16)
    r = geomfit.uv_texture(img, fit, size=16)
    np.testing.assert_allclose(r8.texture, r.texture, atol=1 / 255)
    np.testing.assert_array_equal(r8.visible, r.visible)


@pytest.mark.skipif(not (DATA / "sfm" / "sfm_shape_3448.bin").exists(), reason="GEOMFIT_DATA with sfm/ not available")
def test_photo_round_trip_image_0010():
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from _fit_helpers import load_sfm, read_pts

    m = load_sfm(DATA / "sfm")
    img = geomfit.read_image(DATA / "images" / "image_0010.png")
    pts = read_pts(DATA / "images" / "image_0010.pts")
    fit = geomfit.fit_landmarks(m, pts, img.shape[:2])
    r = geomfit.uv_texture(img, fit, size=256)
    assert 0.4 < r.visible.mean() < r.mask.mean()
    # forehead texels (top of the map) come from above the eyes in the photo: v up, rows top-down
    top = r.visible[:64].any(1)
    rows_top = r.image_xy[:64][r.visible[:64]][:, 1]
    assert top.any() and np.median(rows_top) < pts[36:48, 1].mean()
    back, mk = geomfit.uv_render(r.texture, fit, img.shape[:2], valid=r.visible)
    face = mk.sum()
    assert face > 50000
    d = np.abs(back[mk] - img[mk]).mean()
    print(f"image_0010 round trip: mean abs diff {d:.4f} over {face} visible face pixels")
    assert d < 0.02


def test_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    try:
        cp.zeros(1)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"CuPy present but no GPU: {e}")
    v, f, tc = _grid(21, bump=0.3)
    hw = (120, 120)
    fit = _fit(v, f, tc, geomfit.euler_to_matrix(0.2, 0.1, 0.0), 50.0, (60.0, 60.0), hw)
    img = np.random.default_rng(1).uniform(size=hw + (3,))
    r = geomfit.uv_texture(img, fit, size=32)
    gfit = SimpleNamespace(vertices=cp.asarray(v), rotation=cp.asarray(fit.rotation), projected=cp.asarray(fit.projected),
                           scale=fit.scale, model=SimpleNamespace(faces=cp.asarray(f), texcoords=cp.asarray(tc)))
    g = geomfit.uv_texture(cp.asarray(img), gfit, size=32)
    np.testing.assert_array_equal(cp.asnumpy(g.visible), r.visible)
    np.testing.assert_allclose(cp.asnumpy(g.texture), r.texture, atol=1e-9)
