"""Metrics: analytic MAE cases, ICP recovering known rigid transforms, RMSE at the noise level, NME."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from geomfit import metrics as M


# -- depth MAE -------------------------------------------------------------------------------------
def test_depth_mae_analytic():
    gt = np.zeros((4, 5))
    gt[1:3, 1:4] = 1.0  # 6 pixels of depth 1
    pred = gt.copy()
    pred[1, 1] = 0.5  # error 0.5
    pred[0, 0] = 0.2  # pred-only pixel: error 0.2 (gt missing counts as 0)
    # valid in either: 6 + 1 = 7 pixels; sum of errors 0.7
    assert M.depth_mae(pred, gt) == pytest.approx(0.7 / 7)
    # NaN marks a missing pixel just like 0
    gt_nan = np.where(gt == 0, np.nan, gt)
    assert M.depth_mae(pred, gt_nan) == pytest.approx(0.7 / 7)
    # symmetric
    assert M.depth_mae(gt, pred) == pytest.approx(0.7 / 7)
    # pooled over a batch = total error / total valid pixels; per-image separately
    batch_p = np.stack([pred, gt])
    batch_g = np.stack([gt, gt])
    assert M.depth_mae(batch_p, batch_g) == pytest.approx(0.7 / 13)
    np.testing.assert_allclose(M.depth_mae(batch_p, batch_g, per_image=True), [0.1, 0.0])
    # extra valid mask
    v = np.zeros((4, 5), bool)
    v[1, 1] = True
    assert M.depth_mae(pred, gt, valid=v) == pytest.approx(0.5)


def test_depth_mae_errors():
    with pytest.raises(ValueError, match="shape"):
        M.depth_mae(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no pixel"):
        M.depth_mae(np.zeros((3, 3)), np.zeros((3, 3)))


def test_depth_mae_matches_slow_reference():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(3, 16, 16)) * (rng.uniform(size=(3, 16, 16)) > 0.4)
    g = rng.uniform(size=(3, 16, 16)) * (rng.uniform(size=(3, 16, 16)) > 0.4)
    tot, n = 0.0, 0
    for k in range(3):
        for i in range(16):
            for j in range(16):
                if p[k, i, j] != 0 or g[k, i, j] != 0:
                    tot += abs(p[k, i, j] - g[k, i, j])
                    n += 1
    assert M.depth_mae(p, g) == pytest.approx(tot / n)


# -- ICP and the MICC protocol -----------------------------------------------------------------------
def _face_like_surface(n=70, extent=100.0):
    """A smooth bumpy height field (mm), triangulated: stands in for a face scan."""
    x, y = np.meshgrid(np.linspace(-extent, extent, n), np.linspace(-extent, extent, n))
    z = _height(x, y)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f


def test_kabsch_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 3))
    R = Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix()
    b = a @ R.T + [1, 2, 3]
    Rk, t, s = M.kabsch(a, b)
    Rs, _ = Rotation.align_vectors(b - b.mean(0), a - a.mean(0))
    np.testing.assert_allclose(Rk, Rs.as_matrix(), atol=1e-10)
    np.testing.assert_allclose(t, [1, 2, 3], atol=1e-10)
    _, _, s2 = M.kabsch(a, 2.5 * b, scale=True)
    assert s2 == pytest.approx(2.5)


def _height(x, y):
    return 60 * np.exp(-(x ** 2 + y ** 2) / (2 * 70 ** 2)) + 25 * np.exp(-(x ** 2 + (y + 10) ** 2) / (2 * 15 ** 2)) \
        + 6 * np.sin(x / 17.0) * np.cos(y / 23.0)


# point-to-point ICP has a smaller basin of convergence and its accuracy is limited by the target's
# vertex spacing (nearest vertex, not nearest surface point)
@pytest.mark.parametrize("method,angles,tol_deg,tol_t", [("point_to_plane", [8, -12, 5], 0.05, 0.05),
                                                         ("point_to_point", [3, -4, 2], 0.3, 0.3)])
def test_icp_recovers_rigid_transform(method, angles, tol_deg, tol_t):
    v, f = _face_like_surface(n=150)
    R_true = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    t_true = np.array([4.0, -3.0, 6.0])
    rng = np.random.default_rng(2)
    # source: points of the continuous surface (not target vertices), moved by the inverse transform
    xy = rng.uniform(-80, 80, (1500, 2))
    pts = np.c_[xy, _height(xy[:, 0], xy[:, 1])]
    src = (pts - t_true) @ R_true
    res = M.rigid_icp(src, v, target_normals=M.vertex_normals(v, f), method=method, max_iter=300,
                      init=(np.eye(3), np.zeros(3)))
    ang = np.degrees(Rotation.from_matrix(res.rotation @ R_true.T).magnitude())
    assert ang < tol_deg
    np.testing.assert_allclose(res.translation, t_true, atol=tol_t)


def test_micc_rmse_equals_noise_level():
    v, f = _face_like_surface(n=120)
    n = M.vertex_normals(v, f)
    rng = np.random.default_rng(3)
    sigma = 0.8
    # prediction: ground truth displaced along its normals by N(0, sigma), then moved rigidly
    noisy = v + sigma * rng.standard_normal((len(v), 1)) * n
    R = Rotation.from_euler("xyz", [5, 7, -4], degrees=True).as_matrix()
    pred = noisy @ R.T + [10.0, -5.0, 3.0]
    nose = int(np.argmax(v[:, 2]))
    out = M.micc_errors(pred, v, pred_faces=f, gt_faces=f, pred_nose=nose, gt_nose=nose)
    assert out["icp_converged"]
    ang = np.degrees(Rotation.from_matrix(out["rotation"] @ R).magnitude())
    assert ang < 0.3
    # point-to-plane RMSE is the noise level; point-to-point is not smaller
    assert out["rmse_point_to_plane"] == pytest.approx(sigma, rel=0.12)
    assert out["rmse_point_to_point"] >= out["rmse_point_to_plane"]
    assert out["n_gt"] < len(v)  # the 95 mm crop removed the corners of the 200 mm square
    # noiseless: errors vanish
    clean = M.micc_errors(v @ R.T + [10.0, -5.0, 3.0], v, pred_faces=f, gt_faces=f, pred_nose=nose, gt_nose=nose)
    assert clean["rmse_point_to_plane"] < 1e-3 and clean["rmse_point_to_point"] < 1e-3


def test_crop_and_normals():
    v, f = _face_like_surface(n=40)
    m = M.crop_sphere(v, [0, 0, 0], 50.0)
    np.testing.assert_array_equal(m, np.linalg.norm(v, axis=1) <= 50.0)
    # PCA normals of the point cloud agree with mesh normals on a smooth surface
    cos = np.abs(np.einsum("ij,ij->i", M.point_normals(v), M.vertex_normals(v, f)))
    assert np.median(cos) > 0.99
    with pytest.raises(ValueError, match="millimetres"):
        M.micc_errors(v * 1e-3, v * 1e-3)
    with pytest.raises(ValueError, match="NaN"):
        M.rigid_icp(np.full((5, 3), np.nan), v)


# -- NME -------------------------------------------------------------------------------------------
def test_landmark_nme():
    rng = np.random.default_rng(4)
    gt = rng.uniform(0, 100, (68, 2))
    gt[36], gt[45] = [30, 40], [70, 40]  # outer corners 40 px apart
    pred = gt + [3.0, 4.0]  # every point 5 px off
    assert M.landmark_nme(pred, gt) == pytest.approx(5 / 40)
    assert M.landmark_nme(pred, gt, normalization=10.0) == pytest.approx(0.5)
    b = M.landmark_nme(np.stack([pred, gt]), np.stack([gt, gt]), per_image=True)
    np.testing.assert_allclose(b, [0.125, 0.0])
    with pytest.raises(ValueError, match="68"):
        M.landmark_nme(pred[:5], gt[:5])
