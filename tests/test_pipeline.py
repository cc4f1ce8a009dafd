"""reconstruct(): fine-mesh displacement (exact cases) and end-to-end recovery on a synthetic render."""
import numpy as np
import pytest

from geomfit.camera import ScaledOrthographic, euler_to_matrix
from geomfit.mesh import displace_mesh
from geomfit.pipeline import crop_box, fixed_landmark_rmse


def _stages():
    fitting = pytest.importorskip("geomfit.fitting", reason="coarse stage not merged")
    lap = pytest.importorskip("geomfit.laplacian", reason="medium stage not merged")
    fine = pytest.importorskip("geomfit.fine", reason="fine stage not merged")
    if not hasattr(lap, "medium_stage") or not hasattr(fine, "fine_stage") or not hasattr(fitting, "fit_landmarks"):
        pytest.skip("a stage's public function is not merged yet")


def _grid(n, z=0.0, size=40.0):
    x, y = np.meshgrid(np.linspace(-size / 2, size / 2, n), np.linspace(-size / 2, size / 2, n))
    v = np.stack([x.ravel(), y.ravel(), np.full(n * n, z)], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])  # counter-clockwise from +z
    return v, f


def test_displace_mesh_moves_visible_vertices_along_view():
    # two parallel square sheets: the front one (z = 5) hides the back one (z = -5) completely
    front, ff = _grid(9, z=5.0, size=40.0)
    back, fb = _grid(5, z=-5.0, size=20.0)
    v = np.concatenate([front, back])
    f = np.concatenate([ff, fb + len(front)])
    cam = ScaledOrthographic(2.0, euler_to_matrix(0.2, -0.1, 0.05), [64.0, 64.0])
    H = W = 128
    delta = np.full((H, W), 1.5)  # the refined surface is 1.5 px closer everywhere
    # Phong tessellation keeps the original vertices where they are (Loop, the default, moves them)
    v2, f2, info = displace_mesh(v, f, cam, delta, H, target_edge_px=3.0, max_subdivisions=3, smooth="phong")
    assert info["subdivisions"] >= 1
    # original vertices keep their indices; subdivision appended new ones
    assert len(v2) > len(v) and f2.shape[0] == f.shape[0] * 4 ** info["subdivisions"]
    scr0 = np.asarray(cam.to_screen(v, H))
    scr1 = np.asarray(cam.to_screen(v2[: len(v)], H))
    np.testing.assert_allclose(scr1[:, :2], scr0[:, :2], atol=1e-9)  # image position unchanged
    dz = scr1[:, 2] - scr0[:, 2]
    np.testing.assert_allclose(dz[: len(front)], 1.5, atol=1e-9)  # front sheet: moved by delta
    np.testing.assert_allclose(dz[len(front):], 0.0, atol=1e-12)  # hidden sheet: untouched


def test_displace_mesh_samples_the_map():
    v, f = _grid(33, size=60.0)
    cam = ScaledOrthographic(1.0, np.eye(3), [32.0, 32.0])
    H = W = 64
    rows, cols = np.mgrid[0:H, 0:W] + 0.5
    delta = 0.1 * cols - 0.05 * rows  # linear in the image: bilinear sampling is exact
    v2, _, _ = displace_mesh(v, f, cam, delta, H, target_edge_px=10.0, max_subdivisions=0)
    scr = np.asarray(cam.to_screen(v, H))
    inner = (scr[:, 0] > 1) & (scr[:, 0] < W - 1) & (scr[:, 1] > 1) & (scr[:, 1] < H - 1)
    np.testing.assert_allclose((v2 - v)[inner, 2], 0.1 * scr[inner, 0] - 0.05 * scr[inner, 1], atol=1e-9)


def test_fixed_landmark_rmse_and_crop_box():
    class M:
        landmarks = {9: 0, 18: 1, 31: 2}

    class F:
        projected = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]])

    lms = np.zeros((68, 2))
    lms[17] = [13.0, 14.0]  # iBUG 18: error 5
    lms[30] = [20.0, 20.0]  # iBUG 31: error 0
    lms[8] = [100.0, 100.0]  # iBUG 9 (chin, < 18) is not counted
    assert fixed_landmark_rmse(M, F, lms) == pytest.approx(np.sqrt(25 / 2))
    m = np.zeros((20, 30), bool)
    m[5:8, 10:12] = True
    assert crop_box(m, margin=2) == (3, 10, 8, 14)
    with pytest.raises(ValueError, match="empty"):
        crop_box(np.zeros((4, 4), bool))


