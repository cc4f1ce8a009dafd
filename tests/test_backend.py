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
