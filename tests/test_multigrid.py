"""The screened-Poisson grid solver (geomfit.multigrid) against SciPy's sparse direct solve and an
explicitly assembled matrix, its multigrid pieces against their matrix definitions, and the CUDA
kernels (under Numba's simulator) against the CPU kernels."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from geomfit import backend, multigrid as mg_mod, rtv
from geomfit.kernels import multigrid as g


def assemble(diag, wx, wy):
    """Dense-by-loops assembly of diag(D) + L_w (row-major pixel order)."""
    H, W = diag.shape
    idx = lambda i, j: i * W + j  # noqa: E731
    A = sp.lil_matrix((H * W, H * W))
    for i in range(H):
        for j in range(W):
            A[idx(i, j), idx(i, j)] += diag[i, j]
    for i in range(H):
        for j in range(W - 1):
            p, q, w = idx(i, j), idx(i, j + 1), wx[i, j]
            A[p, p] += w; A[q, q] += w; A[p, q] -= w; A[q, p] -= w  # noqa: E702
    for i in range(H - 1):
        for j in range(W):
            p, q, w = idx(i, j), idx(i + 1, j), wy[i, j]
            A[p, p] += w; A[q, q] += w; A[p, q] -= w; A[q, p] -= w  # noqa: E702
    return A.tocsc()


def _random_system(rng, H, W, C=None, spread=3.0):
    D = rng.random((H, W))
    wx = 10 ** rng.uniform(-spread, spread, (H, W - 1))
    wy = 10 ** rng.uniform(-spread, spread, (H - 1, W))
    b = rng.standard_normal((H, W) if C is None else (H, W, C))
    return D, wx, wy, b


@pytest.mark.parametrize("H,W,C", [(37, 53, None), (40, 31, 3), (1, 300, 2), (300, 1, None), (2, 2, None),
                                   (64, 64, 1)])
def test_solver_matches_spsolve(H, W, C):
    rng = np.random.default_rng(H * 1000 + W)
    D, wx, wy, b = _random_system(rng, H, W, C)
    x, info = mg_mod.solve_screened_poisson(D, wx, wy, b, tol=1e-12, return_info=True)
    A = assemble(D, wx, wy)
    ref = spla.spsolve(A, b.reshape(H * W, -1)).reshape(b.shape)
    assert x.shape == b.shape
    assert np.all(info["residual"] <= 1e-12)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def test_solver_rtv_system_and_warm_start():
    rng = np.random.default_rng(3)
    img = np.kron(rng.random((6, 8)), np.ones((12, 12))) + 0.05 * rng.standard_normal((72, 96))
    wx, wy = rtv.rtv_weights(img)
    D = np.ones_like(img)
    x, info = mg_mod.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, tol=1e-10, return_info=True)
    ref = spla.spsolve(assemble(D, 0.01 * wx, 0.01 * wy), img.ravel()).reshape(img.shape)
    assert np.abs(x - ref).max() < 1e-8
    assert info["iterations"] <= 20  # multigrid-preconditioned: few iterations (CG alone needs hundreds)
    x2, info2 = mg_mod.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, x0=ref, tol=1e-10, return_info=True)
    assert info2["iterations"] <= 1
    np.testing.assert_allclose(x2, ref, atol=1e-9)


def test_solver_zero_diag_regions_and_zero_rows():
    rng = np.random.default_rng(4)
    H, W = 20, 24
    D, wx, wy, b = _random_system(rng, H, W, 2, spread=1)
    D[:, :12] = 0.0  # screened only on the right half, still one connected region
    D[5, 5] = 0.0
    wx[7, 10:12] = 0.0  # pixel (7, 11): no edges and D = 0 -> zero row
    wy[6:8, 11] = 0.0
    D[7, 11] = 0.0
    b[7, 11] = 0.0
    x = mg_mod.solve_screened_poisson(D, wx, wy, b, tol=1e-12)
    keep = np.ones(H * W, bool)
    keep[7 * W + 11] = False
    A = assemble(D, wx, wy)[keep][:, keep]
    ref = spla.spsolve(A.tocsc(), b.reshape(H * W, 2)[keep])
    np.testing.assert_allclose(x.reshape(H * W, 2)[keep], ref, atol=1e-8 * np.abs(ref).max())
    assert np.all(x[7, 11] == 0)
    b[7, 11] = 1.0
    with pytest.raises(ValueError, match="zero rows"):
        mg_mod.solve_screened_poisson(D, wx, wy, b)


def test_solver_bad_input():
    D = np.ones((5, 6))
    wx, wy, b = np.ones((5, 5)), np.ones((4, 6)), np.ones((5, 6))
    with pytest.raises(ValueError, match="wx must have shape"):
        mg_mod.solve_screened_poisson(D, np.ones((5, 6)), wy, b)
    with pytest.raises(ValueError, match="wy must have shape"):
        mg_mod.solve_screened_poisson(D, wx, np.ones((5, 6)), b)
    with pytest.raises(ValueError, match="rhs"):
        mg_mod.solve_screened_poisson(D, wx, wy, np.ones((6, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        mg_mod.solve_screened_poisson(D, -wx, wy, b)
    with pytest.raises(ValueError, match="NaN"):
        mg_mod.solve_screened_poisson(D, wx, wy, b * np.nan)
    with pytest.raises(ValueError, match="singular"):
        mg_mod.solve_screened_poisson(np.zeros((5, 6)), wx, wy, b)
    with pytest.raises(TypeError, match="array"):
        mg_mod.solve_screened_poisson(D, wx, wy, [1, 2])
    with pytest.raises(ValueError, match="x0"):
        mg_mod.solve_screened_poisson(D, wx, wy, b, x0=np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------
# rtv_smooth against a plain reference from the paper's equations
# ----------------------------------------------------------------------------------------------

def _explicit_P(Pw, Hc, Wc):
    H, W = Pw.shape[:2]
    P = np.zeros((H * W, Hc * Wc))
    for i in range(H):
        for j in range(W):
            for ci in range(2):
                for cj in range(2):
                    I, J = i // 2 + ci, j // 2 + cj
                    if Pw[i, j, ci, cj] != 0:
                        assert I < Hc and J < Wc
                        P[i * W + j, I * Wc + J] = Pw[i, j, ci, cj]
    return P


@pytest.mark.parametrize("H,W", [(7, 8), (8, 7), (9, 9)])
def test_multigrid_components_match_matrices(H, W):
    rng = np.random.default_rng(H + 10 * W)
    D, wx, wy, _ = _random_system(rng, H, W, spread=1)
    dA, inv = np.empty((H, W)), np.empty((H, W))
    g.diagonal(D, wx, wy, dA, inv)
    S = np.empty((3, 3, H, W))
    g.stencil_from_5pt(dA, wx, wy, S)
    A = assemble(D, wx, wy).toarray()
    np.testing.assert_allclose(mg_mod._dense_from_stencil(S), A, atol=1e-12)
    Pw = np.empty((H, W, 2, 2))
    g.interpolation(S, Pw)
    Hc, Wc = (H + 1) // 2, (W + 1) // 2
    P = _explicit_P(Pw, Hc, Wc)
    # coarse points are injected; Dendy's collapsed-stencil weight on a coarse row
    assert P[0, 0] == 1.0 and P[2 * W + 2, 1 * Wc + 1] == 1.0
    i, j = 2, 1
    k = i * W + j
    col = A[[k - W, k, k + W]].sum(axis=0)  # collapse the vertical direction
    np.testing.assert_allclose(Pw[i, j, 0, 0], -col[k - 1] / col[k], rtol=1e-12)
    Sc = np.empty((3, 3, Hc, Wc))
    g.galerkin(S, Pw, Sc)
    np.testing.assert_allclose(mg_mod._dense_from_stencil(Sc), P.T @ A @ P, atol=1e-10)
    # the 5-point specialisations used on the finest level agree with the generic kernels
    Pw5, Sc5 = np.empty_like(Pw), np.empty_like(Sc)
    g.interpolation5(dA, wx, wy, Pw5)
    g.galerkin5(dA, wx, wy, Pw5, Sc5)
    np.testing.assert_allclose(Pw5, Pw, atol=1e-14)
    np.testing.assert_allclose(Sc5, Sc, atol=1e-12)
    r = rng.random((H, W, 2))
    rc = np.empty((Hc, Wc, 2))
    g.restrict_p(Pw, r, rc)
    np.testing.assert_allclose(rc.reshape(-1, 2), P.T @ r.reshape(-1, 2), atol=1e-12)
    x = np.zeros((H, W, 2))
    e = rng.random((Hc, Wc, 2))
    g.prolong_p(Pw, x, e)
    np.testing.assert_allclose(x.reshape(-1, 2), P @ e.reshape(-1, 2), atol=1e-12)


@pytest.mark.parametrize("kind", ["box", "aggregation"])
def test_vcycle_is_symmetric_positive_definite(kind):
    # CG needs a symmetric positive definite preconditioner: check M on a basis
    rng = np.random.default_rng(8)
    H, W = 23, 19
    D, wx, wy, _ = _random_system(rng, H, W, spread=2)
    # (the box cycle runs in float32 by default; float64 here to check the algebra exactly)
    mg = mg_mod.BoxMultigrid(D, wx, wy, 1, dtype=np.float64) if kind == "box" else mg_mod.GridMultigrid(D, wx, wy, 1)
    assert len(mg.levels) >= 2
    n = H * W
    M = np.empty((n, n))
    for k in range(n):
        e = np.zeros((H, W, 1))
        e.flat[k] = 1.0
        M[:, k] = mg.vcycle(e).ravel()
    np.testing.assert_allclose(M, M.T, atol=1e-10 * np.abs(M).max())
    assert np.linalg.eigvalsh(0.5 * (M + M.T)).min() > 0
    # and it is a good approximate inverse: eigenvalues of M A near 1
    A = assemble(D, wx, wy).toarray()
    ev = np.linalg.eigvals(M @ A).real
    assert ev.max() < 1.0 + 1e-8 and ev.min() > 0.0


# ----------------------------------------------------------------------------------------------
# GPU code path: CUDA kernels under Numba's simulator, CuPy where installed
# ----------------------------------------------------------------------------------------------

@pytest.mark.cudasim
def test_cuda_kernels_match_cpu_kernels():
    from geomfit.backend import cuda_available
    if not cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not 1")
    cpu, gpu = (backend.kernel("aggregation_mg", on=t) for t in ("cpu", "cuda"))
    assert cpu is not gpu
    rng = np.random.default_rng(9)
    H, W, C = 7, 9, 2
    D, wx, wy, b = _random_system(rng, H, W, C, spread=1)
    dA, inv, dA2, inv2 = (np.empty((H, W)) for _ in range(4))
    cpu.diagonal(D, wx, wy, dA, inv)
    gpu.diagonal(D, wx, wy, dA2, inv2)
    np.testing.assert_allclose(dA2, dA)
    np.testing.assert_allclose(inv2, inv)
    x = rng.random((H, W, C))
    q1, q2 = np.empty_like(x), np.empty_like(x)
    cpu.matvec(dA, wx, wy, x, q1)
    gpu.matvec(dA, wx, wy, x, q2)
    np.testing.assert_allclose(q2, q1, atol=1e-12)
    np.testing.assert_allclose(q1.reshape(-1, C), assemble(D, wx, wy) @ x.reshape(-1, C), atol=1e-10)
    r1, r2 = np.empty_like(x), np.empty_like(x)
    cpu.residual(dA, wx, wy, x, b, r1)
    gpu.residual(dA, wx, wy, x, b, r2)
    np.testing.assert_allclose(r2, r1, atol=1e-12)
    np.testing.assert_allclose(r1, b - q1, atol=1e-12)
    for color, zero in ((0, True), (1, False)):
        x1, x2 = x.copy(), x.copy()
        cpu.rb_sweep(inv, wx, wy, x1, b, color, zero)
        gpu.rb_sweep(inv, wx, wy, x2, b, color, zero)
        np.testing.assert_allclose(x2, x1, atol=1e-12)
    Hc, Wc = 4, 5
    r1, r2 = np.empty((Hc, Wc, C)), np.empty((Hc, Wc, C))
    cpu.restrict_sum(x, r1)
    gpu.restrict_sum(x, r2)
    np.testing.assert_allclose(r2, r1)
    x1, x2 = x.copy(), x.copy()
    cpu.prolong_add(x1, r1)
    gpu.prolong_add(x2, r1)
    np.testing.assert_allclose(x2, x1)
    c1 = (np.empty((Hc, Wc)), np.zeros((Hc, Wc - 1)), np.zeros((Hc - 1, Wc)))
    c2 = (np.empty((Hc, Wc)), np.zeros((Hc, Wc - 1)), np.zeros((Hc - 1, Wc)))
    cpu.coarsen(D, wx, wy, *c1)
    gpu.coarsen(D, wx, wy, *c2)
    for u, v in zip(c1, c2):
        np.testing.assert_allclose(v, u)
    # the coarsest-level solves: Cholesky (CPU) and explicit inverse (CUDA) of the same matrix
    A = assemble(D, wx, wy).toarray()
    L = mg_mod._dense_factor(A)
    bb = rng.standard_normal((H * W, C))
    y1, y2 = np.empty_like(bb), np.empty_like(bb)
    cpu.coarse_solve(cpu.coarse_setup(L, np), bb, y1)
    gpu.coarse_solve(gpu.coarse_setup(L, np), bb, y2)
    np.testing.assert_allclose(y1, np.linalg.solve(A, bb), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(y2, y1, rtol=1e-8, atol=1e-10)


@pytest.mark.cudasim
def test_gpu_solver_path_under_simulator():
    from geomfit.backend import cuda_available
    if not cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not 1")
    rng = np.random.default_rng(12)
    H, W = 18, 16  # 288 unknowns: two multigrid levels
    D, wx, wy, b = _random_system(rng, H, W, 2, spread=1)
    with backend.force("cuda"):
        x, info = mg_mod.solve_screened_poisson(D, wx, wy, b, tol=1e-10, return_info=True)
    assert info["levels"] == 2
    ref = spla.spsolve(assemble(D, wx, wy), b.reshape(H * W, 2)).reshape(H, W, 2)
    np.testing.assert_allclose(x, ref, atol=1e-8 * np.abs(ref).max())


def test_single_precision_cycle_reaches_double_precision_tolerance():
    # the float32 V-cycle inside flexible CG in float64: 1e-12 is still reached, and as fast
    rng = np.random.default_rng(14)
    img = np.kron(rng.random((5, 6, 3)), np.ones((20, 20, 1))) + 0.05 * rng.standard_normal((100, 120, 3))
    wx, wy = rtv.rtv_weights(img)
    D = np.ones(img.shape[:2])
    x32, i32 = mg_mod.solve_screened_poisson(D, 0.01 * wx, 0.01 * wy, img, tol=1e-12, return_info=True)
    assert np.all(i32["residual"] <= 1e-12)
    ref = spla.spsolve(assemble(D, 0.01 * wx, 0.01 * wy), img.reshape(-1, 3)).reshape(img.shape)
    np.testing.assert_allclose(x32, ref, atol=1e-10)
    mg = mg_mod.BoxMultigrid(D, 0.01 * wx, 0.01 * wy, 3)
    assert mg.levels[0].x.dtype == np.float32


def test_serial_twins_have_their_own_cache_entries():
    # Numba keys its on-disk cache by qualified name and line: a serial twin compiled from the
    # parallel kernel's own function would overwrite (and be loaded as) the parallel kernel

    for name, par in g._PAR.items():
        ser = g._SER[name]
        if ser is par:
            continue
        assert ser.py_func.__qualname__ != par.py_func.__qualname__, name
        assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel"), name
