"""Batches of photos: ``geomfit reconstruct PHOTO|DIR ... -o OUTDIR`` and ``geomfit.reconstruct_many``,
in this process and on a real Dask ``LocalCluster`` (with a worker killed mid-batch)."""
import json
import os
import pathlib

import numpy as np
import pytest

from geomfit.batch import collect_photos, unique_names
from geomfit.cli import main


def _read_pts(p):
    return np.array(open(p).read().split("{")[1].split("}")[0].split(), float).reshape(68, 2)


def _photo(data, path, scale):
    import cv2

    img = cv2.imread(str(data / "images" / "image_0010.png"))
    size = (int(round(1280 * scale)), int(round(1024 * scale)))
    cv2.imwrite(str(path), cv2.resize(img, size, interpolation=cv2.INTER_AREA))
    q = _read_pts(data / "images" / "image_0010.pts") * scale
    pathlib.Path(path).with_suffix(".pts").write_text(
        "version: 1\nn_points: 68\n{\n" + "\n".join(f"{x:.3f} {y:.3f}" for x, y in q) + "\n}\n")


@pytest.fixture
def photos(data, tmp_path, monkeypatch):
    for mod, name in [("geomfit.fitting", "fit_landmarks"), ("geomfit.laplacian", "medium_stage")]:
        if not hasattr(pytest.importorskip(mod), name):
            pytest.skip(f"{mod}.{name} not merged")
    monkeypatch.setenv("GEOMFIT_DATA", str(data))
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    _photo(data, d / "a.png", 0.25)
    _photo(data, d / "b.png", 0.2)
    _photo(data, d / "sub" / "a.png", 0.3)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return d


OPTS = ["--no-fine", "--max-side", "128", "-q"]


def test_collect_photos_and_unique_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for p in ["x/face.png", "x/B.JPG", "x/notes.txt", "x/.hidden.png", "y/face.png", "y/summary.json.png"]:
        (tmp_path / p).write_bytes(b"")
    got = collect_photos([tmp_path / "x", tmp_path / "y", tmp_path / "x" / "face.png", "skimage:astronaut"])
    assert got == [str(tmp_path / p) for p in ["x/B.JPG", "x/face.png", "y/face.png", "y/summary.json.png"]] + \
        ["skimage:astronaut"]
    names = unique_names(got)
    assert names == ["B", "x-face", "y-face", "_summary.json", "astronaut"]
    assert len({n.lower() for n in names}) == len(names)
    # equal stems in folders with equal names, and names equal but for case: still unique, stable
    ps = [str(tmp_path / "p" / "q" / "face.png"), str(tmp_path / "r" / "q" / "face.png"), "Face.png", "face.jpg"]
    n1 = unique_names(ps)
    assert len({n.lower() for n in n1}) == 4 and n1 == unique_names(ps)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no photos"):
        collect_photos([tmp_path / "x" / "face.png", tmp_path / "empty"])


