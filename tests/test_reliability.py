"""Regression tests for the reliability defects of issue 12: result folders written as a whole,
signals, file modes, concurrent runs, bad files named in one-line errors.

Signals are sent at exact points of the write phase: the test-only hook ``GEOMFIT_TEST_PAUSE=<point>``
makes the ``geomfit`` process create a flag file and wait there until the test removes it (or
signals the process), so nothing depends on a timer.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from geomfit import atomic
from geomfit.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _need_stages():
    for mod, name in [("geomfit.fitting", "fit_landmarks"), ("geomfit.laplacian", "medium_stage")]:
        m = pytest.importorskip(mod)
        if not hasattr(m, name):
            pytest.skip(f"{mod}.{name} not merged")


def _read_pts(p):
    return np.array(open(p).read().split("{")[1].split("}")[0].split(), float).reshape(68, 2)


def _write_pts(p, q):
    pathlib.Path(p).write_text("version: 1\nn_points: 68\n{\n" + "\n".join(f"{x:.3f} {y:.3f}" for x, y in q) + "\n}\n")


@pytest.fixture(scope="module")
def small(data, tmp_path_factory):
    """image_0010 at a quarter size (320x256) with its landmarks scaled: a fast real photo."""
    import cv2

    _need_stages()
    d = tmp_path_factory.mktemp("small")
    img = cv2.imread(str(data / "images" / "image_0010.png"))
    cv2.imwrite(str(d / "face.png"), cv2.resize(img, (320, 256), interpolation=cv2.INTER_AREA))
    _write_pts(d / "face.pts", _read_pts(data / "images" / "image_0010.pts") / 4.0)
    return d


@pytest.fixture
def env(data, monkeypatch, tmp_path):
    monkeypatch.setenv("GEOMFIT_DATA", str(data))
    monkeypatch.setenv("GEOMFIT_CACHE", str(tmp_path / "cache"))
    return data


def _args(small, out, *extra):
    return ["reconstruct", str(small / "face.png"), "--landmarks", str(small / "face.pts"), "-o", str(out),
            "--no-fine", "-q", *extra]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())}


def _leftovers(parent):
    """Hidden staging folders, lock files or temporary files anywhere below ``parent``."""
    return sorted(str(p.relative_to(parent)) for p in pathlib.Path(parent).rglob(".*"))


def _spawn(argv, tmp_path, **env):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "-m", "geomfit", *argv], cwd=str(tmp_path), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_flag(flag, proc, timeout=180):
    t_end = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before the pause point: {err[-2000:]}")
        if time.monotonic() > t_end:
            proc.kill()
            raise AssertionError("pause point not reached")
        time.sleep(0.02)


# -- defects 1, 9, 10: a result folder is the old set or the new set, never a mix ---------------------
@pytest.mark.parametrize("sig, point", [pytest.param(sig, point, id=f"{sig.name}-{point}") for sig, point in
                                        [(signal.SIGINT, "write:1"), (signal.SIGINT, "write:6"),
                                         (signal.SIGTERM, "write:3"), (signal.SIGTERM, "commit")]])
def test_force_interrupted_keeps_the_old_set(env, small, tmp_path, sig, point):
    """Issue 12 defects 1 and 9: --force onto a result, signalled while writing the new one."""
    out = tmp_path / "res"
    assert main(_args(small, out, "--max-side", "96", "--ply")) == 0
    old = _snapshot(out)
    flag = tmp_path / "paused"
    p = _spawn(_args(small, out, "--max-side", "128", "--force"), tmp_path,
               GEOMFIT_TEST_PAUSE=point, GEOMFIT_TEST_PAUSE_FILE=str(flag))
    _wait_flag(flag, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(out) == old  # byte for byte the old set, report.json included
    assert _leftovers(tmp_path) == []  # no staging folder, temporary file or lock file (defect 9)


def test_force_replaces_the_whole_set(env, small, tmp_path):
    """Issue 12 defect 10: --force leaves no stale file of the earlier run (.ply from --ply)."""
    out = tmp_path / "res"
    assert main(_args(small, out, "--max-side", "96", "--ply")) == 0
    assert (out / "fine.ply").is_file()
    assert main(_args(small, out, "--max-side", "128", "--force")) == 0
    rep = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(rep["files"])
    assert not list(out.glob("*.ply")) and max(rep["working_size"]) == 128
    assert _leftovers(tmp_path) == []


def test_disk_full_names_the_file_and_keeps_the_old_set(env, small, tmp_path, monkeypatch, capsys):
    """Issue 12 defects 1 and 11: an OSError while writing (disk full) names the real file."""
    import errno

    out = tmp_path / "res"
    assert main(_args(small, out, "--max-side", "96")) == 0
    old = _snapshot(out)
    real = atomic.write_image

    def full(path, *a, **k):
        if pathlib.Path(path).name == "overview.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **k)

    monkeypatch.setattr(atomic, "write_image", full)
    capsys.readouterr()
    assert main(_args(small, out, "--max-side", "128", "--force")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'overview.png'}" in err[0] and "No space left" in err[0], err
    assert _snapshot(out) == old and _leftovers(tmp_path) == []


# -- defect 2: file modes follow the umask ----------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(env, small, tmp_path, umask):
    """Issue 12 defect 2: results (and the writers of geomfit.io and save_mesh) were all 0600."""
    from geomfit.io import write_pts
    from geomfit.mesh import save_mesh

    old = os.umask(umask)
    try:
        out = tmp_path / "res"
        assert main(_args(small, out, "--max-side", "96", "--ply")) == 0
        fits = tmp_path / "fits"
        assert main(["fit-landmarks", str(small / "face.pts"), "-o", str(fits), "-q"]) == 0
        write_pts(tmp_path / "x.pts", np.zeros((68, 2)))
        save_mesh(tmp_path / "m.obj", np.eye(3), np.array([[0, 1, 2]]))
        atomic.write_json(tmp_path / "j.json", {"a": 1})
        dl = tmp_path / "models"  # a shared model cache must be readable by its other users
        assert main(["download-model", "sfm", "--url-base", (env / "sfm").as_uri(), "--dest", str(dl), "-q"]) == 0
    finally:
        os.umask(old)
    files = list(out.iterdir()) + list(fits.iterdir()) + [tmp_path / n for n in ("x.pts", "m.obj", "j.json")]
    files += [p for p in dl.iterdir() if p.is_file()]
    assert len(files) > 20
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    assert oct(fits.stat().st_mode & 0o777) == oct(0o777 & ~umask)


# -- defect 3: Ctrl-C is never swallowed ----------------------------------------------------------
def test_signal_inside_a_baseexception_catch_is_not_swallowed(tmp_path, monkeypatch):
    """Issue 12 defect 3: trimesh's optional imports catch BaseException; a Ctrl-C arriving while
    such code runs must still interrupt once it is done.  A module that behaves like trimesh is
    imported the way geomfit imports trimesh (signals_deferred)."""
    (tmp_path / "catches_all.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.05)\n"
        "    SWALLOWED = False\n"
        "except BaseException:\n"
        "    SWALLOWED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        with atomic.signals_deferred():
            import catches_all
        pytest.fail("KeyboardInterrupt was not raised after the block")
    assert catches_all.SWALLOWED is False  # the signal waited until the import was done
    # without the guard the same module swallows it: the check above can fail
    sys.modules.pop("catches_all")
    import catches_all as again  # noqa: F811

    assert again.SWALLOWED is True


def test_cli_imports_trimesh_before_writing(env, small, tmp_path):
    """Issue 12 defect 3: trimesh is imported (signals deferred) before the result folder is claimed."""
    code = ("import sys, geomfit.atomic as a\n"
            "def hook(point, _h=a.test_hook):\n"
            "    if point == 'claimed': print('TRIMESH', 'trimesh' in sys.modules, flush=True)\n"
            "    _h(point)\n"
            "a.test_hook = hook\n"
            "from geomfit.cli import main\n"
            f"sys.exit(main({_args(small, tmp_path / 'o', '--max-side', '96')!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TRIMESH True" in r.stdout


# -- defect 5: fit-landmarks with repeated file names -----------------------------------------------
def test_fit_landmarks_duplicate_stems(env, small, tmp_path):
    """Issue 12 defect 5: a/face.pts and b/face.pts wrote one face.obj for both."""
    import trimesh

    from geomfit import fit_landmarks, resolve_model

    q = _read_pts(small / "face.pts")
    c = q.mean(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_pts(tmp_path / "a" / "face.pts", q)
    qb = c + (q - c) @ np.array([[1.0, 0.0], [0.0, 1.15]])  # a longer face
    _write_pts(tmp_path / "b" / "face.pts", qb)
    out = tmp_path / "fits"
    rc = main(["fit-landmarks", str(tmp_path / "a" / "face.pts"), str(tmp_path / "b" / "face.pts"), "-o", str(out),
               "--image-size", "256", "320", "-q"])
    assert rc == 0
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert [f["mesh"] for f in fits] == ["a-face.obj", "b-face.obj"]
    model = resolve_model("sfm")
    for f, pts in zip(fits, (q, qb)):
        ref = np.asarray(fit_landmarks(model, np.array(pts)[None], image_size=np.array([[256.0, 320.0]])).vertices)[0]
        v = np.asarray(trimesh.load(out / f["mesh"], process=False).vertices)
        np.testing.assert_allclose(v, ref, atol=1e-3)  # each file holds its own fit
    va = np.asarray(trimesh.load(out / "a-face.obj", process=False).vertices)
    vb = np.asarray(trimesh.load(out / "b-face.obj", process=False).vertices)
    assert np.abs(va - vb).max() > 1.0


# -- defect 6: two runs into the same new folder ----------------------------------------------------
def test_concurrent_runs_second_is_refused(env, small, tmp_path, capsys):
    """Issue 12 defect 6: both runs passed the empty-folder check and both reported success."""
    out = tmp_path / "same"
    flag = tmp_path / "paused"
    p = _spawn(_args(small, out, "--max-side", "96"), tmp_path, GEOMFIT_TEST_PAUSE="claimed",
               GEOMFIT_TEST_PAUSE_FILE=str(flag))
    _wait_flag(flag, p)
    try:
        rc = main(_args(small, out, "--max-side", "128"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "another geomfit run is writing to" in err[0] and str(out) in err[0], err
        rc = main(["fit-landmarks", str(small / "face.pts"), "-o", str(out), "-q"])
        assert rc == 1 and "another geomfit run" in capsys.readouterr().err
        assert not out.exists()  # the second run created nothing
    finally:
        flag.unlink()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert max(rep["working_size"]) == 96  # the first run's result, complete
    assert _leftovers(tmp_path) == []


def test_lock_released_when_the_holder_is_killed(tmp_path):
    """A SIGKILLed run leaves its lock file and staging folder; the next claim is not blocked and
    removes the leftovers."""
    code = ("import sys, geomfit.atomic as a\n"
            f"r = a.ResultDir({str(tmp_path / 'o')!r}); r.claim(); (r.staging / 'x.obj').write_text('v')\n"
            "print('READY', flush=True); import time; time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    with pytest.raises(atomic.OutputBusyError):
        atomic.ResultDir(tmp_path / "o").claim()
    p.kill()
    p.wait()
    assert _leftovers(tmp_path)  # the killed run's lock and staging folder are there
    rd = atomic.ResultDir(tmp_path / "o")
    with rd:
        (rd.staging / "a.json").write_text("{}")
        rd.commit()
    assert sorted(q.name for q in (tmp_path / "o").iterdir()) == ["a.json"] and _leftovers(tmp_path) == []


# -- defects 7, 8, 12: inputs checked first, errors name the file ---------------------------------------
def test_empty_image_files_named(env, small, tmp_path, capsys):
    """Issue 12 defect 7: an empty image gave a cv2.error traceback in evaluate and fit-landmarks."""
    (tmp_path / "e.png").write_bytes(b"")
    (tmp_path / "f.png").write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "e.png"), str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e.png" in err[0] and "empty" in err[0], err
    (tmp_path / "face.pts").write_bytes((small / "face.pts").read_bytes())
    (tmp_path / "face.png").write_bytes(b"")
    assert main(["fit-landmarks", str(tmp_path / "face.pts"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "face.png") in err[0] and "empty" in err[0], err
    assert main(["reconstruct", str(tmp_path / "face.png"), "-o", str(tmp_path / "o2"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "face.png" in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_fit_landmarks_validates_before_creating_outdir(env, small, tmp_path, capsys):
    """Issue 12 defect 8: every failure of fit-landmarks left an empty OUTDIR."""
    bad = tmp_path / "bad.pts"
    bad.write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    out = tmp_path / "new" / "deeper" / "fits"
    assert main(["fit-landmarks", str(small / "face.pts"), str(bad), "-o", str(out), "-q"]) == 1
    assert "bad.pts" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["fit-landmarks", str(small / "face.pts"), "--model", str(tmp_path / "none.bin"), "-o", str(out),
                 "-q"]) == 1
    assert not (tmp_path / "new").exists()


def _unwritable(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere that is not read-only: use a file system that refuses
        if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
            pytest.skip("no unwritable folder available")
        return pathlib.Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_unwritable_outdir_found_before_the_work(env, small, tmp_path, monkeypatch, capsys):
    """Issue 12 defect 11: an unwritable OUTDIR was found only after the whole pipeline ran."""
    import geomfit.pipeline as pl

    ran = []
    monkeypatch.setattr(pl, "reconstruct", lambda *a, **k: ran.append(1))
    parent = _unwritable(tmp_path)
    out = parent / "geomfit-out"
    assert main(_args(small, out, "--max-side", "96")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "not writable" in err[0], err
    assert ran == []  # refused before the pipeline
    notdir = tmp_path / "file.txt"
    notdir.write_text("x")
    assert main(_args(small, notdir / "out", "--max-side", "96")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(notdir) in err[0] and "not a folder" in err[0], err
    assert ran == []


def test_folder_as_image_and_no_face_named(env, tmp_path, capsys):
    """Issue 12 defect 12: a folder given as the image said "image file not found"; "no face found"
    did not name the photo."""
    import cv2

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["reconstruct", str(empty), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "holds no photos" in err[0], err
    assert main(["fit-landmarks", str(empty), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0], err
    assert not (tmp_path / "o").exists()
    from geomfit.landmarks import available_detectors

    if not available_detectors().get("dlib"):
        pytest.skip("dlib not installed: no-face message not checked")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 128, np.uint8))
    assert main(["reconstruct", str(blank), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no face found" in err[0] and str(blank) in err[0], err
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_force_refuses_a_folder_geomfit_did_not_write(env, small, tmp_path, capsys):
    """--force replaces a result folder as a whole, so it must not delete a user's other files."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(_args(small, out, "--max-side", "96", "--force")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "thesis.tex" in err[0], err
    assert (out / "thesis.tex").read_text() == "precious"


