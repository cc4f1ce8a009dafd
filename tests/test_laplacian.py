"""Tests of the medium stage: Laplacian deformation (Jin et al., "High-fidelity 3D face reconstruction with
multi-scale details", Pattern Recognition Letters 2021, Sec. 3.3, Eqs. 2-3) and its robust variant."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from geomfit.laplacian import (LaplacianDeformer, ibug_region_weights, landmark_weights,
                               laplacian_deform)


def grid_mesh(k=12, seed=0):
    """A k x k vertex height-field patch (face-like bump), 2 triangles per cell."""
    x, y = np.meshgrid(np.linspace(-1, 1, k), np.linspace(-1, 1, k))
    z = 0.5 * np.exp(-(x ** 2 + y ** 2)) + 0.05 * np.random.default_rng(seed).standard_normal(x.shape)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(k * k).reshape(k, k)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f


def reference_uniform_laplacian(f, n):
    """Plain-Python umbrella Laplacian (Eq. 2, omega = 1/N_i), independent of geomfit."""
    nbrs = [set() for _ in range(n)]
    for tri in f.tolist():
        for p in range(3):
            for q in range(3):
                if p != q:
                    nbrs[tri[p]].add(tri[q])
    L = np.eye(n)
    for i, s in enumerate(nbrs):
        for j in s:
            L[i, j] -= 1.0 / len(s)
    return sp.csr_matrix(L)


def reference_solve(v, L, h, w, mu):
    """SciPy spsolve of the normal equations (L^T L + W) V' = L^T L V + W mu."""
    n = v.shape[0]
    W = sp.csr_matrix((w * np.ones(len(h)), (h, h)), shape=(n, n))
    A = (L.T @ L + W).tocsc()
    b = L.T @ (L @ v)
    b[h] += (w * np.ones(len(h)))[:, None] * mu
    return spla.spsolve(A, b)


@pytest.fixture(scope="module")
def mesh():
    return grid_mesh()


def test_matches_scipy_spsolve_uniform(mesh):
    v, f = mesh
    rng = np.random.default_rng(1)
    h = rng.choice(len(v), 15, replace=False)
    w = rng.uniform(0.1, 2.0, 15)
    mu = v[h] + 0.2 * rng.standard_normal((15, 3))
    got = LaplacianDeformer(v, f, h, w).deform(mu)
    ref = reference_solve(v, reference_uniform_laplacian(f, len(v)), h, w, mu)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8


def test_matches_scipy_spsolve_cotangent_igl(mesh):
    igl = pytest.importorskip("igl")
    v, f = mesh
    rng = np.random.default_rng(2)
    h = rng.choice(len(v), 12, replace=False)
    mu = v[h] + 0.1 * rng.standard_normal((12, 3))
    C = sp.csr_matrix(igl.cotmatrix(v, f))  # libigl: off-diagonal cot weights, diagonal = -row sum
    L = sp.diags(1.0 / -C.diagonal()) @ (-C)  # normalised so omega sums to 1 (Eq. 2)
    ref = reference_solve(v, sp.csr_matrix(L), h, 0.6, mu)
    got = laplacian_deform(v, f, h, mu, 0.6, laplacian="cotangent")
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8


def test_superlu_method_agrees(mesh):
    v, f = mesh
    h = np.arange(0, len(v), 7)
    mu = v[h] + 0.1
    mu[3] += 0.5
    a = LaplacianDeformer(v, f, h, 0.6).deform(mu)
    b = LaplacianDeformer(v, f, h, 0.6, method="superlu").deform(mu)
    assert np.abs(a - b).max() < 1e-10


def test_solution_minimises_energy(mesh):
    v, f = mesh
    rng = np.random.default_rng(3)
    h = rng.choice(len(v), 10, replace=False)
    mu = v[h] + 0.3 * rng.standard_normal((10, 3))
    d = LaplacianDeformer(v, f, h, rng.uniform(0.1, 1, 10))
    x = d.deform(mu)
    e0 = d.energy(x, mu)
    for _ in range(5):
        assert d.energy(x + 1e-3 * rng.standard_normal(x.shape), mu) > e0


def test_rest_targets_give_back_mesh(mesh):
    v, f = mesh
    h = np.arange(0, len(v), 5)
    for kind in ("uniform", "cotangent"):
        out = LaplacianDeformer(v, f, h, 0.6, laplacian=kind).deform(v[h])
        assert np.abs(out - v).max() < 1e-12


