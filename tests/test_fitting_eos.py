"""The coarse fit on a real photo against eos-py (the peer), on the same landmarks and model."""
import numpy as np
import pytest

from geomfit.fitting import fit_landmarks

from _fit_helpers import load_sfm, read_pts

eos = pytest.importorskip("eos")


def eos_fit(sfm_dir, pts, h, w):
    d = str(sfm_dir) + "/"
    m = eos.morphablemodel.load_model(d + "sfm_shape_3448.bin")
    bs = eos.morphablemodel.load_blendshapes(d + "expression_blendshapes_3448.bin")
    mm = eos.morphablemodel.MorphableModel(m.get_shape_model(), bs, color_model=eos.morphablemodel.PcaModel(),
                                           vertex_definitions=None,
                                           texture_coordinates=m.get_texture_coordinates())
    lms = [eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(pts)]
    mesh, pose, sc, bc = eos.fitting.fit_shape_and_pose(
        mm, lms, eos.core.LandmarkMapper(d + "ibug_to_sfm.txt"), w, h,
        eos.morphablemodel.load_edge_topology(d + "sfm_3448_edge_topology.json"),
        eos.fitting.ContourLandmarks.load(d + "ibug_to_sfm.txt"),
        eos.fitting.ModelContour.load(d + "sfm_model_contours.json"))
    V = np.c_[np.asarray(mesh.vertices, dtype=np.float64), np.ones(len(mesh.vertices))]
    clip = (np.asarray(pose.get_projection()) @ np.asarray(pose.get_modelview()) @ V.T).T
    # eos's viewport (0, h, w, -h): pixel coordinates with a top-left origin
    return np.c_[(clip[:, 0] + 1) / 2 * w, h - (clip[:, 1] + 1) / 2 * h], np.asarray(sc)


def jaw_distance(projected, pts, model):
    """Per jaw landmark: distance to the nearest projected contour candidate of its side (px)."""
    out = []
    for side, ibug in (("right", range(1, 9)), ("left", range(10, 18))):
        cand = projected[np.asarray(model.contours[side])]
        for i in ibug:
            out.append(np.linalg.norm(cand - pts[i - 1], axis=1).min())
    return np.asarray(out)


def test_image_0010_beats_eos(data, sfm_dir):
    import cv2

    img = cv2.imread(str(data / "images" / "image_0010.png"), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    assert (h, w) == (1024, 1280)
    pts = read_pts(data / "images" / "image_0010.pts")
    model = load_sfm(sfm_dir)
    eos_proj, eos_id = eos_fit(sfm_dir, pts, h, w)
    res = fit_landmarks(model, pts, (h, w))

    inner = np.array(sorted(k for k in model.landmarks if 18 <= k <= 68))
    assert len(inner) == 49
    iv = np.array([model.landmarks[k] for k in inner])

    def rms(proj):
        return np.sqrt((np.linalg.norm(proj[iv] - pts[inner - 1], axis=1) ** 2).mean())

    ours, theirs = rms(res.projected), rms(eos_proj)
    jaw_ours, jaw_eos = jaw_distance(res.projected, pts, model), jaw_distance(eos_proj, pts, model)
    print(f"\nimage_0010 inner-49 RMS: geomfit {ours:.2f} px, eos {theirs:.2f} px; jaw to contour mean: "
          f"geomfit {jaw_ours.mean():.2f} px, eos {jaw_eos.mean():.2f} px; max |id| geomfit "
          f"{np.abs(res.id_coeffs).max():.2f}, eos {np.abs(eos_id).max():.2f}; iterations {res.iterations}")
    assert res.converged
    assert ours < theirs
    assert jaw_ours.mean() <= jaw_eos.mean()
    assert np.abs(res.id_coeffs).max() < 4.0
    # the reported landmark RMS agrees with the mesh projection
    lv = res.landmark_vertices
    used = lv >= 0
    r = np.linalg.norm(res.projected[lv[used]] - pts[used], axis=1)
    np.testing.assert_allclose(res.rmse_px, np.sqrt((r ** 2).mean()), rtol=1e-9)