# -- ResultDir on its own ------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False])
def test_result_dir_replaces_as_a_whole(tmp_path, monkeypatch, exchange):
    """Both ways of swapping (the atomic exchange and the two-rename fallback) give the new set only."""
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "o"
    with atomic.ResultDir(out) as rd:
        (rd.staging / "a.json").write_text("old")
        (rd.staging / "stale.ply").write_text("old")
        assert not out.exists()  # nothing visible before the commit
        rd.commit()
    with atomic.ResultDir(out, force=True) as rd:
        (rd.staging / "a.json").write_text("new")
        assert sorted(q.name for q in out.iterdir()) == ["a.json", "stale.ply"]  # old set until the commit
        rd.commit()
    assert {q.name: q.read_text() for q in out.iterdir()} == {"a.json": "new"}
    assert _leftovers(tmp_path) == []
    with pytest.raises(atomic.OutputError, match="not empty"):
        atomic.ResultDir(out).claim()
    assert _leftovers(tmp_path) == []


def test_result_dir_through_a_symlink(tmp_path):
    """A symlinked OUTDIR: the result lands where the link points and the link stays a link."""
    real = tmp_path / "scratch" / "res"
    real.mkdir(parents=True)
    (real / "report.json").write_text("old")
    link = tmp_path / "res"
    link.symlink_to(real)
    with atomic.ResultDir(link, force=True) as rd:
        (rd.staging / "report.json").write_text("new")
        rd.commit()
    assert link.is_symlink() and (link / "report.json").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_python_api_names_the_folder_and_the_photo(env, tmp_path):
    """Issue 12 defect 12 through the Python API: a folder is not "not found"; no face names the photo."""
    import cv2

    from geomfit.pipeline import reconstruct

    with pytest.raises(ValueError, match="is a folder, not an image file"):
        reconstruct(tmp_path, model="sfm")
    from geomfit.landmarks import NoFaceError, available_detectors

    if not available_detectors().get("dlib"):
        pytest.skip("dlib not installed")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match=f"no face found in {blank}"):
        reconstruct(blank, model="sfm")
