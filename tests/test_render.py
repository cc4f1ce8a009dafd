import numpy as np
import pytest

from geomfit.backend import cuda_available
from geomfit.camera import ScaledOrthographic, euler_to_matrix
from geomfit import backend
from geomfit.render import depth_normals, interpolate, rasterize, render_depth


def reference_raster(v, f, H, W):
    """Slow independent reference: per triangle, point-in-triangle for every pixel centre.

    Barycentrics by solving the 2x2 system (not edge functions); nearest (largest z) wins, ties to
    the larger id. Also returns, per pixel, the smallest |barycentric| margin and depth gap, to
    identify pixels whose answer is numerically ambiguous.
    """
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    tid = np.full((H, W), -1)
    zbuf = np.full((H, W), -np.inf)
    bary = np.zeros((H, W, 3))
    margin = np.full((H, W), np.inf)
    zgap = np.full((H, W), np.inf)
    for t, (a, b, c) in enumerate(f):
        T = np.array([[v[a, 0] - v[c, 0], v[b, 0] - v[c, 0]], [v[a, 1] - v[c, 1], v[b, 1] - v[c, 1]]])
        if abs(np.linalg.det(T)) < 1e-12:
            continue
        l01 = np.linalg.solve(T, np.stack([jj.ravel() - v[c, 0], ii.ravel() - v[c, 1]]))
        l = np.stack([l01[0], l01[1], 1 - l01[0] - l01[1]], 1).reshape(H, W, 3)
        margin = np.minimum(margin, np.abs(l).min(-1))
        inside = (l >= 0).all(-1)
        z = l @ v[[a, b, c], 2]
        zgap = np.where(inside, np.minimum(zgap, np.abs(z - zbuf)), zgap)
        win = inside & (z >= zbuf)
        tid[win], zbuf[win], bary[win] = t, z[win], l[win]
    depth = np.where(tid >= 0, zbuf, np.nan)
    return tid, bary, depth, margin, zgap


def random_soup(rng, nt=25, H=24, W=20):
    v = np.column_stack([rng.uniform(-3, W + 3, 3 * nt), rng.uniform(-3, H + 3, 3 * nt), rng.uniform(-5, 5, 3 * nt)])
    f = np.arange(3 * nt).reshape(nt, 3)
    return v, f


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_soup_matches_reference(seed):
    rng = np.random.default_rng(seed)
    H, W = 24, 20
    v, f = random_soup(rng, H=H, W=W)
    r = rasterize(v, f, H, W)
    tid, bary, depth, margin, zgap = reference_raster(v, f, H, W)
    clear = (margin > 1e-9) & (zgap > 1e-9)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(r.triangle_id[clear], tid[clear])
    m = clear & (tid >= 0)
    assert m.sum() > 50
    np.testing.assert_allclose(r.barycentric[m], bary[m], atol=1e-9)
    np.testing.assert_allclose(r.depth[m], depth[m], atol=1e-9)
    assert np.isnan(r.depth[~r.mask]).all() and (r.barycentric[~r.mask] == 0).all()
    np.testing.assert_array_equal(r.mask, r.triangle_id >= 0)
    # index map: vertex with the largest barycentric of the covering face
    vi = np.where(tid >= 0, f[np.maximum(tid, 0), np.argmax(bary, -1)], -1)
    np.testing.assert_array_equal(r.vertex_index[m], vi[m])
    assert (r.vertex_index[~r.mask] == -1).all()


