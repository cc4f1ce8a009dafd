"""geomfit.backend: array-module dispatch and the sparse SPD factor adapter."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from geomfit import backend


def _spd(n=60, seed=0):
    """A random sparse SPD matrix: graph Laplacian of a random graph plus a positive diagonal."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, 4 * n)
    j = rng.integers(0, n, 4 * n)
    keep = i != j
    w = rng.uniform(0.1, 1.0, keep.sum())
    A = sp.coo_matrix((w, (i[keep], j[keep])), shape=(n, n)).tocsr()
    A = A + A.T
    L = sp.diags(np.asarray(A.sum(axis=1)).ravel()) - A
    return (L + sp.diags(rng.uniform(0.05, 0.5, n))).tocsc()


def test_get_array_module_numpy():
    assert backend.get_array_module(np.zeros(3), None, 1.0) is np
    assert backend.get_array_module() is np


@pytest.mark.parametrize("method", [None, "superlu"] + (["cholmod"] if backend.has_cholmod() else []))
@pytest.mark.parametrize("ncols", [0, 1, 5])
def test_factorize_spd_matches_spsolve(method, ncols):
    A = _spd()
    rng = np.random.default_rng(1)
    b = rng.normal(size=(A.shape[0],) if ncols == 0 else (A.shape[0], ncols))
    f = backend.factorize_spd(A, method=method)
    x = f.solve(b)
    ref = spla.spsolve(A, b)
    assert x.shape == b.shape
    np.testing.assert_allclose(x, ref.reshape(b.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["superlu"] + (["cholmod"] if backend.has_cholmod() else []))
@pytest.mark.parametrize("subtract", [False, True])
def test_low_rank_update_equals_refactor(method, subtract):
    A = _spd(seed=3)
    n = A.shape[0]
    idx = np.array([3, 17, 41])
    # for the downdate stay positive definite: subtract less than what we add first
    C = sp.csc_matrix((np.sqrt([0.02, 0.03, 0.01]), (idx, np.arange(3))), shape=(n, 3))
    f = backend.factorize_spd(A, method=method)
    f.update(C, subtract=subtract)
    A2 = A - C @ C.T if subtract else A + C @ C.T
    b = np.random.default_rng(2).normal(size=(n, 2))
    np.testing.assert_allclose(f.solve(b), spla.spsolve(A2.tocsc(), b), rtol=1e-9, atol=1e-12)


def test_not_spd_is_a_clear_error():
    A = sp.csc_matrix(np.diag([1.0, -1.0, 2.0]))
    with pytest.raises(np.linalg.LinAlgError):
        backend.factorize_spd(A, method="cholmod" if backend.has_cholmod() else "superlu")
    with pytest.raises(np.linalg.LinAlgError):
        backend.factorize_spd(sp.csc_matrix((3, 3)), method="superlu")


def test_solve_checks_rhs():
    f = backend.factorize_spd(_spd(10))
    with pytest.raises(ValueError, match="rows"):
        f.solve(np.ones(11))
    with pytest.raises(ValueError, match="square"):
        backend.factorize_spd(sp.csc_matrix(np.ones((2, 3))))


def test_asnumpy_and_to_device_numpy():
    a = np.arange(3.0)
    assert backend.asnumpy(a) is a
    assert backend.to_device([1, 2], np).tolist() == [1, 2]


def test_cupy_factor_matches_cpu():
    cp = pytest.importorskip("cupy")
    if backend.cupy_or_none() is None:
        pytest.skip("CuPy is installed but sees no GPU")
    import cupyx.scipy.sparse as csp

    A = _spd(200, seed=5)
    b = np.random.default_rng(0).normal(size=(200, 3))
    f = backend.factorize_spd(csp.csr_matrix(A))
    x = f.solve(cp.asarray(b))
    np.testing.assert_allclose(cp.asnumpy(x), spla.spsolve(A, b), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["superlu"] + (["cholmod"] if backend.has_cholmod() else []))
def test_refactor_equals_fresh_factor(method):
    # same pattern, new values: the symbolic analysis is kept, the answer is that of a new factor
    A = _spd(seed=4)
    A2 = A.copy()
    A2.data = A2.data * np.random.default_rng(5).uniform(0.5, 1.5, A2.nnz)
    A2 = ((A2 + A2.T) * 0.5 + sp.identity(A.shape[0]) * 2.0).tocsc()
    f = backend.factorize_spd(A + sp.identity(A.shape[0]) * 2.0, method=method)
    f.refactor(A2)
    b = np.random.default_rng(6).normal(size=A.shape[0])
    np.testing.assert_allclose(f.solve(b), spla.spsolve(A2, b), rtol=1e-10, atol=1e-12)
    if method == "cholmod":  # SuperLU factors indefinite matrices too; only CHOLMOD tests definiteness
        with pytest.raises(np.linalg.LinAlgError):
            f.refactor((A2 - sp.identity(A.shape[0]) * 100.0).tocsc())
    with pytest.raises(ValueError, match="shape"):
        f.refactor(A2[:10, :10])


def test_pcg_against_direct_solve():
    A = _spd(n=200, seed=7)
    b = np.random.default_rng(8).normal(size=A.shape[0])
    ref = spla.spsolve(A, b)
    d = A.diagonal()
    x, k, ok = backend.pcg(A, b, lambda r: r / d, tol=1e-10, maxiter=500)
    assert ok and 0 < k < 500
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-10)
    assert np.linalg.norm(b - A @ x) <= 1e-10 * np.linalg.norm(b)
    # the exact inverse as preconditioner: one iteration
    f = backend.factorize_spd(A)
    x, k, ok = backend.pcg(A, b, f.solve, tol=1e-10)
    assert ok and k == 1
    np.testing.assert_allclose(x, ref, rtol=1e-9, atol=1e-12)
    # a factor of a nearby matrix: a few iterations, far fewer than Jacobi
    fn = backend.factorize_spd((A + sp.identity(A.shape[0]) * 0.05).tocsc())
    x, k_near, ok = backend.pcg(A, b, fn.solve, tol=1e-10, maxiter=500)
    _, k_jac, _ = backend.pcg(A, b, lambda r: r / d, tol=1e-10, maxiter=500)
    assert ok and k_near < k_jac / 2
    # truncation: not converged, but still a descent direction of x^T A x / 2 - b^T x
    x, k, ok = backend.pcg(A, b, lambda r: r / d, tol=1e-12, maxiter=3)
    assert not ok and k == 3
    assert 0.5 * x @ (A @ x) - b @ x < 0.0
    x, k, ok = backend.pcg(A, np.zeros_like(b), f.solve)
    assert ok and k == 0 and not x.any()


