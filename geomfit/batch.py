"""Many photos at once: :func:`reconstruct_many`, in this process or on a Dask cluster.

Each photo is reconstructed by :func:`geomfit.pipeline.reconstruct` into its own result folder
``OUTDIR/<name>/`` (the same files as ``geomfit reconstruct PHOTO -o DIR``, written as a whole
through :class:`geomfit.atomic.ResultDir`), and ``OUTDIR/summary.json`` lists every photo with its
status, error message, timings and landmark RMS.  A photo that fails is reported and skipped; the
others go on.  On a Dask cluster (``dask.distributed``) every photo is one task; a task whose
worker dies is retried on another worker, and reported as failed if that keeps happening, so no
photo goes missing from the summary.

The pipeline follows Jin et al., "High-fidelity 3D face reconstruction with multi-scale details"
(2021), with the landmark fitting of Wang et al.; this module only schedules it.
"""
from __future__ import annotations

import os
import pathlib
import socket
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = ["reconstruct_many", "collect_photos", "unique_names", "PHOTO_SUFFIXES"]

#: File name endings taken as photos when a folder is given.
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_SUMMARY = "summary.json"


def collect_photos(inputs: Iterable) -> List[str]:
    """Photos named by ``inputs``: files and ``skimage:NAME`` as given, folders expanded.

    A folder contributes its files with a photo suffix (:data:`PHOTO_SUFFIXES`, any case), sorted
    by name, not recursing.  Duplicates (the same file twice) are dropped.

    Raises
    ------
    ValueError
        An input is a folder without photos, or nothing at all was given.
    """
    out: List[str] = []
    seen = set()
    for x in inputs:
        s = os.fspath(x)
        if s.startswith("skimage:"):
            items = [s]
        else:
            p = pathlib.Path(s).expanduser()
            if p.is_dir():
                items = sorted(str(q) for q in p.iterdir() if q.suffix.lower() in PHOTO_SUFFIXES and not
                               q.name.startswith("."))
                if not items:
                    raise ValueError(f"folder {p} holds no photos (files ending in {', '.join(PHOTO_SUFFIXES)})")
            else:
                items = [str(p)]  # missing or unreadable files are reported per photo
        for it in items:
            key = it if it.startswith("skimage:") else os.path.realpath(it)
            if key not in seen:
                seen.add(key)
                out.append(it)
    if not out:
        raise ValueError("no photos given")
    return out


def _clean(name: str) -> str:
    bad = set('/\\:\0')
    name = "".join("_" if c in bad or ord(c) < 32 else c for c in name).strip()
    if not name or name.startswith(".") or name == _SUMMARY:
        name = "_" + name
    return name


def unique_names(photos: Sequence[str]) -> List[str]:
    """One folder name per photo: its stem, made unique.

    Stems that occur once are kept; a repeated stem gets its parent folder's name in front
    (``a/face.png``, ``b/face.png`` -> ``a-face``, ``b-face``), and a counter if that still
    repeats.  ``skimage:NAME`` gives ``NAME``.  The mapping depends only on the list, so a rerun
    with the same inputs (``--resume``) finds the same folders.
    """
    def stem(s):
        return s.split(":", 1)[1] if s.startswith("skimage:") else pathlib.Path(s).stem

    stems = [_clean(stem(s)) for s in photos]
    counts: Dict[str, int] = {}
    for st in stems:
        counts[st] = counts.get(st, 0) + 1
    names = []
    for s, st in zip(photos, stems):
        if counts[st] > 1 and not s.startswith("skimage:"):
            parent = pathlib.Path(os.path.abspath(s)).parent.name
            st = _clean(f"{parent}-{st}" if parent else st)
        names.append(st)
    used: Dict[str, int] = {}
    lower = {n.lower() for n in names}
    out = []
    for n in names:
        k = n.lower()
        if k in used:  # still repeated (or equal when case is ignored): number them
            i = used[k] + 1
            while f"{n}-{i}".lower() in lower or f"{n}-{i}".lower() in used:
                i += 1
            used[k] = i
            n = f"{n}-{i}"
            k = n.lower()
        used.setdefault(k, 1)
        out.append(n)
    return out


def _landmarks_beside(photo: str) -> Optional[str]:
    if photo.startswith("skimage:"):
        return None
    p = pathlib.Path(photo)
    for q in (p.with_suffix(".pts"), p.with_suffix(".PTS")):
        if q.is_file():
            return str(q)
    return None


