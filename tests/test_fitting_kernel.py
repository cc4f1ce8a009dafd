"""The compiled coarse-fit kernel (kernels/fitting.py) against the vectorised array path of
geomfit.fitting (fast=False), an independent implementation of the same algorithm, and the kernel's
linear-algebra pieces against NumPy/SciPy."""
import numpy as np
import pytest

from geomfit.camera import rodrigues
from geomfit import backend
from geomfit import fitting as F
from geomfit.fitting import fit_landmarks
from geomfit.kernels import fitting as kf

from test_fitting import HW, random_model, synth

FIELDS = ("id_coeffs", "exp_coeffs", "rotation", "scale", "translation", "rmse_px")


def _array_path(model, L, HW, **kw):
    """The vectorised array path with the structured normal equations (the reference)."""
    full = dict(visible=None, w_id=1e-3, w_exp=1e-3, n_id=None, n_exp=None, n_alternations=2, max_iter=50,
                ftol=1e-6, xtol=1e-8, gtol=1e-12, w_init=1e-3, fast=True)
    full.update(kw)
    return F._fit_landmarks(model, L, HW, path="array", **full)


def _compare(a, b, atol=1e-8):
    for k in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)), rtol=1e-7, atol=atol,
                                   err_msg=k)
    np.testing.assert_array_equal(a.iterations, b.iterations)
    np.testing.assert_array_equal(a.converged, b.converged)
    np.testing.assert_array_equal(a.landmark_vertices, b.landmark_vertices)
    assert a.cost_history.shape == b.cost_history.shape
    np.testing.assert_allclose(a.cost_history, b.cost_history, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("contours", [True, False])
@pytest.mark.parametrize("w_reg", [1e-3, 1e-2, 0.0])
def test_kernel_equals_array_path_random(contours, w_reg):
    model = random_model(seed=3, contours=contours)
    L, *_ = synth(model, 18, seed=21)  # >= 16: split over threads
    L = L + np.random.default_rng(22).normal(size=L.shape) * 2.0
    L[0, [10, 40]] = np.nan  # missing fixed landmarks
    L[2, 3] = np.nan  # a missing jaw landmark
    kw = dict(w_id=w_reg, w_exp=w_reg, max_iter=30)
    a = fit_landmarks(model, L, HW, **kw)
    b = _array_path(model, L, HW, **kw)
    _compare(a, b)
    # one image alone (serial kernel) gives the batch's answer
    one = fit_landmarks(model, L[2], HW, **kw)
    np.testing.assert_allclose(one.id_coeffs, a.id_coeffs[2], rtol=1e-12, atol=1e-12)
    assert one.iterations == a.iterations[2]


def test_kernel_equals_array_path_sfm_options(sfm_dir):
    from _fit_helpers import load_sfm

    sfm = load_sfm(sfm_dir)
    L, *_ = synth(sfm, 4, seed=23)
    L = L + np.random.default_rng(24).normal(size=L.shape) * 1.5
    vis = np.ones((4, 68), bool)
    vis[1, 30:36] = False
    for kw in (dict(), dict(n_id=20, n_exp=3, n_alternations=1), dict(w_id=0.0, w_exp=1e-2, max_iter=5),
               dict(n_alternations=0, visible=vis)):
        _compare(fit_landmarks(sfm, L, HW, **kw), _array_path(sfm, L, HW, **kw))


def test_kernel_cholesky_and_affine_pose():
    rng = np.random.default_rng(0)
    n = 75
    X = rng.normal(size=(n, 2 * n))
    A = X @ X.T + 0.1 * np.eye(n)
    b = rng.normal(size=n)
    x = np.empty(n)
    assert kf._cholesky_solve(A.copy(), b, x)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-9)
    # not positive definite: reported, and _solve_spd falls back to pivoted LU
    Aind = A - 50.0 * np.eye(n)
    assert not kf._cholesky_solve(Aind.copy(), b, x)
    kf._solve_spd(Aind, b, x, np.empty((n, n)))
    np.testing.assert_allclose(x, np.linalg.solve(Aind, b), rtol=1e-8)
    # the damped LM system, positive definite and not (least-squares fallback)
    for Hm in (A, Aind):
        D = np.maximum(np.diag(Hm), 1e-12)
        kf._solve_damped(Hm, b, 1e-3, x, np.empty((n, n)), np.empty(n))
        np.testing.assert_allclose(x, -np.linalg.solve(Hm + 1e-3 * np.diag(D), b), rtol=1e-8)
    kf._solve_damped(np.where(np.eye(n) > 0, np.inf, A), b, 1e-3, x, np.empty((n, n)), np.empty(n))
    assert np.isnan(x).all()
    # a non-finite system gives NaN, not an exception
    kf._solve_spd(np.where(np.eye(n) > 0, np.nan, A), b, x, np.empty((n, n)))
    assert np.isnan(x).all()
    # affine pose: noise-free scaled orthographic projection is recovered exactly
    P3 = rng.normal(size=(30, 3))
    Rt = rodrigues(np.array([[0.2, -0.4, 0.1]]))[0]
    L2 = 1.7 * P3 @ Rt[:2].T + np.array([0.3, -0.2])
    R = np.empty((3, 3))
    t = np.empty(2)
    s = kf._affine_pose(P3, L2, np.ones(30), 30, R, t, np.empty((4, 6)), np.empty((2, 3)))
    np.testing.assert_allclose(R, Rt, atol=1e-9)
    np.testing.assert_allclose([s, *t], [1.7, 0.3, -0.2], atol=1e-9)
    # the reference (batched SVD) agrees on a noisy problem
    Ln = L2 + rng.normal(size=L2.shape) * 0.05
    wts = (rng.uniform(size=30) > 0.2).astype(float)
    s = kf._affine_pose(P3, Ln, wts, 30, R, t, np.empty((4, 6)), np.empty((2, 3)))
    Rr, sr, tr, _ = F._affine_pose(P3[None], Ln[None], wts[None], np)
    np.testing.assert_allclose(R, Rr[0], atol=1e-12)
    np.testing.assert_allclose([s, *t], [sr[0], *tr[0]], atol=1e-12)
    # the rotation update of the LM step: exp([w]_x) R (Rodrigues), also for a tiny angle
    for w3 in (np.array([0.3, -0.1, 0.2]), np.array([1e-9, 0.0, -2e-9])):
        out = np.empty((3, 3))
        kf._rodrigues_left(*w3, Rt, out)
        np.testing.assert_allclose(out, rodrigues(w3[None])[0] @ Rt, atol=1e-14)