# -- end to end on a synthetic render with known ground truth -------------------------------------
def _synthetic_photo(model, H=180, W=180, seed=0):
    """A model instance with small wrinkles, Lambert-shaded in a known pose; exact 68 landmarks."""
    from geomfit.mesh import subdivide, vertex_normals
    from geomfit.render import interpolate, rasterize

    rng = np.random.default_rng(seed)
    idc = 0.7 * rng.standard_normal(model.n_id)
    v = np.asarray(model.shape(idc))
    R = euler_to_matrix(np.radians(12.0), np.radians(-5.0), np.radians(3.0))
    cam = ScaledOrthographic(0.75, R, [90.0, 86.0])
    # ground truth with detail: forehead ripples along the normals of a subdivided mesh
    vs, fs = subdivide(v, model.faces, 1)
    n = np.asarray(vertex_normals(vs, fs))
    ripple = 0.8 * np.sin(vs[:, 1] / 3.0) * (vs[:, 1] > 25)
    v_gt = vs + ripple[:, None] * n
    scr = np.asarray(cam.to_screen(v_gt, H))
    ras = rasterize(scr, fs, H, W)
    nn = np.asarray(interpolate(ras, np.asarray(vertex_normals(v_gt, fs)) @ R.T))
    nn /= np.maximum(np.linalg.norm(nn, axis=-1, keepdims=True), 1e-12)
    light = np.array([-0.3, 0.4, 1.0]) / np.linalg.norm([-0.3, 0.4, 1.0])
    albedo = np.array([0.75, 0.55, 0.45])
    lin = np.clip(0.35 + 0.65 * np.clip(nn @ light, 0, 1), 0, 1)[..., None] * albedo
    img = np.where(np.asarray(ras.mask)[..., None], lin, 0.15)
    from geomfit.photo import linear_to_srgb

    img = linear_to_srgb(img)
    # landmarks: fixed vertices, plus contour candidates for the jaw
    proj = np.asarray(cam.project(v, H))
    lms = np.full((68, 2), np.nan)
    for k, vi in model.landmarks.items():
        lms[k - 1] = proj[vi]
    right, left = model.contours["right"], model.contours["left"]
    pick = np.linspace(0, len(right) - 4, 8).round().astype(int)
    lms[0:8] = proj[np.asarray(right)[pick]]
    lms[9:17] = proj[np.asarray(left)[pick[::-1]]]
    return img, lms, v, v_gt, fs, cam, np.asarray(ras.depth)


@pytest.fixture(scope="module")
def sfm_model(sfm_dir):
    from geomfit.data import resolve_model

    return resolve_model(sfm_dir / "sfm_shape_3448.bin")


