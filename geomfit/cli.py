"""The ``geomfit`` command.

::

    geomfit reconstruct PHOTO [--landmarks FILE.pts] [--model NAME_OR_PATH] -o OUTDIR [--ply] [--force] [--quiet]
    geomfit reconstruct PHOTO|DIR ... -o OUTDIR [--workers N | --scheduler ADDRESS] [--resume] [--force]
    geomfit fit-landmarks FILE.pts [FILE.pts ...] -o OUTDIR [--model ...] [--image-size H W]
    geomfit info MODEL
    geomfit download-model sfm [--url-base URL] [--dest DIR] [--force]
    geomfit evaluate PRED GT [--pred-nose I] [--gt-nose I] [--radius 95] [--json FILE]
    geomfit train-refiner -o refiner.pt [--config DCE+RGB] [--resolution 64] [--minutes N] [--pairs N | --data DIR]
    geomfit train-detail PHOTOS_DIR -o DIR [--size 256] [--steps N] [--albedo-model FILE] [--perceptual SPEC]

Every command exits with 0 on success and, on failure, prints one line ``geomfit: error: <reason>``
on stderr and exits with 1 (2 for command-line usage errors, 130 when interrupted, 143 on SIGTERM).
A result folder is written as a whole (:class:`geomfit.atomic.ResultDir`): a reader sees the old set
of files or the new one, never a mix; an existing non-empty OUTDIR is refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import List, Optional

import numpy as np

__all__ = ["main"]


class CLIError(Exception):
    """A failure to report as one line."""


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[geomfit {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- reconstruct ----------------------------------------------------------------------------------
def _is_batch(a) -> bool:
    ims = a.image
    return len(ims) > 1 or any(not str(x).startswith("skimage:") and pathlib.Path(x).expanduser().is_dir()
                               for x in ims)


def _cmd_reconstruct(a) -> int:
    if a.force and a.resume:
        raise CLIError("--force and --resume exclude each other (--force redoes every photo, --resume skips "
                       "the finished ones)")
    if a.workers is not None and a.workers < 1:
        raise CLIError(f"--workers must be at least 1, got {a.workers}")
    if a.workers and a.scheduler:
        raise CLIError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    if _is_batch(a):
        if getattr(a, "refiner", None):
            raise CLIError("--refiner applies to one photo at a time; batches do not support it yet")
        if a.detail:
            raise CLIError("--detail works on one photo at a time")
        return _cmd_reconstruct_batch(a)
    return _cmd_reconstruct_one(a)


def _cmd_reconstruct_one(a) -> int:
    from . import atomic
    from .data import resolve_model
    from .landmarks import NoFaceError, read_pts_checked
    from .photo import load_photo
    from .pipeline import _import_trimesh, reconstruct, write_outputs

    src = a.image[0]
    say = _Progress(a.quiet)
    if a.resume and (pathlib.Path(a.output).expanduser() / "report.json").is_file():
        print(f"geomfit: {a.output} is complete already (report.json); nothing to do (--resume)")
        return 0
    say(f"reading {src}")
    # validate every input before touching OUTDIR
    if not str(src).startswith("skimage:") and not pathlib.Path(src).expanduser().exists():
        raise CLIError(f"photo not found: {src}")
    image = load_photo(src)
    if a.landmarks is not None:
        read_pts_checked(a.landmarks, image.shape)
    model = resolve_model(a.model)
    detail = None
    if a.detail:  # B-Net/FAN/DRN checkpoints (train-detail), checked before the long work
        from .learned.detail_cli import parse_detail_specs

        detail = parse_detail_specs(a.detail)
    _import_trimesh()  # now, not in the write phase: its import catches BaseException (Ctrl-C)
    # claimed on entry (OUTDIR writable, not in use by another run, empty or --force), before the long
    # work; left as it was unless committed
    with atomic.ResultDir(a.output, force=a.force or a.resume) as rd:
        atomic.test_hook("claimed")
        try:
            rec = reconstruct(image, model=model, landmarks=a.landmarks, detector=a.detector,
                              max_side=None if a.max_side <= 0 else a.max_side, fine=not a.no_fine, progress=say,
                              refiner=getattr(a, "refiner", None),
                              coarse=getattr(a, "coarse", "landmarks"))
        except NoFaceError as e:  # the message names the photo (reconstruct is given the path)
            raise CLIError(str(e) if str(src) in str(e) else f"{src}: {e}") from e
        say(f"writing outputs to {rd.path}")
        params = {"detector": a.detector if a.landmarks is None else None, "max_side": a.max_side,
                  "fine": not a.no_fine, "landmarks_file": a.landmarks, "refiner": getattr(a, "refiner", None),
                  "coarse": getattr(a, "coarse", "landmarks")}
        if detail:
            params["detail"] = {k: str(v) for k, v in detail.items()}
        write_outputs(rec, rd.staging, ply=a.ply, image=src, model_argument=a.model, parameters=params,
                      final=rd.path)
        if detail:
            from .learned.detail_cli import write_detail_outputs

            say("applying " + ", ".join(sorted(detail)))
            write_detail_outputs(rec, detail, rd.staging)
        atomic.test_hook("commit")
        out = rd.commit()
    say(f"landmark RMS after the coarse fit: {rec.diagnostics.get('landmark_rmse_px'):.2f} px; "
        f"total {rec.timings['total']:.1f} s")
    print(f"geomfit: outputs written to {out} (open overview.png first; meshes: coarse.obj, "
          "medium.obj, fine.obj; numbers: report.json)")
    return 0


def _cmd_reconstruct_batch(a) -> int:
    from .batch import collect_photos, reconstruct_many

    if a.landmarks is not None:
        raise CLIError("--landmarks is for one photo; in a batch put each photo's landmarks beside it "
                       "(photo.pts next to photo.jpg)")
    photos = collect_photos(a.image)  # a folder without photos is an error before anything is written
    from .data import resolve_model

    resolve_model(a.model)  # an unknown model fails now, not once per photo
    from . import atomic

    top = atomic.ResultDir(a.output)  # OUTDIR writable and usable before a cluster is started
    top.claim_in_place()
    try:
        if not (a.force or a.resume) and any(not q.name.startswith(".") for q in top.path.iterdir()):
            raise CLIError(f"output folder {top.path} already exists and is not empty; use --force to redo "
                           "every photo or --resume to do the missing ones")
    finally:
        top.release(keep=False)
    client = cluster = None
    if a.workers or a.scheduler:
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise CLIError("--workers/--scheduler need Dask: pip install 'dask[distributed]' "
                           "(or geomfit[batch])") from e
        if a.scheduler:
            try:
                client = Client(a.scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise CLIError(f"cannot reach the Dask scheduler at {a.scheduler}: {e}") from e
        else:
            cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
            client = Client(cluster)
    try:
        recs = reconstruct_many(photos, client, outdir=a.output, model=a.model, detector=a.detector,
                                max_side=None if a.max_side <= 0 else a.max_side, fine=not a.no_fine, ply=a.ply,
                                force=a.force, resume=a.resume, progress=not a.quiet)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    failed = [r for r in recs if r["status"] == "failed"]
    for r in failed:
        print(f"geomfit: error: {r['error']}", file=sys.stderr)
    n_ok = sum(r["status"] == "ok" for r in recs)
    n_skip = sum(r["status"] == "skipped" for r in recs)
    out = pathlib.Path(a.output).expanduser().resolve()
    print(f"geomfit: {n_ok} of {len(recs)} photo(s) reconstructed" + (f", {n_skip} already complete" if n_skip else "")
          + (f", {len(failed)} failed" if failed else "") + f"; results in {out}/<name>/, summary in "
          f"{out / 'summary.json'}")
    return 1 if failed else 0


def _version():
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# -- fit-landmarks --------------------------------------------------------------------------------
def _decode_image(path: pathlib.Path, what: str):
    """:func:`geomfit.photo.decode_image` with every failure as a CLIError naming the file."""
    from .photo import ImageReadError, decode_image

    try:
        return decode_image(path)
    except ImageReadError as e:
        raise CLIError(f"cannot read {what} {path}: {e.reason}") from e
    except FileNotFoundError as e:
        raise CLIError(f"cannot read {what} {path}: not found or not a regular file") from e


def _image_size_for(pts_path: pathlib.Path, pts: np.ndarray, given):
    if given:
        if given[0] < 1 or given[1] < 1:
            raise CLIError(f"--image-size must be positive, got {given[0]} {given[1]}")
        return int(given[0]), int(given[1])
    for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        img = pts_path.with_suffix(ext)
        if img.is_file():
            im = _decode_image(img, f"the image beside {pts_path.name} (used for its size; or pass --image-size H W):")
            return int(im.shape[0]), int(im.shape[1])
    # no image: a frame that holds the landmarks with a margin
    m = np.nanmax(pts, axis=0)
    return int(np.ceil(m[1] * 1.1 + 1)), int(np.ceil(m[0] * 1.1 + 1))


def _cmd_fit_landmarks(a) -> int:
    from . import atomic
    from .batch import unique_names
    from .data import resolve_model
    from .fitting import fit_landmarks
    from .landmarks import check_landmarks, read_pts_checked
    from .pipeline import _import_trimesh, fixed_landmark_rmse

    say = _Progress(a.quiet)
    paths = [pathlib.Path(p) for p in a.pts]
    # every input is validated before OUTDIR is touched
    pts, sizes = [], []
    for p in paths:
        if p.is_dir():
            raise CLIError(f"{p} is a folder, not a .pts file")
        q = read_pts_checked(p)
        hw = _image_size_for(p, q, a.image_size)
        check_landmarks(q, hw, name=str(p))
        pts.append(q)
        sizes.append(hw)
    model = resolve_model(a.model)
    names = unique_names([str(p) for p in paths])  # a/face.pts and b/face.pts -> a-face.obj, b-face.obj
    if not a.no_meshes:
        _import_trimesh()
    with atomic.ResultDir(a.output, force=a.force) as rd:
        atomic.test_hook("claimed")
        say(f"fitting {len(paths)} landmark set(s) to {getattr(model, 'name', a.model)}")
        t = time.perf_counter()
        fit = fit_landmarks(model, np.stack(pts), image_size=np.array(sizes, dtype=np.float64))
        dt = time.perf_counter() - t
        say(f"fitted in {dt:.3f} s")
        records = []
        verts = np.asarray(fit.vertices)
        for i, p in enumerate(paths):
            sub = _FitView(fit, i)
            rec = {
                "file": str(p), "image_size": list(sizes[i]),
                "landmark_rmse_px": fixed_landmark_rmse(model, sub, pts[i]),
                "rmse_px": float(np.asarray(fit.rmse_px)[i]),
                "converged": bool(np.asarray(fit.converged)[i]), "iterations": int(np.asarray(fit.iterations)[i]),
                "scale": float(np.asarray(fit.scale)[i]), "rotation": np.asarray(fit.rotation)[i],
                "translation": np.asarray(fit.translation)[i],
                "id_coeffs": np.asarray(fit.id_coeffs)[i], "exp_coeffs": np.asarray(fit.exp_coeffs)[i],
            }
            if not a.no_meshes:
                from .mesh import save_mesh

                name = f"{names[i]}.obj"
                try:
                    with atomic.signals_deferred():
                        save_mesh(rd.staging / name, verts[i], model.faces)
                except OSError as e:
                    raise OSError(e.errno, f"cannot write {rd.path / name}: {e.strerror or e}") from e
                atomic.test_hook(f"write:{i + 1}")
                rec["mesh"] = name
            records.append(rec)
        try:
            atomic.write_json(rd.staging / "fits.json", {"model": str(a.model), "seconds": dt, "fits": records})
        except OSError as e:
            raise OSError(e.errno, f"cannot write {rd.path / 'fits.json'}: {e.strerror or e}") from e
        atomic.test_hook("commit")
        out = rd.commit()
    print(f"geomfit: {len(paths)} fit(s) written to {out} (fits.json)")
    return 0


class _FitView:
    """One item of a batched fit, with the ``projected`` attribute fixed_landmark_rmse needs."""

    def __init__(self, fit, i):
        self.projected = np.asarray(fit.projected)[i]


# -- info -----------------------------------------------------------------------------------------
def _cmd_info(a) -> int:
    from .data import KNOWN_MODELS, find_model_dir, resolve_model

    m = resolve_model(a.model)
    where = str(find_model_dir(a.model)) if str(a.model).lower() in KNOWN_MODELS else str(a.model)
    lines = [
        f"model:        {getattr(m, 'name', '') or a.model}",
        f"location:     {where}",
        f"vertices:     {m.n_vertices}",
        f"triangles:    {m.faces.shape[0]}",
        f"identity:     {m.n_id} components",
        f"expression:   {m.n_exp} components",
        f"landmarks:    {len(m.landmarks)} fixed iBUG landmarks",
        f"contours:     " + (", ".join(f"{k}: {len(v)}" for k, v in m.contours.items()) or "none"),
        f"texcoords:    {'yes' if m.texcoords is not None else 'no'}",
        f"colour model: {'yes' if m.color_mean is not None else 'no'}",
        f"extent:       {np.ptp(np.asarray(m.mean), axis=0).round(1).tolist()} (model units)",
    ]
    print("\n".join(lines))
    return 0


# -- download-model -------------------------------------------------------------------------------
def _cmd_download(a) -> int:
    from .data import download_model

    say = _Progress(a.quiet)
    made = None
    if a.dest:  # leave no empty folder behind when the download fails
        q = pathlib.Path(a.dest).expanduser()
        while not q.exists() and q != q.parent:
            made, q = q, q.parent
    try:
        out = download_model(a.name, url_base=a.url_base, dest=a.dest, force=a.force, progress=say)
    except BaseException:
        if made is not None:
            import shutil

            d = pathlib.Path(a.dest).expanduser()
            if d.is_dir() and not any(d.rglob("*")) or not d.exists():
                shutil.rmtree(made, ignore_errors=True)
        raise
    print(f"geomfit: model {a.name!r} installed in {out}")
    return 0


# -- evaluate -------------------------------------------------------------------------------------
_DEPTH_EXT = {".npy", ".npz", ".png", ".tif", ".tiff", ".exr"}


def _load_depth(path: pathlib.Path) -> np.ndarray:
    ext = path.suffix.lower()
    if not path.is_file():
        raise CLIError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CLIError(f"cannot read depth map {path}: the file is empty (0 bytes)")
    if ext in (".npy", ".npz"):
        try:
            z = np.load(path, allow_pickle=False)
            if ext == ".npz":
                if not z.files:
                    raise CLIError(f"depth map {path} holds no arrays")
                z = z["depth" if "depth" in z.files else z.files[0]]
        except CLIError:
            raise
        except Exception as e:  # NumPy's messages for corrupt files vary (ValueError, EOFError, zipfile...)
            raise CLIError(f"cannot read depth map {path}: {type(e).__name__}: {e}") from e
        z = np.asarray(z)
        if z.ndim != 2 or not np.issubdtype(z.dtype, np.number):
            raise CLIError(f"depth map {path} must be a 2-D numeric array, got {z.dtype} {z.shape}")
        return z.astype(np.float64)
    im = _decode_image(path, "depth image")
    if im.ndim == 3:
        im = im[..., 0]
    return im.astype(np.float64)


def _load_mesh(path: pathlib.Path):
    from . import atomic
    from .pipeline import _import_trimesh

    _import_trimesh()
    import trimesh

    if not path.is_file():
        raise CLIError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CLIError(f"cannot read mesh {path}: the file is empty (0 bytes)")
    try:
        with atomic.signals_deferred():  # trimesh's loaders catch BaseException in places
            m = trimesh.load(str(path), process=False, force="mesh")
    except Exception as e:
        raise CLIError(f"cannot read mesh {path}: {e}") from e
    v = np.asarray(m.vertices, dtype=np.float64)
    f = np.asarray(getattr(m, "faces", np.zeros((0, 3))), dtype=np.int64)
    if len(v) == 0:
        raise CLIError(f"mesh {path} has no vertices")
    return v, (f if len(f) else None)


def _cmd_evaluate(a) -> int:
    import json

    from . import atomic, metrics

    pred, gt = pathlib.Path(a.pred), pathlib.Path(a.gt)
    if pred.suffix.lower() in _DEPTH_EXT and gt.suffix.lower() in _DEPTH_EXT:
        dp, dg = _load_depth(pred), _load_depth(gt)
        try:
            mae = metrics.depth_mae(dp, dg)
        except ValueError as e:
            raise CLIError(f"cannot compare {pred} with {gt}: {e}") from e
        res = {"kind": "depth", "mae": mae,
               "n_valid": int(((np.nan_to_num(dp) != 0) | (np.nan_to_num(dg) != 0)).sum())}
    else:
        pv, pf = _load_mesh(pred)
        gv, gf = _load_mesh(gt)
        r = metrics.micc_errors(pv, gv, pred_faces=pf, gt_faces=gf, pred_nose=a.pred_nose, gt_nose=a.gt_nose,
                                radius=a.radius)
        res = {"kind": "mesh", **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}}
    res.update(pred=str(pred), gt=str(gt))
    if a.json:
        atomic.write_json(a.json, res)
    if res["kind"] == "depth":
        print(f"depth MAE: {res['mae']:.6g} over {res['n_valid']} pixels")
    else:
        print(f"point-to-plane RMSE: {res['rmse_point_to_plane']:.3f}  point-to-point RMSE: "
              f"{res['rmse_point_to_point']:.3f}  symmetric point-to-plane mean: "
              f"{res['mean_point_to_plane_symmetric']:.3f}  (model units, mm for MICC; "
              f"{res['n_pred']} / {res['n_gt']} points within {a.radius} of the nose tips)")
    return 0


# -- train-refiner --------------------------------------------------------------------------------
def _cmd_train_refiner(a) -> int:
    from .learned.train_cli import run_train_refiner

    return run_train_refiner(a, _Progress(a.quiet))


# -- train-detail ---------------------------------------------------------------------------------
def _cmd_train_detail(a) -> int:
    from .learned.detail_cli import run_train_detail

    if a.perceptual == "none":
        a.perceptual = None
    return run_train_detail(a, _Progress(a.quiet))


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomfit", description="Detailed 3D faces from single photos "
                                "(3DMM fit -> Laplacian deformation -> shape from shading).")
    p.add_argument("--version", action="version", version=f"geomfit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("reconstruct", help="reconstruct a face from a photo (coarse, medium, fine)")
    r.add_argument("image", nargs="+", metavar="PHOTO|DIR",
                   help="photo file (PNG, JPEG, 8/16-bit, grey or colour) or skimage:NAME; several photos or "
                        "folders make a batch: OUTDIR/<name>/ per photo and OUTDIR/summary.json")
    r.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    r.add_argument("--landmarks", metavar="FILE.pts", help="68 iBUG landmarks (default: detect)")
    r.add_argument("--model", default="sfm", help="model name (sfm) or model file [sfm]")
    r.add_argument("--detector", default="auto", choices=["auto", "dlib", "fan"], help="landmark detector [auto]")
    r.add_argument("--max-side", type=int, default=512,
                   help="working size: longest side in pixels, 0 = full size [512]")
    r.add_argument("--no-fine", action="store_true", help="skip the fine (shape-from-shading) stage")
    r.add_argument("--refiner", metavar="default|PATH",
                   help="apply the learned depth refiner after the medium stage (needs torch)")
    r.add_argument("--coarse", default="landmarks", choices=["landmarks", "photometric"],
                   help="coarse stage: landmark fit, or refined by differentiable rendering (needs torch) [landmarks]")
    r.add_argument("--ply", action="store_true", help="also write .ply meshes")
    r.add_argument("--force", action="store_true", help="replace an existing result in OUTDIR (as a whole)")
    r.add_argument("--resume", action="store_true", help="skip photos whose result is complete, do the rest")
    r.add_argument("--workers", type=int, metavar="N", help="batch: run on a local Dask cluster of N processes")
    r.add_argument("--scheduler", metavar="ADDRESS", help="batch: run on an existing Dask cluster "
                   "(e.g. tcp://host:8786); OUTDIR must be on a file system its workers share")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.add_argument("--detail", action="append", metavar="drn:PATH|fan:PATH|DIR",
                   help="apply train-detail networks: DRN displaces the medium mesh (detail.obj), FAN writes albedo_uv.png")
    r.set_defaults(func=_cmd_reconstruct)

    t = sub.add_parser("train-detail", help="train B-Net, FAN and DRN (Wang et al.) on a folder of photos")
    t.add_argument("photos", metavar="PHOTOS_DIR", help="photos (.pts landmarks next to them are used, else detected)")
    t.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoints and dataset cache (resumable)")
    t.add_argument("--model", default="sfm", help="3DMM with texture coordinates [sfm]")
    t.add_argument("--albedo-model", metavar="FILE", help="PCA albedo model (e.g. BFM); default: PCA of the textures")
    t.add_argument("--perceptual", default="auto", help="identity | vgg16:PATH | none | auto [auto]")
    t.add_argument("--size", type=int, default=256, help="UV map size [256]")
    t.add_argument("--steps", type=int, default=1000, help="steps per stage [1000]")
    t.add_argument("--batch", type=int, default=4, help="batch size [4]")
    t.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate [2e-5, the paper's]")
    t.add_argument("--detector", default="auto", choices=["auto", "dlib", "fan"])
    t.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=_cmd_train_detail)

    f = sub.add_parser("fit-landmarks", help="coarse 3DMM fits for a batch of .pts files")
    f.add_argument("pts", nargs="+", metavar="FILE.pts")
    f.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    f.add_argument("--model", default="sfm")
    f.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                   help="image size for every file (default: the image next to each .pts, else the landmarks' extent)")
    f.add_argument("--no-meshes", action="store_true", help="write fits.json only")
    f.add_argument("--force", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=_cmd_fit_landmarks)

    i = sub.add_parser("info", help="describe a model")
    i.add_argument("model", nargs="?", default="sfm")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("download-model", help="download a model's files (SHA-256 checked)")
    d.add_argument("name", choices=["sfm"])
    d.add_argument("--url-base", help="mirror URL (default: eos repository at the pinned release)")
    d.add_argument("--dest", help="target directory (default: the cache, ~/.cache/geomfit/NAME)")
    d.add_argument("--force", action="store_true", help="download even if present")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_cmd_download)

    e = sub.add_parser("evaluate", help="compare a reconstruction with ground truth (meshes or depth maps)")
    e.add_argument("pred", help="predicted mesh (.obj/.ply/...) or depth map (.npy/.npz/.png)")
    e.add_argument("gt", help="ground-truth mesh or depth map")
    e.add_argument("--pred-nose", type=int, help="nose-tip vertex index of PRED (default: largest z)")
    e.add_argument("--gt-nose", type=int, help="nose-tip vertex index of GT (default: largest z)")
    e.add_argument("--radius", type=float, default=95.0, help="crop radius around the nose tip [95 mm]")
    e.add_argument("--json", help="also write the numbers to this JSON file")
    e.set_defaults(func=_cmd_evaluate)

    from .learned.train_cli import add_train_refiner_parser

    add_train_refiner_parser(sub, _cmd_train_refiner)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as an exception so that every ``finally`` and cleanup runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _install_signal_handlers():
    """SIGTERM/SIGHUP unwind like Ctrl-C (temporary files and staging folders are removed)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            old[sig] = signal.signal(sig, _raise_terminated)
    return old


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``geomfit`` console script; returns the exit status."""
    import signal

    parser = build_parser()
    a = parser.parse_args(argv)
    from .batch import quiet_opencv

    quiet_opencv()  # OpenCV's own warnings would repeat geomfit's one-line error
    old = _install_signal_handlers()
    try:
        return int(a.func(a) or 0)
    except Terminated as e:
        print(f"geomfit: terminated by signal {e.signum}; nothing half-written was left", file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("geomfit: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"geomfit: error: {msg}", file=sys.stderr)
        if os.environ.get("GEOMFIT_DEBUG"):
            raise
        return 1
    except Exception as e:  # a bug: still one line (GEOMFIT_DEBUG=1 shows the traceback)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"geomfit: error: internal error ({type(e).__name__}): {msg} (please report it; GEOMFIT_DEBUG=1 "
              "shows the traceback)", file=sys.stderr)
        if os.environ.get("GEOMFIT_DEBUG"):
            raise
        return 1
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