def test_engine_option_checked_and_deprecated():
    model = random_model()
    L, *_ = synth(model, 1, seed=25)
    with pytest.raises(ValueError, match="engine"), pytest.warns(DeprecationWarning):
        fit_landmarks(model, L[0], HW, engine="gpu")
    # the deprecated engines still pick the same implementations
    kw = dict(max_iter=10)
    with pytest.warns(DeprecationWarning, match="engine"):
        a = fit_landmarks(model, L, HW, engine="xp", **kw)
    _compare(a, _array_path(model, L, HW, **kw))
    with pytest.warns(DeprecationWarning, match="engine"):
        b = fit_landmarks(model, L, HW, engine="numba", **kw)
    _compare(b, fit_landmarks(model, L, HW, **kw))


def _tiny_model(seed=4):
    """A small model (13 fixed landmarks, 16 candidates per contour side, 5 coefficients): the CUDA
    simulator runs the kernel as Python, one thread at a time."""
    from geomfit.model import MorphableModel

    rng = np.random.default_rng(seed)
    n = 50
    mean = rng.normal(size=(n, 3)) * np.array([30.0, 35.0, 20.0])
    perm = rng.permutation(n)
    lm = {k: int(perm[i]) for i, k in enumerate(range(18, 31))}
    cont = {"right": [int(v) for v in perm[13:29]], "left": [int(v) for v in perm[29:45]]}
    return MorphableModel(mean=mean, id_basis=rng.normal(size=(n, 3, 3)) * 2.0,
                          exp_basis=rng.normal(size=(n, 3, 2)) * 1.5, faces=np.zeros((0, 3), int), landmarks=lm,
                          contours=cont, name="tiny")


@pytest.mark.cudasim
def test_cuda_kernel_equals_cpu_kernel():
    from geomfit.backend import cuda_available

    if not cuda_available():
        pytest.skip("no GPU and NUMBA_ENABLE_CUDASIM is not set")
    model = _tiny_model()
    L, *_ = synth(model, 2, seed=31)
    L = L + np.random.default_rng(32).normal(size=L.shape) * 1.0
    L[1, 20] = np.nan
    kw = dict(w_id=0.0, w_exp=1e-2, max_iter=3, n_alternations=1)  # two LM phases (start-up prior, then w_id=0)
    with backend.force("cuda"):
        a = fit_landmarks(model, L, HW, **kw)
    b = fit_landmarks(model, L, HW, **kw)
    _compare(a, b)