def test_batch_summary_failure_and_resume(photos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["reconstruct", str(photos), str(photos / "sub"), "-o", str(out), *OPTS])
    err = capsys.readouterr().err
    assert rc == 1  # a photo failed
    assert "broken.png" in err and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    by = {p["name"]: p for p in s["photos"]}
    assert sorted(by) == ["b", "broken", "in-a", "sub-a"]
    assert (s["n_photos"], s["n_ok"], s["n_failed"]) == (4, 3, 1)
    assert by["broken"]["status"] == "failed" and "broken.png" in by["broken"]["error"]
    assert not (out / "broken").exists()
    for n in ("in-a", "b", "sub-a"):
        rep = json.loads((out / n / "report.json").read_text())
        assert by[n]["status"] == "ok" and by[n]["landmark_rmse_px"] == pytest.approx(rep["landmark_rmse_px"])
        assert rep["landmarks"]["detector"] == "pts"  # the .pts beside the photo was used
        assert rep["landmarks"]["file"] == str(pathlib.Path(by[n]["input"]).with_suffix(".pts"))
        assert by[n]["timings_s"]["total"] > 0 and by[n]["seconds"] >= by[n]["timings_s"]["total"]
        assert sorted(q.name for q in (out / n).iterdir()) == sorted(rep["files"])
    # the same photo alone gives the same fit (independent single-photo run)
    single = tmp_path / "single"
    assert main(["reconstruct", str(photos / "b.png"), "--landmarks", str(photos / "b.pts"), "-o", str(single),
                 *OPTS]) == 0
    assert json.loads((single / "report.json").read_text())["landmark_rmse_px"] == pytest.approx(
        by["b"]["landmark_rmse_px"], rel=1e-9)
    # a second run without --resume/--force is refused; --resume skips the finished photos
    assert main(["reconstruct", str(photos), str(photos / "sub"), "-o", str(out), *OPTS]) == 1
    assert "--resume" in capsys.readouterr().err
    before = {n: (out / n / "report.json").stat().st_mtime_ns for n in ("in-a", "b", "sub-a")}
    _photo(pathlib.Path(os.environ["GEOMFIT_DATA"]), photos / "broken.png", 0.22)  # repair the broken photo
    assert main(["reconstruct", str(photos), str(photos / "sub"), "-o", str(out), "--resume", *OPTS]) == 0
    s = json.loads((out / "summary.json").read_text())
    by = {p["name"]: p for p in s["photos"]}
    assert {n: p["status"] for n, p in by.items()} == {"in-a": "skipped", "b": "skipped", "sub-a": "skipped",
                                                       "broken": "ok"}
    assert {n: (out / n / "report.json").stat().st_mtime_ns for n in before} == before  # not redone
    assert by["b"]["landmark_rmse_px"] == pytest.approx(json.loads((out / "b" / "report.json").read_text())[
        "landmark_rmse_px"])
    assert not [p for p in out.rglob(".*")]  # no staging folders or lock files


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 3, "distributed.worker.daemon": False}):
        cl = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cl
    cl.close()


def test_local_cluster_worker_killed_mid_batch(photos, tmp_path, cluster, monkeypatch):
    """A worker dies (SIGKILL) while writing a photo's result: the photo is retried on a fresh worker,
    every photo ends up in the summary, and the killed write left nothing behind."""
    from distributed import Client

    from geomfit import reconstruct_many

    marker = tmp_path / "killed"
    monkeypatch.setenv("GEOMFIT_TEST_KILL", "write:2")
    monkeypatch.setenv("GEOMFIT_TEST_KILL_ONCE", str(marker))
    # worker processes inherit the environment when they start: restart them with the hook set
    client = Client(cluster)
    try:
        client.restart()
        client.wait_for_workers(2, timeout=120)
        inputs = [photos / "a.png", photos / "b.png", photos / "sub", photos / "broken.png"]
        recs = reconstruct_many(inputs, client, outdir=tmp_path / "out", max_side=128, fine=False, progress=False)
    finally:
        client.close()
    assert marker.exists()  # a worker was killed
    by = {r["name"]: r for r in recs}
    assert sorted(by) == ["b", "broken", "in-a", "sub-a"]
    assert {n: r["status"] for n, r in by.items() if n != "broken"} == {n: "ok" for n in by if n != "broken"}
    assert by["broken"]["status"] == "failed" and "broken.png" in by["broken"]["error"]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["name"] for p in s["photos"]] == [r["name"] for r in recs] and s["n_ok"] == 3
    for n, r in by.items():
        if n == "broken":
            continue
        rep = json.loads((tmp_path / "out" / n / "report.json").read_text())
        assert sorted(q.name for q in (tmp_path / "out" / n).iterdir()) == sorted(rep["files"])
        assert r["landmark_rmse_px"] == pytest.approx(rep["landmark_rmse_px"])
    assert not list((tmp_path / "out").rglob(".*"))  # the killed write's staging folder was cleaned up
    # same results as in this process
    monkeypatch.delenv("GEOMFIT_TEST_KILL")
    ref = reconstruct_many([photos / "b.png"], None, outdir=tmp_path / "ref", max_side=128, fine=False,
                           progress=False)
    assert ref[0]["landmark_rmse_px"] == pytest.approx(by["b"]["landmark_rmse_px"], rel=1e-9)