def quiet_opencv() -> None:
    """Silence OpenCV's own log lines on stderr (a corrupt file is reported by geomfit, once)."""
    try:
        import cv2.utils.logging as cvlog

        cvlog.setLogLevel(cvlog.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # pragma: no cover - other OpenCV builds
        pass


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _run_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Reconstruct one photo into its result folder; never raises for a bad photo (a record says)."""
    from . import atomic

    photo, out = job["input"], pathlib.Path(job["output"])
    rec: Dict[str, Any] = {"input": photo, "name": job["name"], "output": str(out), "status": "failed",
                           "error": None, "landmarks": job.get("landmarks") or "detected",
                           "timings_s": {}, "landmark_rmse_px": None, "seconds": None,
                           "worker": f"{socket.gethostname()}:{os.getpid()}"}
    t0 = time.perf_counter()
    quiet_opencv()
    atomic.test_hook("task")
    atomic.test_hook(f"task:{job['name']}")
    if job.get("resume") and (out / "report.json").is_file():
        import json

        try:
            rep = json.loads((out / "report.json").read_text())
            rec.update(status="skipped", timings_s=rep.get("timings_s", {}),
                       landmark_rmse_px=rep.get("landmark_rmse_px"), error=None)
            rec["seconds"] = time.perf_counter() - t0
            return rec
        except (OSError, ValueError):
            pass  # an unreadable report: do the photo again
    try:
        from .photo import load_photo
        from .pipeline import reconstruct, write_outputs

        if not photo.startswith("skimage:"):
            p = pathlib.Path(photo)
            if p.is_dir():
                raise ValueError(f"{p} is a folder, not a photo")
            if not p.exists():
                raise ValueError(f"{p}: no such photo")
        image = load_photo(photo)
        rd = atomic.ResultDir(out, force=bool(job.get("force") or job.get("resume")))
        with rd:
            atomic.test_hook("claimed")
            mdl = job["model_object"] if job.get("model_object") is not None else job["model"]
            r = reconstruct(image, model=mdl, landmarks=job.get("landmarks"), detector=job["detector"],
                            max_side=job["max_side"], fine=job["fine"])
            params = {"detector": job["detector"] if not job.get("landmarks") else None,
                      "max_side": job["max_side"], "fine": job["fine"], "landmarks_file": job.get("landmarks")}
            write_outputs(r, rd.staging, ply=job.get("ply", False), image=photo, model_argument=job["model"],
                          parameters=params, final=rd.path)
            atomic.test_hook("commit")
            rd.commit()
        rec.update(status="ok", timings_s=dict(r.timings), landmark_rmse_px=r.diagnostics.get("landmark_rmse_px"))
    except Exception as e:  # one broken photo must not stop the batch: report it
        msg = _one_line(e)
        name = photo if photo.startswith("skimage:") else pathlib.Path(photo).name
        if name not in msg:
            msg = f"{photo}: {msg}"
        rec["error"] = msg if isinstance(e, (ValueError, OSError, RuntimeError, ImportError, TypeError)) else \
            f"{msg} ({type(e).__name__})"
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _write_summary(outdir: pathlib.Path, records, meta):
    from . import atomic

    n = {s: sum(1 for r in records if r["status"] == s) for s in ("ok", "failed", "skipped", "not run")}
    atomic.write_json(outdir / _SUMMARY, {
        **meta, "n_photos": len(records), "n_ok": n["ok"], "n_failed": n["failed"], "n_skipped": n["skipped"],
        "n_not_run": n["not run"], "photos": records})


def reconstruct_many(paths, client=None, *, outdir, model: str = "sfm", detector: str = "auto",
                     max_side: Optional[int] = 512, fine: bool = True, ply: bool = False, force: bool = False,
                     resume: bool = False, retries: int = 1, progress: bool = True, return_futures: bool = False):
    """Reconstruct many photos into ``outdir/<name>/``, in this process or on a Dask cluster.

    Parameters
    ----------
    paths : iterable of str or path
        Photos, folders of photos (see :func:`collect_photos`) and ``skimage:NAME`` samples.  A
        ``.pts`` file beside a photo (same stem) is used as its 68 landmarks; otherwise they are
        detected (``detector``).
    client : dask.distributed.Client, optional
        Run one task per photo on this cluster (``Client(LocalCluster(n_workers=2))`` or
        ``Client("tcp://scheduler:8786")``).  None: one after the other in this process.
    outdir : str or path
        The batch folder: ``outdir/<name>/`` per photo (names from :func:`unique_names`) and
        ``outdir/summary.json``.  Every worker must see it (a shared file system on a cluster).
    model, detector, max_side, fine, ply :
        As for :func:`geomfit.pipeline.reconstruct` and ``geomfit reconstruct``.
    force : bool
        Redo photos whose folder exists (each is replaced as a whole).  Without ``force`` or
        ``resume`` a non-empty ``outdir`` is refused.
    resume : bool
        Skip photos whose result folder is complete (has ``report.json``; folders are only ever
        complete or absent), do the others.
    retries : int
        Extra attempts Dask makes for a photo whose task failed unexpectedly (e.g. its worker
        was killed).  A photo that still fails is reported as failed.
    progress : bool
        A tqdm progress bar with the estimated time left, on stderr.
    return_futures : bool
        With a ``client``: return the Dask futures at once (each resolves to a record) instead of
        waiting; ``summary.json`` is then not written.

    Returns
    -------
    list of dict
        One record per photo, in input order: ``input``, ``name``, ``output``, ``status``
        (``"ok"``, ``"failed"``, ``"skipped"``, ``"not run"``), ``error``, ``landmarks``,
        ``timings_s``, ``landmark_rmse_px``, ``seconds``, ``worker`` -- the entries of
        ``summary.json["photos"]``.

    Raises
    ------
    ValueError
        No photos, a folder without photos.
    geomfit.atomic.OutputError
        ``outdir`` is not writable, is in use by another run, or is not empty (without ``force``
        or ``resume``).

    Notes
    -----
    Each photo runs the whole pipeline of :func:`geomfit.pipeline.reconstruct`; photos are
    independent, so the batch parallelises over photos (one task per photo) and each worker keeps
    its own copy of the model and its Numba kernels (loaded from the on-disk cache).

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern
    Recognition Letters, 2021 (the coarse-medium-fine pipeline run on every photo); Wang et al.,
    "Low-frequency guided self-supervised learning for high-fidelity 3D face reconstruction in the
    wild" (the landmark fit, Eq. 1).
    """
    from . import atomic

    photos = collect_photos(paths)
    names = unique_names(photos)
    top = atomic.ResultDir(outdir)
    out = top.path
    top.claim_in_place()
    if not (force or resume) and any(q for q in out.iterdir() if not q.name.startswith(".")):
        top.release()
        raise atomic.OutputError(17, f"output folder {out} already exists and is not empty; use --force to redo "
                                 "every photo or --resume to do the missing ones")
    jobs = [{"input": ph, "name": nm, "output": str(out / nm), "landmarks": _landmarks_beside(ph), "model": model,
             "detector": detector, "max_side": max_side, "fine": fine, "ply": ply, "force": force, "resume": resume}
            for ph, nm in zip(photos, names)]
    records: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    meta = {"geomfit_version": __import__("geomfit").__version__, "outdir": str(out),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": None,
            "parameters": {"model": str(model), "detector": detector, "max_side": max_side, "fine": fine,
                           "ply": ply, "force": force, "resume": resume}}
    t0 = time.perf_counter()
    bar = _bar(len(jobs), progress)
    try:
        if client is None:
            meta["workers"] = 1
            try:  # load the model once for the whole batch; if it fails, every photo reports why
                from .data import resolve_model

                loaded = resolve_model(model)
            except Exception:
                loaded = None
            for i, job in enumerate(jobs):
                records[i] = _run_one({**job, "model_object": loaded} if loaded is not None else job)
                _tick(bar, records[i])
        else:
            meta["workers"] = len(getattr(client, "scheduler_info", lambda: {})().get("workers", {})) or None
            futures = client.map(_run_one, jobs, pure=False, retries=retries,
                                 key=[f"geomfit-{j['name']}-{os.getpid()}-{time.time_ns()}" for j in jobs])
            if return_futures:
                top.release()
                bar.close()
                return futures
            from distributed import as_completed

            index = {f.key: i for i, f in enumerate(futures)}
            for f in as_completed(futures):
                i = index[f.key]
                try:
                    records[i] = f.result()
                except Exception as e:  # KilledWorker after the retries, a lost connection, ...
                    j = jobs[i]
                    why = _one_line(e)
                    if type(e).__name__ == "KilledWorker":
                        why = "the worker processing it died every time it was tried (out of memory?)"
                    records[i] = {"input": j["input"], "name": j["name"], "output": j["output"], "status": "failed",
                                  "error": f"{j['input']}: {why} ({type(e).__name__})", "landmarks": j["landmarks"]
                                  or "detected", "timings_s": {}, "landmark_rmse_px": None, "seconds": None,
                                  "worker": None}
                _tick(bar, records[i])
    finally:
        bar.close()
        done = [r if r is not None else {"input": j["input"], "name": j["name"], "output": j["output"],
                                          "status": "not run", "error": "interrupted before it ran",
                                          "landmarks": j["landmarks"] or "detected", "timings_s": {},
                                          "landmark_rmse_px": None, "seconds": None, "worker": None}
                for r, j in zip(records, jobs)]
        meta["wall_s"] = time.perf_counter() - t0
        try:
            _write_summary(out, done, meta)
        finally:
            top.release()
    return done


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _bar(total, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return _NoBar()
    return tqdm(total=total, unit="photo", desc="geomfit", file=sys.stderr, dynamic_ncols=True)


def _tick(bar, rec):
    bar.set_postfix_str(f"{rec['name']}: {rec['status']}")
    bar.update(1)
