"""The geomfit command: end to end on image_0010, outputs, reliability, the other sub-commands."""
import json
import subprocess
import sys

import numpy as np
import pytest

from geomfit import metrics
from geomfit.cli import main


def _stages(fine=True):
    need = [("geomfit.fitting", "fit_landmarks"), ("geomfit.laplacian", "medium_stage")]
    for mod, name in need + ([("geomfit.fine", "fine_stage")] if fine else []):
        m = pytest.importorskip(mod, reason=f"{mod} not merged")
        if not hasattr(m, name):
            pytest.skip(f"{mod}.{name} not merged")


@pytest.fixture
def env(data, monkeypatch, tmp_path):
    monkeypatch.setenv("GEOMFIT_DATA", str(data))
    monkeypatch.setenv("GEOMFIT_CACHE", str(tmp_path / "cache"))
    return data


@pytest.fixture(scope="module")
def run_0010(data, tmp_path_factory):
    """One CLI reconstruction of image_0010 with its annotated landmarks (working size 256)."""
    _stages()
    import os

    os.environ.setdefault("GEOMFIT_DATA", str(data))
    out = tmp_path_factory.mktemp("rec") / "out"
    img = data / "images" / "image_0010.png"
    rc = main(["reconstruct", str(img), "--landmarks", str(data / "images" / "image_0010.pts"),
               "-o", str(out), "--max-side", "256", "--ply", "--quiet"])
    return rc, out