_CPU_METHODS = ["superlu"] + (["cholmod"] if backend.has_cholmod() else [])


@pytest.mark.parametrize("method", _CPU_METHODS)
@pytest.mark.parametrize("ordering", [None, "amd", "metis", "nesdis", "colamd"])
def test_ordering_option_matches_spsolve(method, ordering):
    A = _spd(n=80, seed=4)
    b = np.random.default_rng(5).normal(size=(80, 3))
    f = backend.factorize_spd(A, method=method, ordering=ordering)
    np.testing.assert_allclose(f.solve(b), spla.spsolve(A, b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", _CPU_METHODS)
@pytest.mark.parametrize("ordering", [None, "metis"])
@pytest.mark.parametrize("shape", [(), (1,), (4,)])
def test_solve_last_matches_spsolve(method, ordering, shape):
    """b is zero outside `last`: solve_last(b[last]) == spsolve(A, b), any order of `last`."""
    A = _spd(n=90, seed=6)
    rng = np.random.default_rng(7)
    last = rng.choice(90, 12, replace=False)  # unsorted on purpose
    bl = rng.normal(size=(12,) + shape)
    b = np.zeros((90,) + shape)
    b[last] = bl
    f = backend.factorize_spd(A, method=method, ordering=ordering, last=last)
    if method == "cholmod" and hasattr(backend._cholmod(), "cholesky"):
        assert f._lastfast is not None  # the constrained-ordering fast path is taken
    x = f.solve_last(bl)
    assert x.shape == b.shape
    np.testing.assert_allclose(x, spla.spsolve(A, b).reshape(b.shape), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f.solve(b), x, rtol=1e-10, atol=1e-12)  # plain solve still right
    # refactor keeps the layout: new values, same answers as a direct solve of the new matrix
    A2 = (A + sp.identity(90) * 0.7).tocsc()
    f.refactor(A2)
    ref2 = spla.spsolve(A2, b).reshape(b.shape)
    np.testing.assert_allclose(f.solve_last(bl), ref2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f.solve(b), ref2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", _CPU_METHODS)
@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("rows", ["last", "other"])
def test_solve_last_after_update_equals_refactor(method, subtract, rows):
    A = _spd(n=70, seed=8)
    rng = np.random.default_rng(9)
    last = rng.choice(70, 9, replace=False)
    idx = last[[0, 4, 7]] if rows == "last" else np.setdiff1d(np.arange(70), last)[[2, 30, 50]]
    C = sp.csc_matrix((np.sqrt([0.02, 0.03, 0.01]), (idx, np.arange(3))), shape=(70, 3))
    f = backend.factorize_spd(A, method=method, last=last)
    f.update(C, subtract=subtract)
    A2 = (A - C @ C.T if subtract else A + C @ C.T).tocsc()
    bl = rng.normal(size=(9, 2))
    b = np.zeros((70, 2))
    b[last] = bl
    np.testing.assert_allclose(f.solve_last(bl), spla.spsolve(A2, b), rtol=1e-9, atol=1e-12)
    b2 = rng.normal(size=(70, 2))
    np.testing.assert_allclose(f.solve(b2), spla.spsolve(A2, b2), rtol=1e-9, atol=1e-12)


def test_solve_last_checks():
    A = _spd(n=30)
    with pytest.raises(ValueError, match="without last"):
        backend.factorize_spd(A).solve_last(np.zeros(3))
    f = backend.factorize_spd(A, last=[1, 5, 9])
    with pytest.raises(ValueError, match="rows"):
        f.solve_last(np.zeros(4))
    for bad in ([1, 1], [-1], [30], []):
        with pytest.raises(ValueError, match="distinct"):
            backend.factorize_spd(A, last=bad)


def test_solve_last_without_cholmod_falls_back(monkeypatch):
    """With scikit-sparse missing, last= still works through SuperLU."""
    monkeypatch.setattr(backend, "_CHOLMOD", None)
    A = _spd(n=40, seed=10)
    last = np.array([3, 30, 7])
    f = backend.factorize_spd(A, last=last)
    assert f.method == "superlu"
    b = np.zeros(40)
    b[last] = [1.0, -2.0, 0.5]
    np.testing.assert_allclose(f.solve_last(b[last]), spla.spsolve(A, b), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not backend.has_cholmod(), reason="needs scikit-sparse")
def test_solve_last_mixed_update_sequence():
    """Dense trailing updates, then one outside `last` (refactor), then a downdate: still exact."""
    A = _spd(n=60, seed=12)
    rng = np.random.default_rng(13)
    last = rng.choice(60, 8, replace=False)
    other = np.setdiff1d(np.arange(60), last)
    f = backend.factorize_spd(A, method="cholmod", last=last)
    A2 = A.copy()
    for rows, sub in ((last[[1, 2]], False), (last[[3]], False), (other[[5, 9]], False), (last[[1]], True)):
        C = sp.csc_matrix((np.full(rows.size, 0.1), (rows, np.arange(rows.size))), shape=(60, rows.size))
        f.update(C, subtract=sub)
        A2 = A2 - C @ C.T if sub else A2 + C @ C.T
        bl = rng.normal(size=(8, 3))
        b = np.zeros((60, 3))
        b[last] = bl
        np.testing.assert_allclose(f.solve_last(bl), spla.spsolve(A2.tocsc(), b), rtol=1e-9, atol=1e-12)
        b2 = rng.normal(size=60)
        np.testing.assert_allclose(f.solve(b2), spla.spsolve(A2.tocsc(), b2), rtol=1e-9, atol=1e-12)


def test_one_blas_thread_limits_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    with backend.one_blas_thread():
        inside = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert inside and all(n == 1 for n in inside)
    assert after == before


def test_dense_trailing_kernels_against_scipy():
    import scipy.linalg as sla
    from geomfit.kernels import dense

    rng = np.random.default_rng(11)
    B = rng.normal(size=(30, 30))
    S = B @ B.T + 30 * np.eye(30)
    U = np.ascontiguousarray(sla.cholesky(S))  # upper, S = U^T U
    y = rng.normal(size=(30, 3))
    z = y.copy()
    dense.fwd(U, z)
    np.testing.assert_allclose(z, sla.solve_triangular(U, y, trans="T"), rtol=1e-12, atol=1e-12)
    z = y.copy()
    dense.bwd(U, z)
    np.testing.assert_allclose(z, sla.solve_triangular(U, y), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense.matvec(U, y), U @ y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense.matvec(U, y, True), U.T @ y, rtol=1e-12, atol=1e-12)
    x = rng.normal(size=30)
    for sign in (1.0, -1.0):
        U2 = U.copy()
        assert dense.rank1(U2, x.copy(), sign)
        np.testing.assert_allclose(U2.T @ U2, S + sign * np.outer(x, x), rtol=1e-10, atol=1e-9)
    assert not dense.rank1(U.copy(), 100 * x, -1.0)  # downdate past positive definiteness


# ----------------------------------------------------------------------------------------------
# dispatch: targets, the test switch, the kernel registry
# ----------------------------------------------------------------------------------------------

def test_target_and_force():
    x = np.zeros(3)
    assert backend.target(x) == "cpu"
    with backend.force("cpu"):
        assert backend.target(x) == "cpu"
    assert backend.target(x) == "cpu"
    with pytest.raises(ValueError, match="target"):
        with backend.force("gpu"):
            pass
    if not backend.cuda_available():
        with pytest.raises(RuntimeError, match="NUMBA_ENABLE_CUDASIM"):
            with backend.force("cuda"):
                pass


def test_kernel_registry_dispatches_by_target():
    calls = []
    backend.register_kernel("_test_twice", cpu=lambda a: calls.append("cpu") or 2 * a,
                            cuda=lambda a: calls.append("cuda") or 2 * a)
    try:
        assert backend.kernel("_test_twice", np.ones(2))(np.ones(2)).tolist() == [2.0, 2.0]
        assert calls == ["cpu"]
        assert backend.kernel("_test_twice", on="cpu") is backend.kernel("_test_twice", np.ones(1))
        backend.register_kernel("_test_twice", cpu="numpy.linalg:norm", cuda=None)  # replaced, imported lazily
        assert backend.kernel("_test_twice", np.ones(1)) is np.linalg.norm
        with pytest.raises(RuntimeError, match="no cuda implementation"):
            backend.kernel("_test_twice", on="cuda")
    finally:
        backend.KERNELS.pop("_test_twice", None)
    with pytest.raises(KeyError, match="unknown kernel"):
        backend.kernel("no_such_kernel", np.ones(1))


def test_builtin_kernels_resolve_on_cpu():
    # every registered CPU implementation imports (CUDA ones are checked under the simulator)
    for name in backend.KERNELS:
        assert callable(backend.kernel(name, on="cpu")) or hasattr(backend.kernel(name, on="cpu"), "matvec")


def test_cpu_paths_do_not_import_numba_cuda():
    """numba.cuda costs 0.3-0.5 s to import: importing the kernel modules and running the CPU kernels
    (rasterizer, screened-Poisson multigrid, every registered CPU kernel) must not load it."""
    import subprocess
    import sys

    code = """
import sys
import numpy as np
from geomfit import backend
import geomfit.kernels.raster, geomfit.kernels.fitting, geomfit.kernels.multigrid
for name in backend.KERNELS:
    backend.kernel(name, on="cpu")
from geomfit.render import rasterize
v = np.array([[1.0, 1.0, 0.0], [9.0, 1.0, 0.0], [1.0, 9.0, 0.0]])
rasterize(v, np.array([[0, 1, 2]]), 10, 10)
from geomfit.multigrid import solve_screened_poisson
d = np.ones((8, 8))
solve_screened_poisson(d, np.ones((8, 7)), np.ones((7, 8)), np.arange(64.0).reshape(8, 8))
print(sorted(m for m in ("numba.cuda", "numba_cuda", "numba.cuda.simulator") if m in sys.modules))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.cudasim
def test_builtin_cuda_kernels_resolve_under_simulator():
    if not backend.cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not 1")
    for name in backend.KERNELS:
        cpu, cuda = backend.kernel(name, on="cpu"), backend.kernel(name, on="cuda")
        assert cuda is not cpu
        with backend.force("cuda"):
            assert backend.kernel(name, np.zeros(1)) is cuda


def test_old_kernel_module_name_warns():
    import importlib
    import sys

    sys.modules.pop("geomfit.kernels.grid", None)
    with pytest.warns(DeprecationWarning, match="kernels.multigrid"):
        g = importlib.import_module("geomfit.kernels.grid")
    from geomfit.kernels import multigrid

    assert g.diagonal is multigrid.diagonal


def test_sparse_device_helpers_keep_cpu_matrices_and_symmetric_csr_arrays():
    """``sparse_on_device`` leaves a SciPy matrix as it is on the CPU; ``symmetric_from_csr`` reads
    the CSR arrays of a symmetric matrix as its CSC arrays (checked against SciPy's own matrix)."""
    import scipy.sparse as sp

    from geomfit.backend import sparse_on_device, symmetric_from_csr

    rng = np.random.default_rng(0)
    B = sp.random(30, 30, density=0.1, random_state=1, format="csr")
    S = (B + B.T + sp.eye(30)).tocsr()
    S.sort_indices()
    A = sp.csc_matrix(S)
    assert sparse_on_device(A, np) is A
    M = symmetric_from_csr(S.data, S.indices, S.indptr, 30, np)
    assert M.format == "csc"
    x = rng.standard_normal(30)
    np.testing.assert_allclose(M @ x, S @ x, rtol=1e-13, atol=1e-13)