def test_reconstruct_synthetic_recovers_ground_truth(sfm_model):
    _stages()
    from geomfit.pipeline import reconstruct
    from geomfit.render import depth_normals

    img, lms, v_true, v_gt, f_gt, cam, d_gt = _synthetic_photo(sfm_model)
    # the paper's fine method: it changes the depth visibly, so the mesh-follows-depth check below means
    # something (the default robust method leaves this detail-free render almost untouched)
    rec = reconstruct(img, model=sfm_model, landmarks=lms, max_side=None, fine_options={"method": "paper"})
    # coarse: exact landmarks -> pose and shape close to the truth
    ang = np.degrees(np.arccos(np.clip((np.trace(rec.camera.rotation @ np.asarray(cam.rotation).T) - 1) / 2, -1, 1)))
    assert ang < 3.0
    assert rec.diagnostics["landmark_rmse_px"] < 1.0
    err_coarse = np.sqrt(np.mean(np.sum((rec.coarse.vertices - v_true) ** 2, 1)))
    err_mean = np.sqrt(np.mean(np.sum((np.asarray(sfm_model.mean) - v_true) ** 2, 1)))
    assert err_coarse < 0.6 * err_mean
    # meshes: three stages, the fine one resampled and carrying the refined depth
    assert rec.fine.n_vertices > rec.medium.n_vertices
    assert rec.coarse.faces.shape == rec.medium.faces.shape
    assert rec.mask.sum() > 1500
    assert np.isfinite(rec.depth[rec.mask]).all() and np.isfinite(rec.normals[rec.mask]).all()
    # the fine mesh carries the refined depth: rendering it gives back the fine depth map
    import cv2
    from geomfit.render import render_depth

    inner = cv2.erode(rec.mask.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)  # beyond the feathering
    d_fine_mesh = np.asarray(render_depth(rec.fine.vertices, rec.fine.faces, rec.camera, *rec.mask.shape))
    change = np.abs(rec.depth - rec.medium_depth)[inner]
    resid = np.abs(d_fine_mesh - rec.depth)[inner]
    assert change.mean() > 0.02  # the fine stage did change the depth ...
    assert np.median(resid) < 0.25 * np.median(change) + 0.02  # ... and the mesh follows it
    # fine normals stay close to the truth away from the silhouette (a misaligned crop, a wrong
    # colour space or depth sign would ruin them); how much the fine stage improves on the medium
    # normals is the fine stage's own test (tests/test_fine.py)
    n_gt = np.asarray(depth_normals(np.where(np.isfinite(d_gt), d_gt, np.nan)))
    n_med = np.asarray(depth_normals(rec.medium_depth))
    mm = inner & np.isfinite(d_gt)

    def ang_err(n):
        return np.degrees(np.arccos(np.clip(np.sum(n[mm] * n_gt[mm], -1), -1, 1))).mean()

    assert ang_err(rec.normals) < ang_err(n_med) + 2.0
    assert set(rec.timings) >= {"coarse", "medium", "fine", "fine_mesh", "total"}
    # the default (robust) fine method end to end: normals no worse than the medium stage's (the
    # realistic-scene floor, tests/test_scenes.py), finite, and no folded triangles in any later stage
    rec_d = reconstruct(img, model=sfm_model, landmarks=lms, max_side=None)
    n_med_d = np.asarray(depth_normals(rec_d.medium_depth))
    assert np.isfinite(rec_d.depth[rec_d.mask]).all()
    assert ang_err(rec_d.normals) <= 1.03 * ang_err(n_med_d)
    assert rec_d.diagnostics["folded_triangles"]["medium"] == 0
    assert rec_d.diagnostics["folded_triangles"]["fine"] == 0
    # untextured skin: the robust stage trusts a large part of the face (measured 0.43; eyes, brows, mouth
    # and the shadowed side excluded), where the photos' textured skin gets 0.0-0.02 (docs/fine.md)
    assert 0.3 < rec_d.diagnostics["fine_supported_fraction"] <= 1.0
    assert "fine_supported_fraction" not in rec.diagnostics  # the paper's method has no confidence map


def test_mesh_code_keeps_its_old_import_path():
    import geomfit.mesh
    import geomfit.pipeline

    assert geomfit.pipeline.Mesh is geomfit.mesh.Mesh
    assert geomfit.pipeline.displace_mesh is geomfit.mesh.displace_mesh