def grid_mesh(n, start, step, z=lambda x, y: 0 * x):
    """Square grid mesh; with start, step chosen so, vertices lie on pixel centres (ties on edges)."""
    xs = start + step * np.arange(n)
    ys = xs
    X, Y = np.meshgrid(xs, ys)
    v = np.stack([X.ravel(), Y.ravel(), z(X, Y).ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f


def test_shared_edges_cover_each_pixel_exactly_once():
    H = W = 17
    v, f = grid_mesh(8, -7.5, 4.0)  # vertices every 4 pixels, edges through pixel centres
    f[::3] = f[::3, ::-1]  # mixed windings must not matter
    count = np.zeros((H, W), int)
    for t in range(len(f)):  # each face alone
        count += rasterize(v, f[t:t + 1], H, W).mask
    np.testing.assert_array_equal(count, 1)  # the mesh covers the image: no gaps, no double coverage
    r = rasterize(v, f, H, W)
    assert r.mask.all()


def test_plane_depth_exact_and_normals():
    H, W = 30, 40
    a, b, c = 0.3, -0.2, 7.0
    v = np.array([[-1.0, -1, 0], [W + 1, -1, 0], [W + 1, H + 1, 0], [-1, H + 1, 0]])
    v[:, 2] = a * v[:, 0] + b * v[:, 1] + c
    f = np.array([[0, 1, 2], [0, 2, 3]])
    r = rasterize(v, f, H, W)
    assert r.mask.all()
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    np.testing.assert_allclose(r.depth, a * jj + b * ii + c, atol=1e-10)
    # interpolating screen positions returns the pixel centres (linear precision)
    xy = interpolate(r, v[:, :2])
    np.testing.assert_allclose(xy[..., 0], jj, atol=1e-10)
    np.testing.assert_allclose(xy[..., 1], ii, atol=1e-10)
    n = depth_normals(r.depth)
    expect = np.array([-a, b, 1.0]) / np.linalg.norm([-a, b, 1.0])
    np.testing.assert_allclose(n, np.broadcast_to(expect, n.shape), atol=1e-10)


def test_sphere_depth_and_normals():
    trimesh = pytest.importorskip("trimesh")
    rad, s, H = 1.0, 40.0, 100
    m = trimesh.creation.icosphere(subdivisions=5, radius=rad)
    cam = ScaledOrthographic(s, euler_to_matrix(0.4, 0.2, -0.3), [50.0, 50.0])  # a sphere is pose-free
    d = render_depth(np.asarray(m.vertices), np.asarray(m.faces), cam, H, H)
    jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(H) + 0.5)
    x, y = (jj - 50.0) / s, (H - ii - 50.0) / s  # model units, y up
    rho2 = x ** 2 + y ** 2
    inside = rho2 < 0.9 ** 2
    np.testing.assert_array_equal(np.isfinite(d)[rho2 < 0.97 ** 2], True)
    assert not np.isfinite(d[rho2 > 1.03 ** 2]).any()
    np.testing.assert_allclose(d[inside], s * np.sqrt(rad ** 2 - rho2[inside]), atol=0.02 * s * rad)
    n = depth_normals(d)
    radial = np.stack([x, y, np.sqrt(np.maximum(rad ** 2 - rho2, 0))], -1) / rad
    cosang = (n[inside] * radial[inside]).sum(-1)
    assert np.degrees(np.arccos(np.clip(cosang, -1, 1))).max() < 3.0


def test_depth_normals_border_and_nan():
    d = np.array([[np.nan, 1.0, 2.0], [np.nan, np.nan, 3.0], [1.0, np.nan, np.nan]])
    n = depth_normals(d)
    assert np.isnan(n[np.isnan(d)]).all()
    # (0,1): only forward x difference (+1); y: only the pixel below is NaN and above is outside -> 0
    np.testing.assert_allclose(n[0, 1], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2))
    # (0,2): backward x (+1); forward y (row 1: 3 - 2 = +1)
    np.testing.assert_allclose(n[0, 2], np.array([-1.0, 1.0, 1.0]) / np.sqrt(3))
    np.testing.assert_allclose(n[2, 0], [0.0, 0.0, 1.0])


def test_interpolate_matches_manual():
    rng = np.random.default_rng(5)
    v, f = random_soup(rng, 10, 16, 16)
    r = rasterize(v, f, 16, 16)
    attr = rng.standard_normal((len(v), 4))
    out = interpolate(r, attr, fill=np.nan)
    i, j = np.nonzero(r.mask)
    k = np.arange(len(i))[:20]
    for q in k:
        t = r.triangle_id[i[q], j[q]]
        np.testing.assert_allclose(out[i[q], j[q]], r.barycentric[i[q], j[q]] @ attr[f[t]], atol=1e-12)
    assert np.isnan(out[~r.mask]).all()
    np.testing.assert_allclose(interpolate(r, v[:, 2])[r.mask], r.depth[r.mask], atol=1e-12)


def test_bad_input():
    v = np.zeros((3, 3))
    f = np.array([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        rasterize(v[:, :2], f, 4, 4)
    with pytest.raises(ValueError, match="faces index"):
        rasterize(v, f + 1, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        rasterize(np.full((3, 3), np.nan), f, 4, 4)
    with pytest.raises(ValueError, match="height"):
        rasterize(v, f, 0, 4)
    with pytest.raises(TypeError):
        rasterize(v, f.astype(float), 4, 4)
    with pytest.raises(ValueError):
        depth_normals(np.zeros(5))
    # empty mesh and fully off-screen mesh: empty raster, no crash
    r = rasterize(np.zeros((0, 3)), np.zeros((0, 3), int), 4, 5)
    assert r.shape == (4, 5) and not r.mask.any()
    r = rasterize(v + [100, 100, 0], f, 4, 5)
    assert not r.mask.any()


@pytest.mark.cudasim
def test_cuda_kernel_equals_cpu():
    if not cuda_available():
        pytest.skip("needs a GPU or NUMBA_ENABLE_CUDASIM=1")
    rng = np.random.default_rng(7)
    v, f = random_soup(rng, 20, 16, 16)
    v[:6, 2] = 1.0  # two triangles at equal constant depth: exercises the tie rule
    a = rasterize(v, f, 16, 16)
    with backend.force("cuda"):
        b = rasterize(v, f, 16, 16)
    for name in ("triangle_id", "barycentric", "depth", "vertex_index"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    # grid with edges through pixel centres (tie rule)
    vg, fg = grid_mesh(5, -3.5, 4.0, z=lambda x, y: 0.1 * x)
    a = rasterize(vg, fg, 8, 8)
    with backend.force("cuda"):
        b = rasterize(vg, fg, 8, 8)
    np.testing.assert_array_equal(b.triangle_id, a.triangle_id)


def test_cupy_dispatch_equals_numpy():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(8)
    v, f = random_soup(rng, 200, 64, 64)
    a = rasterize(v, f, 64, 64)
    b = rasterize(cp.asarray(v), cp.asarray(f), 64, 64)
    np.testing.assert_array_equal(cp.asnumpy(b.triangle_id), a.triangle_id)
    np.testing.assert_allclose(cp.asnumpy(b.depth), a.depth, atol=1e-9)