def test_translation_translates_mesh(mesh):
    v, f = mesh
    h = np.arange(3, len(v), 9)
    t = np.array([0.3, -1.2, 2.5])
    for kind in ("uniform", "cotangent"):
        out = LaplacianDeformer(v, f, h, [0.1, 0.6] * (len(h) // 2) + [0.6] * (len(h) % 2), laplacian=kind).deform(v[h] + t)
        assert np.abs(out - (v + t)).max() < 1e-9


def test_handles_reach_targets_as_weights_grow(mesh):
    v, f = mesh
    rng = np.random.default_rng(4)
    h = rng.choice(len(v), 8, replace=False)
    mu = v[h] + 0.3 * rng.standard_normal((8, 3))
    errs = [np.abs(LaplacianDeformer(v, f, h, w).deform(mu)[h] - mu).max() for w in (0.01, 0.1, 1.0, 1e2, 1e4, 1e7)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] > 0.05 and errs[-1] < 1e-5


def test_low_rank_update_equals_refactor(mesh):
    v, f = mesh
    rng = np.random.default_rng(5)
    h = rng.choice(len(v), 20, replace=False)
    w = rng.uniform(0.1, 1.0, 20)
    mu = v[h] + 0.2 * rng.standard_normal((20, 3))
    d = LaplacianDeformer(v, f, h, w)
    idx = np.array([0, 3, 7, 11])
    new = np.array([5.0, 0.01, 2.0, w[11] * 0.5])  # two increases, two decreases
    d.set_weights(idx, new)
    w2 = w.copy()
    w2[idx] = new
    fresh = LaplacianDeformer(v, f, h, w2)
    assert np.abs(d.deform(mu) - fresh.deform(mu)).max() < 1e-10
    assert np.allclose(d.handle_weights, w2)
    assert abs(sp.linalg.norm(d.A - fresh.A)) < 1e-12


def test_batch_equals_per_target_solves(mesh):
    v, f = mesh
    rng = np.random.default_rng(6)
    h = rng.choice(len(v), 10, replace=False)
    d = LaplacianDeformer(v, f, h, 0.6)
    mus = v[h][None] + 0.2 * rng.standard_normal((4, 10, 3))
    batch = d.deform(mus)
    assert batch.shape == (4, len(v), 3)
    for b in range(4):
        assert np.abs(batch[b] - d.deform(mus[b])).max() < 1e-12


@pytest.mark.parametrize("handles_last", [True, False])
@pytest.mark.parametrize("ordering", [None, "amd", "metis", "nesdis"])
def test_orderings_and_handles_last_match_scipy(mesh, handles_last, ordering):
    """Every factor layout (handles eliminated last or not, any CHOLMOD ordering) gives SciPy's answer."""
    v, f = mesh
    rng = np.random.default_rng(11)
    h = rng.choice(len(v), 20, replace=False)
    w = rng.uniform(0.1, 2.0, 20)
    d = LaplacianDeformer(v, f, h, w, ordering=ordering, handles_last=handles_last)
    assert (d.factor.last is not None) == handles_last
    ref_L = reference_uniform_laplacian(f, len(v))
    mus = v[h][None] + 0.2 * rng.standard_normal((3, 20, 3))
    got = d.deform(mus)
    for b in range(3):
        ref = reference_solve(v, ref_L, h, w, mus[b])
        assert np.linalg.norm(got[b] - ref) / np.linalg.norm(ref) < 1e-8
    # weight changes (rank-k up- and downdates) keep the parity
    d.set_weights([0, 5, 9], [3.0, 0.05, 1.0])
    w2 = w.copy()
    w2[[0, 5, 9]] = [3.0, 0.05, 1.0]
    ref = reference_solve(v, ref_L, h, w2, mus[0])
    assert np.linalg.norm(d.deform(mus[0]) - ref) / np.linalg.norm(ref) < 1e-8


def test_handles_last_superlu_fallback(mesh):
    v, f = mesh
    h = np.arange(0, len(v), 9)
    mu = v[h] + 0.1
    got = LaplacianDeformer(v, f, h, 0.6, method="superlu").deform(mu)
    ref = reference_solve(v, reference_uniform_laplacian(f, len(v)), h, 0.6, mu)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8


def _smooth_bump(v, centre, radius, height):
    r2 = ((v - centre) ** 2).sum(1) / radius ** 2
    return height * np.exp(-r2)[:, None] * np.array([0.0, 0.0, 1.0])


def test_medium_improves_on_coarse_synthetic():
    """True face = model instance + smooth non-model bump; coarse = model instance."""
    v, f = grid_mesh(k=20, seed=7)
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((3, len(v), 3)) * 0.02  # a tiny random "model"
    coarse = v + np.tensordot(rng.standard_normal(3), basis, 1)
    truth = coarse + _smooth_bump(coarse, np.array([0.3, -0.2, 0.0]), 0.5, 0.3)
    h = rng.choice(len(v), 60, replace=False)
    medium = LaplacianDeformer(coarse, f, h, 0.6).deform(truth[h])
    err_c = np.sqrt(((coarse - truth) ** 2).sum(1).mean())
    err_m = np.sqrt(((medium - truth) ** 2).sum(1).mean())
    assert err_m < 0.5 * err_c


def test_medium_improves_on_coarse_sfm_reference(sfm_dir):
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.load(sfm_dir / "sfm_reference.obj", process=False)
    v, f = np.asarray(m.vertices, float), np.asarray(m.faces)
    truth = v + _smooth_bump(v, v[np.argmax(v[:, 2])], 30.0, 8.0)  # nose region pushed out 8 mm
    rng = np.random.default_rng(8)
    h = rng.choice(len(v), 80, replace=False)
    medium = LaplacianDeformer(v, f, h, 0.6).deform(truth[h])
    err_c = np.sqrt(((v - truth) ** 2).sum(1).mean())
    err_m = np.sqrt(((medium - truth) ** 2).sum(1).mean())
    assert err_m < 0.7 * err_c


def test_ibug_region_weights():
    w = ibug_region_weights()
    assert sorted(w) == list(range(1, 69))
    assert w[31] == 0.6 and w[40] == 0.6 and w[20] == 0.1 and w[52] == 0.1 and w[9] == 0.05
    assert np.allclose(landmark_weights([31, 49, 200]), [0.6, 0.1, 0.1])
    with pytest.raises(ValueError, match="eyes"):
        ibug_region_weights(eyes=0.0)


# -- bad input -------------------------------------------------------------------------------------

def test_bad_handles(mesh):
    v, f = mesh
    with pytest.raises(ValueError, match="out of range"):
        LaplacianDeformer(v, f, [0, len(v)], 0.6)
    with pytest.raises(ValueError, match="out of range"):
        LaplacianDeformer(v, f, [-1, 3], 0.6)
    with pytest.raises(ValueError, match="repeated"):
        LaplacianDeformer(v, f, [1, 2, 1], 0.6)
    with pytest.raises(ValueError, match="non-empty"):
        LaplacianDeformer(v, f, [], 0.6)
    with pytest.raises(TypeError, match="integers"):
        LaplacianDeformer(v, f, [0.5, 2.0], 0.6)
    with pytest.raises(ValueError, match="handle_weights"):
        LaplacianDeformer(v, f, [1, 2], [0.6, 0.0])
    with pytest.raises(ValueError, match="handle_weights"):
        LaplacianDeformer(v, f, [1, 2], [0.6, 0.1, 0.3])
    with pytest.raises(ValueError, match="uniform"):
        LaplacianDeformer(v, f, [1, 2], 0.6, laplacian="mean")


def test_bad_targets(mesh):
    v, f = mesh
    d = LaplacianDeformer(v, f, [1, 2, 3], 0.6)
    mu = v[[1, 2, 3]].copy()
    mu[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        d.deform(mu)
    with pytest.raises(ValueError, match="shape"):
        d.deform(v[[1, 2]])
    with pytest.raises(ValueError, match="shape"):
        d.deform(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="handle positions"):
        d.set_weights([3], [1.0])
    with pytest.raises(ValueError, match="new_weights"):
        d.set_weights([0], [-1.0])


def test_bad_mesh(mesh):
    v, f = mesh
    v2 = np.vstack([v, [[9.0, 9.0, 9.0]]])  # unreferenced vertex
    with pytest.raises(ValueError, match="not referenced"):
        LaplacianDeformer(v2, f, [0, 1], 0.6)
    # a second component without any handle: singular system
    v3 = np.vstack([v, v + 5.0])
    f3 = np.vstack([f, f + len(v)])
    with pytest.raises(ValueError, match="no handle"):
        LaplacianDeformer(v3, f3, [0, 1], 0.6)
    ok = LaplacianDeformer(v3, f3, [0, len(v) + 1], 0.6)  # one handle per component is enough
    assert np.abs(ok.deform(v3[[0, len(v) + 1]]) - v3).max() < 1e-12
    with pytest.raises(ValueError, match="repeated vertex"):
        LaplacianDeformer(v, np.vstack([f, [[0, 0, 1]]]), [0, 1], 0.6)
    with pytest.raises(ValueError, match="outside"):
        LaplacianDeformer(v, np.vstack([f, [[0, 1, len(v)]]]), [0, 1], 0.6)
    vn = v.copy()
    vn[3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        LaplacianDeformer(vn, f, [0, 1], 0.6)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        LaplacianDeformer(v[:, :2], f, [0, 1], 0.6)
    # zero-area (collinear) triangles break cotangent weights: clear error, not NaN vertices
    vc = v.copy()
    vc[:, 1] = 0.0
    vc[:, 2] = 0.0
    with pytest.raises(ValueError, match="cotangent"):
        LaplacianDeformer(vc, f, [0, 1], 0.6, laplacian="cotangent")


@pytest.mark.parametrize("weight, energy", [(0.6, "laplacian"), (3.0, "biharmonic")])
def test_cupy_path_matches_cpu(mesh, weight, energy):
    cp = pytest.importorskip("cupy")
    v, f = mesh
    h = np.arange(0, len(v), 6)
    mu = v[h] + 0.1
    mu[2] -= 0.3
    cpu = LaplacianDeformer(v, f, h, weight, energy=energy).deform(mu)
    gpu = LaplacianDeformer(cp.asarray(v), f, h, weight, energy=energy).deform(cp.asarray(mu))
    assert np.abs(cp.asnumpy(gpu) - cpu).max() < 1e-6


# -- medium_stage: the correspondence step ------------------------------------------------------------

from geomfit.laplacian import medium_stage  # noqa: E402


def _rot(yaw, pitch):
    cy, sy, cp, spi = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -spi], [0, spi, cp]])
    return Ry @ Rx


def _screen(v, R, s, t, H):
    rv = s * v @ R.T
    return np.stack([rv[:, 0] + t[0], H - (rv[:, 1] + t[1]), rv[:, 2]], 1)


def reference_index_map(v, f, R, s, t, H, W):
    """Brute-force index map: front-most triangle at each pixel centre, then its nearest vertex."""
    p = _screen(v, R, s, t, H)
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    q = np.stack([jj.ravel(), ii.ravel()], 1)
    a, b, c = p[f[:, 0]], p[f[:, 1]], p[f[:, 2]]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    dx = q[:, None, 0] - a[None, :, 0]
    dy = q[:, None, 1] - a[None, :, 1]
    l1 = (dx * (c[:, 1] - a[:, 1]) - dy * (c[:, 0] - a[:, 0])) / det
    l2 = ((b[:, 0] - a[:, 0]) * dy - (b[:, 1] - a[:, 1]) * dx) / det
    l0 = 1 - l1 - l2
    inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    z = l0 * a[:, 2] + l1 * b[:, 2] + l2 * c[:, 2]
    z = np.where(inside, z, -np.inf)
    tri = z.argmax(1)
    hit = np.isfinite(z.max(1))
    bary = np.stack([l0, l1, l2], 2)[np.arange(len(q)), tri]
    vid = f[tri, bary.argmax(1)]
    return np.where(hit, vid, -1).reshape(H, W)


class _Model:
    def __init__(self, faces, landmarks):
        self.faces, self.landmarks = faces, landmarks


@pytest.fixture(scope="module")
def scene():
    v, f = grid_mesh(k=24, seed=9)
    v = v * 50.0  # "mm"
    R, s, t, H, W = _rot(0.25, -0.1), 1.0, np.array([64.0, 60.0]), 128, 128
    return v, f, R, s, t, H, W


@pytest.fixture(scope="module")
def ref_map(scene):
    v, f, R, s, t, H, W = scene
    return reference_index_map(v, f, R, s, t, H, W)


def test_medium_stage_known_correspondences_recover_in_plane_warp(scene):
    v, f, R, s, t, H, W = scene
    rng = np.random.default_rng(10)
    lm_vertices = rng.choice(len(v), 68, replace=False)
    # truth = coarse + smooth warp parallel to the image plane (what 2D landmarks can see)
    cam = v @ R.T
    warp = np.zeros_like(v)
    g = np.exp(-((cam[:, 0] - 10) ** 2 + (cam[:, 1] + 5) ** 2) / (2 * 20.0 ** 2))
    warp[:, 0], warp[:, 1] = 4.0 * g, -3.0 * g
    truth = v + warp @ R  # back to model space
    lm2d = _screen(truth, R, s, t, H)[lm_vertices, :2]
    model = _Model(f, {i + 1: int(lm_vertices[i]) for i in range(68)})
    res = medium_stage(v, lm2d, (H, W), model=model, camera={"rotation": R, "scale": s, "translation": t},
                       weights=1.0, index_map=np.full((H, W), -1), method="paper")
    assert np.array_equal(res.handle_indices, lm_vertices)
    assert np.abs(res.targets - truth[lm_vertices]).max() < 1e-9  # mu = (x, y, z') is exact here
    err_c = np.sqrt(((v - truth) ** 2).sum(1).mean())
    err_m = np.sqrt(((res.vertices - truth) ** 2).sum(1).mean())
    assert err_m < 0.5 * err_c


def test_medium_stage_index_map_lookup(scene, ref_map):
    v, f, R, s, t, H, W = scene
    imap = ref_map
    rng = np.random.default_rng(11)
    lm2d = rng.uniform(0, W, (200, 2))
    res = medium_stage(v, lm2d, (H, W), faces=f, camera={"rotation": R, "scale": s, "translation": t},
                       index_map=imap, method="paper")
    li = res.landmark_index
    # handles are the index-map vertices at the landmark pixels, first landmark wins a shared vertex
    look = imap[np.floor(lm2d[:, 1]).astype(int), np.floor(lm2d[:, 0]).astype(int)]
    assert np.array_equal(res.handle_indices, look[li])
    assert set(np.flatnonzero(look < 0)) <= set(res.dropped.tolist())
    assert len(li) + len(res.dropped) == len(lm2d) and len(np.unique(res.handle_indices)) == len(li)
    # targets project onto the landmarks at the vertex's own depth
    scr = _screen(res.targets, R, s, t, H)
    assert np.abs(scr[:, :2] - lm2d[li]).max() < 1e-9
    assert np.abs(scr[:, 2] - _screen(v, R, s, t, H)[res.handle_indices, 2]).max() < 1e-9
    assert np.allclose(res.weights, 0.1)
    # the returned mesh is the deformer's solution for those handles
    again = LaplacianDeformer(v, f, res.handle_indices, res.weights).deform(res.targets)
    assert np.abs(again - res.vertices).max() < 1e-12


def test_medium_stage_rasterizer_matches_reference_map(scene, ref_map):
    render = pytest.importorskip("geomfit.render")
    v, f, R, s, t, H, W = scene
    imap = ref_map
    got = np.asarray(render.rasterize(_screen(v, R, s, t, H), f, H, W).vertex_index)
    assert (got == imap).mean() > 0.99  # ties on shared edges may differ
    lm2d = np.random.default_rng(12).uniform(20, 100, (68, 2))
    a = medium_stage(v, lm2d, (H, W), faces=f, camera={"rotation": R, "scale": s, "translation": t})
    b = medium_stage(v, lm2d, (H, W), faces=f, camera={"rotation": R, "scale": s, "translation": t},
                     index_map=got)
    assert np.array_equal(a.handle_indices, b.handle_indices)


def test_medium_stage_bad_input(scene):
    v, f, R, s, t, H, W = scene
    cam = {"rotation": R, "scale": s, "translation": t}
    imap = np.full((H, W), -1)
    with pytest.raises(ValueError, match="no landmark"):
        medium_stage(v, np.array([[5.0, 5.0]]), (H, W), faces=f, camera=cam, index_map=imap)
    with pytest.raises(ValueError, match="NaN"):
        medium_stage(v, np.array([[np.nan, 5.0]]), (H, W), faces=f, camera=cam, index_map=imap)
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        medium_stage(v, np.zeros((4, 3)), (H, W), faces=f, camera=cam, index_map=imap)
    with pytest.raises(ValueError, match="camera"):
        medium_stage(v, np.zeros((4, 2)), (H, W), faces=f)
    with pytest.raises(ValueError, match="index_map"):
        medium_stage(v, np.zeros((4, 2)), (H, W), faces=f, camera=cam, index_map=np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="scale"):
        medium_stage(v, np.zeros((4, 2)), (H, W), faces=f, camera=dict(cam, scale=-1.0), index_map=imap)


def test_medium_stage_surrey_model_end_to_end(sfm_dir):
    """Real model: coarse = SFM mean, truth = mean + in-plane warp; 68 landmarks via model map + raster."""
    from types import SimpleNamespace

    from geomfit.io import load_model

    model = load_model(sfm_dir / "sfm_shape_3448.bin", landmarks=sfm_dir / "ibug_to_sfm.txt")
    v = np.asarray(model.mean, float)
    R, s, H, W = _rot(0.15, 0.05), 2.0, 512, 512
    t = np.array([256.0, 256.0])
    cam = v @ R.T
    g = np.exp(-((cam[:, 0] - 20) ** 2 + (cam[:, 1] + 30) ** 2) / (2 * 30.0 ** 2))  # mouth-ish region
    warp = np.stack([3.0 * g, 4.0 * g, 0 * g], 1)
    truth = v + warp @ R
    ids = sorted(model.landmarks)
    lm2d = np.full((68, 2), -1e3)  # landmarks without a model vertex: off-image, dropped
    lm2d[np.array(ids) - 1] = _screen(truth, R, s, t, H)[[model.landmarks[i] for i in ids], :2]
    coarse = SimpleNamespace(vertices=v, rotation=R, scale=s, translation=t, image_size=np.array([H, W]),
                             model=model)
    res = medium_stage(coarse, lm2d, method="paper")
    assert set(res.handle_indices.tolist()) == {model.landmarks[i] for i in ids}
    assert len(res.dropped) == 68 - len(ids)
    err_c = np.sqrt(((v - truth) ** 2).sum(1).mean())
    err_m = np.sqrt(((res.vertices - truth) ** 2).sum(1).mean())
    assert err_m < 0.5 * err_c


# -- renamed keyword, bi-Laplacian energy, fold count ------------------------------------------------

from geomfit.laplacian import estimate_landmark_noise, folded_triangles  # noqa: E402


def test_deprecated_weights_keyword_still_works(mesh):
    v, f = mesh
    h = np.arange(0, len(v), 9)
    mu = v[h] + 0.1
    new = LaplacianDeformer(v, f, h, 0.6, laplacian="cotangent").deform(mu)
    with pytest.warns(DeprecationWarning, match="'weights' is deprecated, use 'laplacian'"):
        old = LaplacianDeformer(v, f, h, 0.6, weights="cotangent").deform(mu)
    assert np.array_equal(new, old)
    with pytest.warns(DeprecationWarning, match="laplacian_weights"):
        old2 = laplacian_deform(v, f, h, mu, 0.6, laplacian_weights="cotangent")
    assert np.array_equal(new, old2)
    with pytest.raises(TypeError, match="laplacian"):
        LaplacianDeformer(v, f, h, 0.6, laplacian="uniform", weights="uniform")
    with pytest.raises(ValueError, match="energy"):
        LaplacianDeformer(v, f, h, 0.6, energy="harmonic")


def test_biharmonic_matches_igl_operators_and_scipy(mesh):
    """energy='biharmonic' = C^T (M/mean M)^-1 C + W with libigl's cotmatrix/massmatrix, solved by SciPy."""
    igl = pytest.importorskip("igl")
    v, f = mesh
    rng = np.random.default_rng(3)
    h = rng.choice(len(v), 14, replace=False)
    w = rng.uniform(0.5, 5.0, 14)
    mu = v[h] + 0.2 * rng.standard_normal((14, 3))
    C = sp.csc_matrix(igl.cotmatrix(v, f))
    m = sp.csc_matrix(igl.massmatrix(v, f, igl.MASSMATRIX_TYPE_VORONOI)).diagonal()
    Q = C.T @ sp.diags(m.mean() / m) @ C
    n = len(v)
    A = (Q + sp.csc_matrix((w, (h, h)), shape=(n, n))).tocsc()
    rhs = np.zeros((n, 3))
    rhs[h] = w[:, None] * (mu - v[h])
    ref = v + spla.spsolve(A, rhs)
    dfm = LaplacianDeformer(v, f, h, w, energy="biharmonic")
    got = dfm.deform(mu)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8
    # it is the minimiser of its energy: random perturbations only increase it
    e0 = dfm.energy(got, mu)
    for _ in range(5):
        assert dfm.energy(got + 1e-3 * rng.standard_normal(got.shape), mu) > e0
    # rest targets give back the mesh; a rigid translation of all handles translates... nearly: the
    # bi-Laplacian of a constant displacement is zero, so the mesh translates exactly
    assert np.abs(dfm.deform(v[h]) - v).max() < 1e-12
    assert np.abs(dfm.deform(v[h] + [0.3, -0.2, 0.1]) - (v + [0.3, -0.2, 0.1])).max() < 1e-9


def test_folded_triangles_counts_turned_normals():
    k = 8
    x, y = np.meshgrid(np.arange(k, dtype=float), np.arange(k, dtype=float))
    v = np.stack([x.ravel(), y.ravel(), np.zeros(k * k)], 1)
    idx = np.arange(k * k).reshape(k, k)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    p = idx[3, 3]
    for height, want in ((0.5, 0), (10.0, 6)):  # atan(10) = 84 deg at each of the 6 incident faces
        u = v.copy()
        u[p, 2] = height
        assert folded_triangles(v, u, f) == want
        assert folded_triangles(v, u, f, max_angle_deg=20.0) == 6  # atan(0.5) = 27 deg
    u = v.copy()
    u[p, :2] += [3.0, 3.0]  # pushed across its neighbours in the plane: incident triangles flip (180 deg)
    flipped = folded_triangles(v, u, f)
    nrm = lambda w: np.cross(w[f[:, 1]] - w[f[:, 0]], w[f[:, 2]] - w[f[:, 0]])  # noqa: E731
    assert flipped == int(((nrm(v) * nrm(u)).sum(1) < 0).sum()) > 0
    with pytest.raises(ValueError, match="same shape"):
        folded_triangles(v, v[:-1], f)
    with pytest.raises(ValueError, match="max_angle_deg"):
        folded_triangles(v, v, f, max_angle_deg=0)


def test_estimate_landmark_noise_recovers_sigma():
    rng = np.random.default_rng(4)
    for sigma in (0.5, 3.0):
        r = sigma * rng.standard_normal((4000, 2))
        r[:40] += 50.0  # a few large, real residuals do not move the estimate
        assert abs(estimate_landmark_noise(r) / sigma - 1) < 0.05
    with pytest.raises(ValueError, match="finite"):
        estimate_landmark_noise(np.array([[np.nan, 1.0]]))


# -- medium_stage, method="robust" ---------------------------------------------------------------------

def test_robust_shrinks_residuals_by_the_noise_level(scene):
    """Residuals below shrink * noise move nothing; larger ones move by |r| - shrink * noise, in the
    image plane, at the vertex's own depth."""
    v, f, R, s, t, H, W = scene
    rng = np.random.default_rng(13)
    # handles on the front-facing middle of the patch, well inside the silhouette
    scr = _screen(v, R, s, t, H)
    cand = np.flatnonzero((np.abs(scr[:, 0] - 64) < 25) & (np.abs(scr[:, 1] - 64) < 25))
    lmv = rng.choice(cand, 20, replace=False)
    ids = np.arange(18, 38)  # iBUG numbers outside the jaw contour (those are matched to the silhouette)
    model = _Model(f, {int(ids[i]): int(lmv[i]) for i in range(20)})
    cam = {"rotation": R, "scale": s, "translation": t}
    off = rng.standard_normal((20, 2))
    off *= (0.5 / np.linalg.norm(off, axis=1))[:, None]  # |r| = 0.5 px
    lm = scr[lmv, :2] + off
    res = medium_stage(v, lm, (H, W), model=model, camera=cam, landmark_ids=ids, noise_px=0.3,
                       shrink=2.0)
    assert np.array_equal(res.handle_indices, lmv) and res.method == "robust"
    assert np.allclose(res.residuals_px, off, atol=1e-9)
    assert np.all(res.displacement_px == 0) and np.abs(res.vertices - v).max() < 1e-12
    big = off * 10.0  # |r| = 5 px -> moved by 5 - 0.6 = 4.4 px along r
    res = medium_stage(v, scr[lmv, :2] + big, (H, W), model=model, camera=cam, landmark_ids=ids,
                       noise_px=0.3, shrink=2.0)
    assert np.all(res.trust == 1.0)  # front-facing, unoccluded
    assert np.allclose(res.displacement_px, big * (4.4 / 5.0), atol=1e-9)
    ts = _screen(res.targets, R, s, t, H)
    assert np.allclose(ts[:, :2], scr[lmv, :2] + res.displacement_px, atol=1e-9)
    assert np.allclose(ts[:, 2], scr[lmv, 2], atol=1e-9)
    # the noise level is estimated from the residuals when not given
    res = medium_stage(v, scr[lmv, :2] + off, (H, W), model=model, camera=cam, landmark_ids=ids)
    assert res.noise_px == pytest.approx(0.5 / np.sqrt(2 * np.log(2)))
    assert np.all(res.displacement_px == 0)


def test_robust_trust_is_zero_for_hidden_and_edge_on_handles():
    """Two parallel sheets, the front one hiding part of the back one, plus a sheet seen edge-on."""
    def sheet(k, x0, y0, size, z, tilt_deg=0.0):
        x, y = np.meshgrid(np.linspace(0, size, k), np.linspace(0, size, k))
        a = np.deg2rad(tilt_deg)  # rotate about the y axis: normal turns away from the viewer (+z)
        xs = x * np.cos(a)
        zs = z - x * np.sin(a)
        vv = np.stack([x0 + xs.ravel(), y0 + y.ravel(), zs.ravel()], 1)
        idx = np.arange(k * k).reshape(k, k)
        a_, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
        return vv, np.concatenate([np.stack([a_, b, d], 1), np.stack([a_, d, c], 1)])

    parts = [sheet(9, 10, 10, 40, 0.0), sheet(9, 20, 20, 20, 10.0), sheet(9, 70, 10, 40, 0.0, tilt_deg=85.0)]
    vs, fs, off = [], [], 0
    for vv, ff in parts:
        vs.append(vv)
        fs.append(ff + off)
        off += len(vv)
    v, f = np.concatenate(vs), np.concatenate(fs)
    back_hidden = np.flatnonzero((np.abs(v[:, 0] - 30) < 8) & (np.abs(v[:, 1] - 30) < 8) & (v[:, 2] == 0))[:3]
    back_open = np.flatnonzero((v[:, 0] < 15) & (v[:, 1] < 15) & (v[:, 2] == 0))[:3]
    front = np.arange(81, 81 + 81)[[30, 40, 50]]
    edge_on = np.arange(162, 243)[[30, 40, 50]]
    lmv = np.r_[back_hidden, back_open, front, edge_on]
    H = W = 128
    cam = {"rotation": np.eye(3), "scale": 1.0, "translation": np.zeros(2)}
    scr = _screen(v, np.eye(3), 1.0, np.zeros(2), H)
    lm = scr[lmv, :2] + [3.0, 0.0]
    ids = np.arange(18, 18 + len(lmv))  # outside the jaw contour
    model = _Model(f, {int(ids[i]): int(lmv[i]) for i in range(len(lmv))})
    res = medium_stage(v, lm, (H, W), model=model, camera=cam, landmark_ids=ids,
                       noise_px=0.0)
    tr = dict(zip(res.handle_indices.tolist(), res.trust.tolist()))
    assert all(tr[i] == 0.0 for i in back_hidden) and all(tr[i] == 0.0 for i in edge_on)
    assert all(tr[i] == 1.0 for i in back_open) and all(tr[i] == 1.0 for i in front)
    moved = dict(zip(res.handle_indices.tolist(), np.abs(res.displacement_px).sum(1).tolist()))
    assert all(moved[i] == 0.0 for i in np.r_[back_hidden, edge_on])
    assert all(moved[i] == pytest.approx(3.0) for i in np.r_[back_open, front])
    # the other winding (normals pointing into the surface) gives the same trust
    res2 = medium_stage(v, lm, (H, W), model=_Model(f[:, ::-1], model.landmarks), camera=cam, landmark_ids=ids,
                        noise_px=0.0)
    assert np.array_equal(res2.trust, res.trust)


def test_robust_jaw_contour_landmark_matches_the_silhouette():
    """A jaw-contour landmark (no model vertex) 4 px left of a face-on sheet's left edge: its handle is a
    vertex on that edge and its residual points straight out of the outline."""
    k = 21
    x, y = np.meshgrid(np.linspace(30.0, 90.0, k), np.linspace(30.0, 90.0, k))
    v = np.stack([x.ravel(), y.ravel(), np.zeros(k * k)], 1)
    idx = np.arange(k * k).reshape(k, k)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    H = W = 128
    cam = {"rotation": np.eye(3), "scale": 1.0, "translation": np.zeros(2)}
    centre = idx[k // 2, k // 2]
    model = _Model(f, {30: int(centre)})
    lm = np.array([[30.0 - 4.0, H - 60.2], [60.0, H - 60.0]])  # iBUG 3 (jaw), iBUG 30 on its vertex
    res = medium_stage(v, lm, (H, W), model=model, camera=cam, landmark_ids=np.array([3, 30]), noise_px=0.0)
    j = int(np.flatnonzero(res.landmark_index == 0)[0])
    assert res.silhouette[j] and not res.silhouette[1 - j]
    assert v[res.handle_indices[j], 0] == 30.0  # a vertex of the left edge
    rx, ry = res.residuals_px[j]
    assert -4.5 <= rx <= -4.0 and abs(ry) <= 0.5  # to the nearest outline pixel centre
    assert np.allclose(res.displacement_px[j], res.residuals_px[j])  # noise 0: moved fully
    assert res.vertices[res.handle_indices[j], 0] < 30.0  # the outline moves out towards the landmark


def test_robust_bad_options(scene):
    v, f, R, s, t, H, W = scene
    cam = {"rotation": R, "scale": s, "translation": t}
    lm = np.full((4, 2), 60.0) + np.arange(4)[:, None]
    for kw, msg in ((dict(method="exact"), "method"), (dict(noise_px=-1.0), "noise_px"),
                    (dict(shrink=np.nan), "shrink"), (dict(handle_scale=0.0), "handle_scale")):
        with pytest.raises(ValueError, match=msg):
            medium_stage(v, lm, (H, W), faces=f, camera=cam, **kw)


# -- synthetic Surrey faces (issue 17): never worse than coarse, no folds, improves out of span --------

@pytest.fixture(scope="module")
def sfm_model(sfm_dir):
    from geomfit.data import resolve_model

    return resolve_model("sfm")  # found through GEOMFIT_DATA (the sfm_dir fixture checked it is there)


def _synthetic_cases(model, spec, seed):
    import medium_synth as ms
    from geomfit.fitting import fit_landmarks

    rng = np.random.default_rng(seed)
    out = []
    for yaw, sig in spec:
        v = ms.sample_face(model, rng)
        cam = ms.make_camera(yaw, rng.uniform(-5, 5), vertices=v)
        lm = ms.face_landmarks(model, v, cam) + sig * rng.standard_normal((68, 2))
        out.append((v, lm, fit_landmarks(model, lm, (256, 256))))
    return out


def test_robust_medium_never_worse_than_coarse_on_synthetic_faces(sfm_model):
    import medium_synth as ms

    spec = [(0, 0.0), (0, 1.5), (0, 3.0), (20, 0.5), (-20, 2.5), (35, 1.5), (-35, 3.0), (45, 0.5), (-45, 3.0)]
    ratios = {"robust": [], "paper": []}
    folds = {"robust": 0, "paper": 0}
    for v, lm, co in _synthetic_cases(sfm_model, spec, seed=21):
        cv = np.asarray(co.vertices)
        ec = ms.shape_errors(sfm_model, cv, v)["inner"]
        for meth in ratios:
            mv = medium_stage(co, lm, method=meth).vertices
            ratios[meth].append(ms.shape_errors(sfm_model, mv, v)["inner"] / ec)
            folds[meth] += folded_triangles(cv, mv, sfm_model.faces)
    r = np.array(ratios["robust"])
    assert r.mean() <= 1.0 and r.max() <= 1.05, np.round(r, 3)
    assert folds["robust"] == 0
    # the same cases do separate the methods: the paper's medium stage fits the noise
    assert np.mean(ratios["paper"]) > 1.05 and folds["paper"] > 0


def test_robust_medium_improves_out_of_span_change(sfm_model):
    """Nose tip 5 mm lower and chin 6 mm lower than any model face: the landmarks see it, the medium
    stage must carry part of it (error over the changed region)."""
    import medium_synth as ms
    from geomfit.fitting import fit_landmarks

    rng = np.random.default_rng(31)
    ratios = []
    for yaw in (0, -30):
        v0 = ms.sample_face(sfm_model, rng)
        nose, chin = v0[sfm_model.landmarks[34]], v0[sfm_model.landmarks[58]] + [0.0, -15.0, 0.0]
        v = ms.local_offset(ms.local_offset(v0, nose, 12.0, [0, -5.0, 0]), chin, 18.0, [0, -6.0, 0])
        g = lambda c, r: np.exp(-((v0 - c) ** 2).sum(1) / (2 * r ** 2))  # noqa: E731
        region = np.flatnonzero((g(nose, 12.0) > 0.3) | (g(chin, 18.0) > 0.3))
        cam = ms.make_camera(yaw, 0.0, vertices=v)
        lm = ms.face_landmarks(sfm_model, v, cam) + 0.5 * rng.standard_normal((68, 2))
        co = fit_landmarks(sfm_model, lm, (256, 256))
        res = medium_stage(co, lm)
        ec = ms.shape_errors(sfm_model, np.asarray(co.vertices), v, region)["region"]
        em = ms.shape_errors(sfm_model, res.vertices, v, region)["region"]
        ratios.append(em / ec)
        assert folded_triangles(np.asarray(co.vertices), res.vertices, sfm_model.faces) == 0
        # the paper's method also improves here (no noise to fit): the test measures a real change
        paper = medium_stage(co, lm, method="paper").vertices
        assert ms.shape_errors(sfm_model, paper, v, region)["region"] < ec
    # measured 0.995 and 0.963 (shrink 2.5): the coarse fit absorbs part of the change, and only the
    # residuals above 2.5x the noise level move the mesh (docs/medium.md, "Out of the model's span")
    assert max(ratios) < 1.0 and np.mean(ratios) < 0.98, ratios


def test_pipeline_reports_folds_per_stage_and_medium_has_none(data):
    """The shared photo with its hand landmarks: the robust medium stage folds
    nothing, and report.json's counts are those of folded_triangles on the stage meshes."""
    img, pts = data / "images" / "image_0010.png", data / "images" / "image_0010.pts"
    if not (img.is_file() and pts.is_file()):
        pytest.skip(f"{img} or {pts} not found")
    pytest.importorskip("geomfit.data").resolve_model("sfm")
    from geomfit.pipeline import reconstruct

    rec = reconstruct(img, landmarks=pts, fine=False, max_side=256)
    folds = rec.diagnostics["folded_triangles"]
    assert folds["medium"] == folded_triangles(rec.coarse.vertices, rec.medium.vertices, rec.coarse.faces) == 0
    assert folds["coarse"] == folded_triangles(rec.model.mean, rec.coarse.vertices, rec.coarse.faces)
    assert rec.diagnostics["medium"]["method"] == "robust" and rec.diagnostics["medium"]["noise_px"] > 0