def test_reconstruct_image_0010_outputs(run_0010, data):
    import cv2
    import trimesh

    rc, out = run_0010
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    expected = {"coarse.obj", "medium.obj", "fine.obj", "coarse.ply", "medium.ply", "fine.ply", "depth.png",
                "normal.png", "albedo.png", "maps.npz", "overview.png", "report.json"}
    assert names == expected  # and no temporary files left
    rep = json.loads((out / "report.json").read_text())
    assert rep["image_size"] == [1280, 1024] and max(rep["working_size"]) == 256
    # landmark RMS in photo pixels; eos's default fit gives 7.15 px on this photo (ENGINEERING.md)
    assert 0 < rep["landmark_rmse_px"] < 10.0
    for k in ("landmarks", "coarse", "medium", "fine", "fine_mesh", "total"):
        assert rep["timings_s"][k] >= 0
    meshes = {n: trimesh.load(out / f"{n}.obj", process=False) for n in ("coarse", "medium", "fine")}
    assert len(meshes["coarse"].vertices) == len(meshes["medium"].vertices) == 3448
    assert len(meshes["fine"].vertices) > 3448
    # report and meshes agree with the landmarks: project the coarse mesh's nose tip (iBUG 31 = vertex 114)
    cam = rep["camera"]
    R, s, t = np.array(cam["rotation"]), cam["scale"], np.array(cam["translation"])
    v = np.asarray(meshes["coarse"].vertices)[114]
    H = rep["working_size"][1]
    uv = np.array([s * (R @ v)[0] + t[0], H - (s * (R @ v)[1] + t[1])]) / rep["working_scale"]
    pts = np.array(open(data / "images" / "image_0010.pts").read().split("{")[1].split("}")[0].split(), float)
    assert np.linalg.norm(uv - pts.reshape(68, 2)[30]) < 15.0
    # depth PNG decodes back to the depth map
    maps = np.load(out / "maps.npz")
    png = cv2.imread(str(out / "depth.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16
    d = maps["depth"]
    ok = np.isfinite(d)
    np.testing.assert_array_equal(png > 0, ok)
    lo, hi = rep["depth_png"]["min_px"], rep["depth_png"]["max_px"]
    np.testing.assert_allclose(lo + (png[ok] - 1.0) / 65534 * (hi - lo), d[ok], atol=(hi - lo) / 65534)
    ov = cv2.imread(str(out / "overview.png"))
    assert ov.shape[0] > 300 and ov.shape[1] > 4 * 150


def test_existing_outdir_needs_force(run_0010, capsys):
    rc, out = run_0010
    before = (out / "report.json").read_bytes()
    img = out / "overview.png"
    rc = main(["reconstruct", str(img), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--force" in err[0]
    assert (out / "report.json").read_bytes() == before


def test_bad_inputs_one_line_errors(env, tmp_path, capsys):
    data = env
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    cases = [
        (["reconstruct", str(bad), "-o", str(tmp_path / "o1")], "cannot read image"),
        (["reconstruct", str(tmp_path / "missing.jpg"), "-o", str(tmp_path / "o2")], "not found"),
    ]
    pts_bad = tmp_path / "bad.pts"
    pts_bad.write_text("version: 1\nn_points: 68\n{\n1 2\nthree 4\n}\n")
    img = str(data / "images" / "image_0010.png")
    cases.append((["reconstruct", img, "--landmarks", str(pts_bad), "-o", str(tmp_path / "o3")], "bad.pts"))
    small = tmp_path / "small.png"
    import cv2

    cv2.imwrite(str(small), np.zeros((100, 120, 3), np.uint8))
    cases.append((["reconstruct", str(small), "--landmarks", str(data / "images" / "image_0010.pts"), "-o",
                   str(tmp_path / "o4")], "outside"))
    cases.append((["reconstruct", img, "--model", str(tmp_path / "nomodel.bin"), "-o", str(tmp_path / "o5")],
                  "nomodel.bin"))
    for argv, needle in cases:
        rc = main(argv + ["--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1, argv
        assert len(err) == 1 and err[0].startswith("geomfit: error:") and needle in err[0], err
    # a bad image or landmark file leaves no output directory behind
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    from geomfit.landmarks import available_detectors

    if available_detectors()["dlib"]:
        blank = tmp_path / "blank.png"
        cv2.imwrite(str(blank), np.full((120, 160, 3), 128, np.uint8))
        rc = main(["reconstruct", str(blank), "-o", str(tmp_path / "o6"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "no face found" in err[0]
        assert not (tmp_path / "o6").exists()


def test_gray_16bit_photo(env, tmp_path):
    _stages(fine=False)
    import cv2

    data = env
    img = cv2.imread(str(data / "images" / "image_0010.png"))
    gray16 = (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    p = tmp_path / "gray16.png"
    cv2.imwrite(str(p), gray16)
    out = tmp_path / "g"
    rc = main(["reconstruct", str(p), "--landmarks", str(data / "images" / "image_0010.pts"), "-o", str(out),
               "--max-side", "160", "--no-fine", "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["image_size"] == [1280, 1024] and rep["landmark_rmse_px"] < 12


def test_fit_landmarks_batch(env, tmp_path):
    _stages(fine=False)
    data = env
    pts = data / "images" / "image_0010.pts"
    # a second, shifted copy of the landmarks: same fit, shifted translation
    q = np.array(open(pts).read().split("{")[1].split("}")[0].split(), float).reshape(68, 2)
    p2 = tmp_path / "shifted.pts"
    p2.write_text("version: 1\nn_points: 68\n{\n" + "\n".join(f"{x + 20} {y + 10}" for x, y in q) + "\n}\n")
    out = tmp_path / "fits"
    rc = main(["fit-landmarks", str(pts), str(p2), "-o", str(out), "--image-size", "1024", "1280", "--quiet"])
    assert rc == 0
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert len(fits) == 2 and (out / "image_0010.obj").is_file() and (out / "shifted.obj").is_file()
    a, b = fits
    assert a["landmark_rmse_px"] == pytest.approx(b["landmark_rmse_px"], rel=1e-3, abs=1e-3)
    np.testing.assert_allclose(np.array(b["translation"]) - a["translation"], [20, -10], atol=0.05)


def test_info_and_download(env, tmp_path, capsys):
    data = env
    assert main(["info", "sfm"]) == 0
    txt = capsys.readouterr().out
    assert "vertices:     3448" in txt and "expression:   6" in txt
    dest = tmp_path / "dl"
    assert main(["download-model", "sfm", "--url-base", (data / "sfm").as_uri(), "--dest", str(dest), "-q"]) == 0
    assert "installed in" in capsys.readouterr().out
    assert (dest / "sfm_shape_3448.bin").read_bytes() == (data / "sfm" / "sfm_shape_3448.bin").read_bytes()
    assert main(["info", str(dest / "sfm_shape_3448.bin")]) == 0


def test_evaluate_meshes_and_depth(tmp_path, capsys):
    import trimesh
    from scipy.spatial.transform import Rotation

    x, y = np.meshgrid(np.linspace(-80, 80, 60), np.linspace(-80, 80, 60))
    z = 50 * np.exp(-(x ** 2 + y ** 2) / 5000.0) + 4 * np.sin(x / 15.0)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(3600).reshape(60, 60)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    R = Rotation.from_euler("xyz", [4, -6, 3], degrees=True).as_matrix()
    pred = v @ R.T + [3, 2, 1]
    trimesh.Trimesh(v, f, process=False).export(tmp_path / "gt.obj")
    trimesh.Trimesh(pred, f, process=False).export(tmp_path / "pred.ply")
    js = tmp_path / "e.json"
    assert main(["evaluate", str(tmp_path / "pred.ply"), str(tmp_path / "gt.obj"), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    ref = metrics.micc_errors(pred, v, pred_faces=f, gt_faces=f)
    assert res["rmse_point_to_plane"] == pytest.approx(ref["rmse_point_to_plane"], rel=1e-6, abs=1e-9)
    assert res["rmse_point_to_plane"] < 0.05
    assert "point-to-plane RMSE" in capsys.readouterr().out
    rng = np.random.default_rng(0)
    d1 = rng.uniform(size=(20, 20)) * (rng.uniform(size=(20, 20)) > 0.3)
    d2 = rng.uniform(size=(20, 20)) * (rng.uniform(size=(20, 20)) > 0.3)
    np.save(tmp_path / "a.npy", d1)
    np.save(tmp_path / "b.npy", d2)
    assert main(["evaluate", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["mae"] == pytest.approx(metrics.depth_mae(d1, d2))


def test_python_dash_m_and_usage_error():
    r = subprocess.run([sys.executable, "-m", "geomfit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "reconstruct" in r.stdout
    r = subprocess.run([sys.executable, "-m", "geomfit", "reconstruct"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "required" in r.stderr