def test_displace_mesh_smooth_subdivision_follows_a_sphere():
    # a coarse latitude-longitude sphere: plain midpoints lie inside it (the facets show once the
    # mesh is finely subdivided); the Phong-tessellated ones lie much closer to it, the original
    # vertices stay where they were, and a zero delta moves nothing
    nt, npf, R = 10, 16, 30.0
    th = np.linspace(0.15, np.pi - 0.15, nt)
    ph = np.linspace(0, 2 * np.pi, npf, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = R * np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    idx = np.arange(nt * npf).reshape(nt, npf)
    a, b = idx[:-1], np.roll(idx, -1, axis=1)[:-1]
    c, d = idx[1:], np.roll(idx, -1, axis=1)[1:]
    f = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    cam = ScaledOrthographic(1.0, np.eye(3), [40.0, 40.0])
    zero = np.zeros((80, 80))
    out = {}
    for smooth in (False, "phong"):
        v2, f2, info = displace_mesh(v, f, cam, zero, 80, target_edge_px=0.5, max_subdivisions=2, smooth=smooth)
        assert info["subdivisions"] == 2 and f2.shape[0] == 16 * f.shape[0]
        np.testing.assert_allclose(v2[: len(v)], v, atol=1e-12)
        out[smooth] = np.abs(np.linalg.norm(v2[len(v):], axis=1) - R)
    print(f"radial error of new vertices: midpoint {out[False].mean():.4f}, Phong {out['phong'].mean():.4f}")
    assert out["phong"].mean() < 0.5 * out[False].mean()  # measured 0.178 vs 0.447 (normals from the mesh itself)
    # a plane stays a plane (every scheme)
    g, fg = _grid(5, z=2.0, size=20.0)
    for smooth in ("phong", "loop"):
        g2, _, _ = displace_mesh(g, fg, cam, zero, 80, target_edge_px=0.5, max_subdivisions=2, smooth=smooth)
        np.testing.assert_allclose(g2[:, 2], 2.0, atol=1e-12)


def _loop_reference(v, f):
    # Loop's rules written plainly, one vertex and one edge at a time (the reference for the vectorised one)
    import math
    from collections import defaultdict

    opp = defaultdict(list)
    for a, b, c in f.tolist():
        for x, y, z in ((a, b, c), (b, c, a), (c, a, b)):
            opp[(min(x, y), max(x, y))].append(z)
    nbr, bnbr = defaultdict(set), defaultdict(set)
    for (x, y), zs in opp.items():
        nbr[x].add(y)
        nbr[y].add(x)
        if len(zs) != 2:
            bnbr[x].add(y)
            bnbr[y].add(x)
    vn = v.copy()
    for i in range(len(v)):
        if i in bnbr:
            if len(bnbr[i]) == 2:
                b1, b2 = sorted(bnbr[i])
                vn[i] = 0.75 * v[i] + 0.125 * (v[b1] + v[b2])
        elif nbr[i]:
            k = len(nbr[i])
            beta = (0.625 - (0.375 + 0.25 * math.cos(2 * math.pi / k)) ** 2) / k
            vn[i] = (1 - k * beta) * v[i] + beta * sum(v[j] for j in nbr[i])
    edges = sorted(opp)
    ep = [0.375 * (v[x] + v[y]) + 0.125 * (v[opp[(x, y)][0]] + v[opp[(x, y)][1]]) if len(opp[(x, y)]) == 2
          else 0.5 * (v[x] + v[y]) for x, y in edges]
    return np.concatenate([vn, np.array(ep)])


def test_loop_subdivision_matches_plain_reference_and_is_smoother_than_phong():
    from geomfit.mesh import _loop_subdivide, _phong_subdivide, subdivide

    rng = np.random.default_rng(3)
    nt, npf, R = 6, 9, 30.0  # an open sphere band (two boundary rings), jittered
    th = np.linspace(0.4, np.pi - 0.4, nt)
    ph = np.linspace(0, 2 * np.pi, npf, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = R * np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    v = v + rng.normal(0, 0.3, v.shape)
    idx = np.arange(nt * npf).reshape(nt, npf)
    a, b = idx[:-1], np.roll(idx, -1, axis=1)[:-1]
    c, d = idx[1:], np.roll(idx, -1, axis=1)[1:]
    f = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    v2, f2 = _loop_subdivide(v, f)
    np.testing.assert_allclose(v2, _loop_reference(v, f), atol=1e-12)
    np.testing.assert_array_equal(f2, subdivide(v, f, 1)[1])

    def roughness(vv, ff):  # spread (std) of the angles between normals of faces sharing an edge (deg): creases
        fn = np.cross(vv[ff[:, 1]] - vv[ff[:, 0]], vv[ff[:, 2]] - vv[ff[:, 0]])
        fn /= np.linalg.norm(fn, axis=1, keepdims=True)
        e = np.concatenate([ff[:, [0, 1]], ff[:, [1, 2]], ff[:, [2, 0]]])
        key = np.sort(e, axis=1)
        order = np.lexsort(key.T[::-1])
        ks, fi = key[order], np.tile(np.arange(len(ff)), 3)[order]
        same = (ks[1:] == ks[:-1]).all(1)
        cosang = (fn[fi[1:][same]] * fn[fi[:-1][same]]).sum(1)
        return np.degrees(np.arccos(np.clip(cosang, -1, 1))).std()

    lv, lf = v, f
    pv, pf = v, f
    for _ in range(3):
        lv, lf = _loop_subdivide(lv, lf)
        pv, pf = _phong_subdivide(pv, pf)
    rl, rp = roughness(lv, lf), roughness(pv, pf)
    print(f"dihedral angle spread after 3 levels: Loop {rl:.3f} deg, Phong {rp:.3f} deg")
    assert rl < 0.8 * rp  # measured 1.649 vs 2.439 deg (0.68x)
