"""Tests of the medium stage's Laplacian deformation (seed 004 section 3.3, Eq. 2-3)."""
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
    got = laplacian_deform(v, f, h, mu, 0.6, laplacian_weights="cotangent")
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
        out = LaplacianDeformer(v, f, h, 0.6, weights=kind).deform(v[h])
        assert np.abs(out - v).max() < 1e-12


def test_translation_translates_mesh(mesh):
    v, f = mesh
    h = np.arange(3, len(v), 9)
    t = np.array([0.3, -1.2, 2.5])
    for kind in ("uniform", "cotangent"):
        out = LaplacianDeformer(v, f, h, [0.1, 0.6] * (len(h) // 2) + [0.6] * (len(h) % 2), weights=kind).deform(v[h] + t)
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
        LaplacianDeformer(v, f, [1, 2], 0.6, weights="mean")


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
        LaplacianDeformer(vc, f, [0, 1], 0.6, weights="cotangent")


def test_cupy_path_matches_cpu(mesh):
    cp = pytest.importorskip("cupy")
    v, f = mesh
    h = np.arange(0, len(v), 6)
    mu = v[h] + 0.1
    mu[2] -= 0.3
    cpu = LaplacianDeformer(v, f, h, 0.6).deform(mu)
    gpu = LaplacianDeformer(cp.asarray(v), f, h, 0.6).deform(cp.asarray(mu))
    assert np.abs(cp.asnumpy(gpu) - cpu).max() < 1e-6