def test_cli_on_an_existing_scheduler_and_futures(photos, tmp_path, cluster, capsys):
    from distributed import Client

    from geomfit import reconstruct_many

    out = tmp_path / "out"
    rc = main(["reconstruct", str(photos / "a.png"), str(photos / "b.png"), "-o", str(out), "--scheduler",
               cluster.scheduler_address, *OPTS])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["n_ok"] == 2 and s["workers"] >= 1  # workers alive when the batch started
    with Client(cluster) as client:
        futs = reconstruct_many([photos / "b.png"], client, outdir=tmp_path / "f", max_side=128, fine=False,
                                progress=False, return_futures=True)
        recs = client.gather(futs)
    assert recs[0]["status"] == "ok" and (tmp_path / "f" / "b" / "report.json").is_file()


def test_a_photo_that_kills_its_worker_is_reported(photos, tmp_path, monkeypatch):
    """A photo whose worker dies on every attempt ends as "failed" in the summary (Dask's
    KilledWorker); the other photos complete."""
    distributed = pytest.importorskip("distributed")
    import dask

    from geomfit import reconstruct_many

    monkeypatch.setenv("GEOMFIT_TEST_KILL", "task:b")  # every process that starts photo b dies
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cl, distributed.Client(cl) as client:
            recs = reconstruct_many([photos / "a.png", photos / "b.png"], client, outdir=tmp_path / "out",
                                    max_side=128, fine=False, progress=False, retries=0)
    by = {r["name"]: r for r in recs}
    assert by["a"]["status"] == "ok" and (tmp_path / "out" / "a" / "report.json").is_file()
    assert by["b"]["status"] == "failed" and "died" in by["b"]["error"] and "b.png" in by["b"]["error"]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (s["n_ok"], s["n_failed"]) == (1, 1) and not (tmp_path / "out" / "b").exists()


def test_interrupted_batch_is_summarised_and_resumed(photos, tmp_path):
    """Ctrl-C in the middle of a batch: finished photos stay, the one being written leaves nothing,
    the summary says which photos did not run, and --resume completes the batch."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    flag = tmp_path / "paused"
    env = dict(os.environ, GEOMFIT_TEST_PAUSE="task:in-a", GEOMFIT_TEST_PAUSE_FILE=str(flag))
    p = subprocess.Popen([sys.executable, "-m", "geomfit", "reconstruct", str(photos / "b.png"), str(photos / "a.png"),
                          str(photos / "sub" / "a.png"), "-o", str(out), *OPTS], env=env, stderr=subprocess.PIPE,
                         text=True)
    t_end = time.monotonic() + 300
    while not flag.exists():
        assert p.poll() is None and time.monotonic() < t_end, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    s = json.loads((out / "summary.json").read_text())
    assert {q["name"]: q["status"] for q in s["photos"]} == {"b": "ok", "in-a": "not run", "sub-a": "not run"}
    assert sorted(q.name for q in out.iterdir()) == ["b", "summary.json"]
    assert main(["reconstruct", str(photos / "b.png"), str(photos / "a.png"), str(photos / "sub" / "a.png"),
                 "-o", str(out), "--resume", *OPTS]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert {q["name"]: q["status"] for q in s["photos"]} == {"b": "skipped", "in-a": "ok", "sub-a": "ok"}
    assert not list(tmp_path.rglob(".*"))


def test_cli_workers_starts_a_local_cluster(photos, tmp_path, capsys):
    pytest.importorskip("distributed")
    out = tmp_path / "out"
    rc = main(["reconstruct", str(photos / "a.png"), str(photos / "broken.png"), "-o", str(out), "--workers", "1",
               *OPTS])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.png" in err and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    assert {p["name"]: p["status"] for p in s["photos"]} == {"a": "ok", "broken": "failed"}
    assert s["photos"][0]["worker"].split(":")[-1] != str(os.getpid())  # it ran in a worker process
