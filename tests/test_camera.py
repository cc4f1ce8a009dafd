import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from geomfit.camera import (ScaledOrthographic, euler_to_matrix, matrix_to_euler, matrix_to_rodrigues,
                            rodrigues)


def random_angles(rng, n):
    return rng.uniform(-np.pi, np.pi, n), rng.uniform(-np.pi / 2 + 1e-3, np.pi / 2 - 1e-3, n), rng.uniform(-np.pi, np.pi, n)


def test_euler_matches_scipy_and_round_trips():
    rng = np.random.default_rng(0)
    y, p, r = random_angles(rng, 50)
    R = euler_to_matrix(y, p, r)
    assert R.shape == (50, 3, 3)
    Rs = Rotation.from_euler("YXZ", np.stack([y, p, r], 1)).as_matrix()  # intrinsic Y, X', Z''
    np.testing.assert_allclose(R, Rs, atol=1e-12)
    y2, p2, r2 = matrix_to_euler(R)
    np.testing.assert_allclose(np.stack([y2, p2, r2]), np.stack([y, p, r]), atol=1e-9)
    # scalar input and gimbal lock
    R0 = euler_to_matrix(0.3, np.pi / 2, 0.0)
    assert R0.shape == (3, 3)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(R0)), R0, atol=1e-12)
    # yaw turns the nose (+z) towards +x
    np.testing.assert_allclose(euler_to_matrix(np.pi / 2, 0, 0) @ [0, 0, 1], [1, 0, 0], atol=1e-15)


def test_rodrigues_matches_scipy_and_round_trips():
    rng = np.random.default_rng(1)
    axis = rng.standard_normal((4, 5, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    ang = rng.uniform(0, np.pi, (4, 5))
    ang[0, 0], ang[0, 1], ang[0, 2] = 0.0, 1e-10, np.pi - 1e-9
    w = axis * ang[..., None]
    R = rodrigues(w)
    assert R.shape == (4, 5, 3, 3)
    np.testing.assert_allclose(R, Rotation.from_rotvec(w.reshape(-1, 3)).as_matrix().reshape(R.shape), atol=1e-12)
    np.testing.assert_allclose(rodrigues(matrix_to_rodrigues(R)), R, atol=1e-8)
    w2 = matrix_to_rodrigues(R)
    np.testing.assert_allclose(w2[1:], w[1:], atol=1e-9)


def test_project_formula_and_unproject_round_trip():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((30, 3)) * 50
    R = euler_to_matrix(0.3, -0.2, 0.1)
    cam = ScaledOrthographic(2.5, R, [100.0, 80.0])
    H = 240
    px = cam.project(v, H)
    rv = v @ R.T
    np.testing.assert_allclose(px[:, 0], 2.5 * rv[:, 0] + 100.0)
    np.testing.assert_allclose(px[:, 1], H - (2.5 * rv[:, 1] + 80.0))
    d = cam.depth(v)
    np.testing.assert_allclose(d, 2.5 * rv[:, 2])
    np.testing.assert_allclose(cam.unproject(px, d, H), v, atol=1e-10)
    # identity pose: model y up -> image row down from the bottom edge
    cam0 = ScaledOrthographic(1.0, np.eye(3), [0, 0])
    np.testing.assert_allclose(cam0.project(np.array([[1.0, 2.0, 3.0]]), 10), [[1.0, 8.0]])


def test_batched_camera_equals_loop():
    rng = np.random.default_rng(3)
    B = 4
    y, p, r = random_angles(rng, B)
    Rb = euler_to_matrix(y, p, r)
    s = rng.uniform(1, 3, B)
    t = rng.uniform(0, 100, (B, 2))
    cam = ScaledOrthographic(s, Rb, t)
    assert cam.batch_size == B
    v = rng.standard_normal((7, 3))
    vb = rng.standard_normal((B, 7, 3))
    for verts in (v, vb):
        sc = cam.to_screen(verts, 128)
        assert sc.shape == (B, 7, 3)
        for k in range(B):
            ck = ScaledOrthographic(s[k], Rb[k], t[k])
            np.testing.assert_allclose(sc[k], ck.to_screen(verts if verts.ndim == 2 else verts[k], 128), atol=1e-12)
        back = cam.unproject(sc[..., :2], sc[..., 2], 128)
        np.testing.assert_allclose(back, np.broadcast_to(verts, back.shape), atol=1e-10)


def test_bad_camera():
    with pytest.raises(ValueError, match="orthonormal"):
        ScaledOrthographic(1.0, np.ones((3, 3)), [0, 0])
    with pytest.raises(ValueError, match="positive"):
        ScaledOrthographic(-1.0, np.eye(3), [0, 0])
    with pytest.raises(ValueError, match="batch"):
        ScaledOrthographic(np.ones(3), np.stack([np.eye(3)] * 2), [0, 0])
    with pytest.raises(ValueError, match="translation"):
        ScaledOrthographic(1.0, np.eye(3), [0, 0, 0])
    cam = ScaledOrthographic(1.0, np.eye(3), [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        cam.project(np.array([[np.nan, 0, 0]]), 10)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        cam.project(np.zeros((4, 2)), 10)


def test_one_rodrigues_for_arrays_and_kernels():
    # the compiled scalar form (used by the landmark-fit kernels) equals the array form, across the
    # Taylor threshold, and both match SciPy
    from geomfit.camera import _rodrigues_coefficients
    from geomfit.kernels import fitting as kf

    rng = np.random.default_rng(5)
    for scale in (0.0, 1e-9, 5e-7, 2e-6, 1e-3, 1.0, 3.0):
        w = rng.normal(size=3)
        w *= scale / max(np.linalg.norm(w), 1e-300)
        R0 = rng.normal(size=(3, 3))
        out = np.empty((3, 3))
        kf._rodrigues_left(w[0], w[1], w[2], R0, out)
        np.testing.assert_allclose(out, rodrigues(w) @ R0, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(rodrigues(w), Rotation.from_rotvec(w).as_matrix(), atol=1e-14)
        a, b = _rodrigues_coefficients(float(w @ w))
        th = np.linalg.norm(w)
        if th > 1e-3:
            np.testing.assert_allclose([a, b], [np.sin(th) / th, (1 - np.cos(th)) / th ** 2], rtol=1e-12)


def test_one_projection():
    # ScaledOrthographic.to_screen and fitting.project are the same formula, checked by hand here
    from geomfit.camera import scaled_orthographic
    from geomfit.fitting import project

    rng = np.random.default_rng(6)
    v = rng.normal(size=(2, 7, 3))
    R = Rotation.from_rotvec(rng.normal(size=(2, 3))).as_matrix()
    s, t, H = np.array([2.0, 0.5]), rng.normal(size=(2, 2)), 64.0
    rv = np.einsum("bij,bnj->bni", R, v)
    want = np.stack([s[:, None] * rv[..., 0] + t[:, None, 0], H - (s[:, None] * rv[..., 1] + t[:, None, 1]),
                     s[:, None] * rv[..., 2]], -1)
    np.testing.assert_allclose(scaled_orthographic(v, R, s, t, H), want, atol=1e-12)
    np.testing.assert_allclose(ScaledOrthographic(s, R, t).to_screen(v, H), want, atol=1e-12)
    np.testing.assert_allclose(project(v, R, s, t, np.array([[H, 50.0]] * 2)), want[..., :2], atol=1e-12)
