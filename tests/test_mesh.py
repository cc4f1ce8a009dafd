import numpy as np
import pytest
import scipy.sparse as sp
import trimesh

from geomfit import mesh as gm


def grid(n=6, jitter=0.0, seed=0):
    """Regular triangulated n x n grid in the z=0 plane (optionally jittered interior)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    v = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], 1)
    interior = np.zeros((n, n), bool)
    interior[1:-1, 1:-1] = True
    interior = interior.ravel()
    v[interior, :2] += jitter * rng.uniform(-0.3, 0.3, (interior.sum(), 2))
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f, interior


def sphere(r=2.0, sub=4):
    m = trimesh.creation.icosphere(subdivisions=sub, radius=r)
    return np.asarray(m.vertices), np.asarray(m.faces)


def test_uniform_laplacian_matches_definition_and_kills_affine():
    v, f, interior = grid(7)
    L = gm.uniform_laplacian(f, len(v))
    assert sp.isspmatrix_csr(L)
    # independent construction: neighbours from the face list with Python sets
    nb = [set() for _ in range(len(v))]
    for t in f:
        for i in t:
            nb[i].update(int(j) for j in t if j != i)
    Ld = np.eye(len(v))
    for i, s in enumerate(nb):
        for j in s:
            Ld[i, j] -= 1.0 / len(s)
    np.testing.assert_allclose(L.toarray(), Ld, atol=1e-15)
    # on a regular grid the umbrella operator annihilates affine functions in the interior
    g = 0.7 * v[:, 0] - 1.3 * v[:, 1] + 4.0
    assert np.abs((L @ g)[interior]).max() < 1e-12
    assert np.abs(L @ g)[~interior].max() > 1e-3  # ... but not on the boundary


def test_adjacency_pattern():
    v, f, _ = grid(4)
    A = gm.vertex_adjacency(f, len(v))
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0 and set(np.unique(A.data)) == {1.0}
    e = trimesh.Trimesh(v, f, process=False).edges_unique
    assert A.nnz == 2 * len(e)


def test_cotangent_laplacian_affine_and_igl():
    v, f, interior = grid(7, jitter=1.0)
    L = gm.cotangent_laplacian(v, f)
    g = 0.7 * v[:, 0] - 1.3 * v[:, 1] + 4.0
    assert np.abs((L @ g)[interior]).max() < 1e-12
    igl = pytest.importorskip("igl")
    vs, fs = sphere(1.3, 2)
    np.testing.assert_allclose(gm.cotangent_laplacian(vs, fs).toarray(),
                               igl.cotmatrix(vs, fs.astype(np.int64)).toarray(), atol=1e-10)


def test_sphere_normals_and_curvature():
    r = 2.0
    v, f = sphere(r, 4)
    n = gm.vertex_normals(v, f)
    np.testing.assert_allclose(n, v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-2)  # < 0.6 deg
    H = gm.mean_curvature(v, f)
    np.testing.assert_allclose(H, 1.0 / r, rtol=2e-2)
    # flipping the orientation flips normals and the sign of H
    Hf = gm.mean_curvature(v, f[:, ::-1])
    np.testing.assert_allclose(Hf, -H, atol=1e-12)


def test_vertex_normals_batched_equals_loop():
    v, f = sphere(1.0, 1)
    rng = np.random.default_rng(1)
    vb = v[None] + 0.05 * rng.standard_normal((3,) + v.shape)
    nb = gm.vertex_normals(vb, f)
    for k in range(3):
        np.testing.assert_allclose(nb[k], gm.vertex_normals(vb[k], f), atol=1e-14)
    # area weighting: explicit accumulation of cross products (twice the face areas)
    fnw = np.cross(vb[0][f[:, 1]] - vb[0][f[:, 0]], vb[0][f[:, 2]] - vb[0][f[:, 0]])
    acc = np.zeros_like(v)
    for k in range(3):
        np.add.at(acc, f[:, k], fnw)
    np.testing.assert_allclose(nb[0], acc / np.linalg.norm(acc, axis=1, keepdims=True), atol=1e-12)


def test_trimesh_round_trip_and_save(tmp_path):
    v, f = sphere(1.0, 1)
    colors = np.random.default_rng(0).uniform(0, 1, (len(v), 3))
    tm = gm.to_trimesh(v, f, colors)
    v2, f2 = gm.from_trimesh(tm)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(f2, f)
    for ext in ("obj", "ply"):
        p = gm.save_mesh(tmp_path / f"m.{ext}", v, f, colors=colors)
        back = trimesh.load(p, process=False)
        np.testing.assert_allclose(back.vertices, v, atol=1e-6)
        np.testing.assert_array_equal(back.faces, f)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.obj", "m.ply"]  # no temp files left
    with pytest.raises(ValueError, match="unsupported"):
        gm.save_mesh(tmp_path / "m.stl", v, f)


def test_subdivide_preserves_surface():
    v, f = sphere(1.0, 0)
    v2, f2 = gm.subdivide(v, f, 2)
    assert f2.shape[0] == 16 * f.shape[0]
    np.testing.assert_array_equal(v2[: len(v)], v)
    tm, tm2 = trimesh.Trimesh(v, f, process=False), trimesh.Trimesh(v2, f2, process=False)
    assert tm2.is_watertight and tm2.is_winding_consistent
    np.testing.assert_allclose(tm2.area, tm.area, rtol=1e-12)
    np.testing.assert_allclose(tm2.volume, tm.volume, rtol=1e-12)


def test_bad_input():
    v, f = sphere(1.0, 0)
    with pytest.raises(ValueError, match="vertex"):
        gm.vertex_normals(v, f + 100)
    with pytest.raises(ValueError, match=r"\(F, 3\)"):
        gm.uniform_laplacian(f[:, :2])
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gm.mean_curvature(bad, f)
    with pytest.raises(TypeError):
        gm.vertex_adjacency(f + 0.5)


def test_mass_matrix_sums_to_area_and_matches_igl():
    v, f = sphere(1.0, 2)
    rng = np.random.default_rng(3)
    v = v * rng.uniform(0.7, 1.3, (1, 3))  # ellipsoid: some obtuse triangles
    area = trimesh.Trimesh(v, f, process=False).area
    for kind in ("voronoi", "barycentric"):
        np.testing.assert_allclose(gm.mass_matrix(v, f, kind).diagonal().sum(), area, rtol=1e-12)
    igl = pytest.importorskip("igl")
    M = igl.massmatrix(v, f.astype(np.int64), igl.MASSMATRIX_TYPE_VORONOI)
    np.testing.assert_allclose(gm.mass_matrix(v, f).diagonal(), M.diagonal(), rtol=1e-10)
