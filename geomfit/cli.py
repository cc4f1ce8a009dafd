"""The ``geomfit`` command.

::

    geomfit reconstruct IMAGE [--landmarks FILE.pts] [--model NAME_OR_PATH] -o OUTDIR [--ply] [--force] [--quiet]
    geomfit fit-landmarks FILE.pts [FILE.pts ...] -o OUTDIR [--model ...] [--image-size H W]
    geomfit info MODEL
    geomfit download-model sfm [--url-base URL] [--dest DIR] [--force]
    geomfit evaluate PRED GT [--pred-nose I] [--gt-nose I] [--radius 95] [--json FILE]

Every command exits with 0 on success and, on failure, prints one line ``geomfit: error: <reason>``
on stderr and exits with 1 (2 for command-line usage errors, 130 when interrupted).  Outputs are
written atomically; an existing non-empty OUTDIR is refused unless ``--force`` is given.
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


def _prepare_outdir(out: str, force: bool) -> pathlib.Path:
    p = pathlib.Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"output path {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise CLIError(f"output directory {p} already exists and is not empty; use --force to overwrite")
    p.mkdir(parents=True, exist_ok=True)
    return p


# -- reconstruct ----------------------------------------------------------------------------------
def _cmd_reconstruct(a) -> int:
    from . import atomic
    from .overview import albedo_to_image, depth_to_image, normals_to_image, overview_image
    from .pipeline import reconstruct

    from .data import resolve_model
    from .landmarks import read_pts_checked
    from .photo import load_photo

    say = _Progress(a.quiet)
    say(f"reading {a.image}")
    # validate every input before touching OUTDIR
    image = load_photo(a.image)
    if a.landmarks is not None:
        read_pts_checked(a.landmarks, image.shape)
    model = resolve_model(a.model)
    existed = pathlib.Path(a.output).expanduser().exists()
    out = _prepare_outdir(a.output, a.force)
    try:
        rec = reconstruct(image, model=model, landmarks=a.landmarks, detector=a.detector,
                          max_side=None if a.max_side <= 0 else a.max_side, fine=not a.no_fine, progress=say)
    except BaseException:
        if not existed and not any(out.iterdir()):
            out.rmdir()  # leave no empty OUTDIR behind when nothing was produced
        raise
    say(f"writing outputs to {out}")
    files = []
    exts = [".obj"] + ([".ply"] if a.ply else [])
    for name in ("coarse", "medium", "fine"):
        mesh = getattr(rec, name)
        for ext in exts:
            mesh.save(out / f"{name}{ext}")
            files.append(f"{name}{ext}")
    dimg, (lo, hi) = depth_to_image(rec.depth)
    atomic.write_image(out / "depth.png", dimg)
    atomic.write_image(out / "normal.png", normals_to_image(rec.normals))
    atomic.write_image(out / "albedo.png", albedo_to_image(rec.albedo))
    with atomic.atomic_open(out / "maps.npz", "wb") as f:
        np.savez_compressed(f, depth=rec.depth, normals=rec.normals, albedo=rec.albedo,
                            medium_depth=rec.medium_depth, mask=rec.mask, landmarks=rec.landmarks)
    files += ["depth.png", "normal.png", "albedo.png", "maps.npz"]
    title = (f"geomfit: {pathlib.Path(str(a.image)).name}  |  landmark RMS {rec.diagnostics['landmark_rmse_px']:.2f} px"
             f"  |  {rec.timings['total']:.1f} s")
    atomic.write_image(out / "overview.png", overview_image(rec, title=title))
    files.append("overview.png")
    cam = rec.camera
    report = {
        "geomfit_version": _version(),
        "image": str(a.image),
        "image_size": [int(rec.photo_size[1]), int(rec.photo_size[0])],
        "working_size": [int(rec.image.shape[1]), int(rec.image.shape[0])],
        "working_scale": rec.working_scale,
        "model": {"name": getattr(rec.model, "name", str(a.model)), "argument": str(a.model),
                  "n_vertices": rec.model.n_vertices, "n_id": rec.model.n_id, "n_exp": rec.model.n_exp},
        "landmarks": {k: v for k, v in rec.landmarks_info.items()},
        "parameters": {"detector": a.detector if a.landmarks is None else None, "max_side": a.max_side, "fine": not a.no_fine,
                       "landmarks_file": a.landmarks},
        "timings_s": rec.timings,
        "landmark_rmse_px": rec.diagnostics.get("landmark_rmse_px"),
        "diagnostics": rec.diagnostics,
        "camera": {"scale": float(np.asarray(cam.scale)), "rotation": np.asarray(cam.rotation),
                   "translation": np.asarray(cam.translation),
                   "convention": "u = s (R v)_x + t_x, row = H - (s (R v)_y + t_y), working-size pixels"},
        "coefficients": {"id": rec.id_coeffs, "exp": rec.exp_coeffs},
        "lighting_sh": None if rec.sh is None else np.asarray(rec.sh),
        "depth_png": {"min_px": lo, "max_px": hi,
                      "decode": "depth = min_px + (png - 1) / 65534 * (max_px - min_px); png 0 = no surface"},
        "meshes": {n: {"vertices": getattr(rec, n).n_vertices, "faces": int(getattr(rec, n).faces.shape[0])}
                   for n in ("coarse", "medium", "fine")},
        "files": files + ["report.json"],
    }
    atomic.write_json(out / "report.json", report)
    say(f"landmark RMS after the coarse fit: {report['landmark_rmse_px']:.2f} px; total {rec.timings['total']:.1f} s")
    print(f"geomfit: outputs written to {out.resolve()} (open overview.png first; meshes: coarse.obj, "
          "medium.obj, fine.obj; numbers: report.json)")
    return 0


def _version():
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# -- fit-landmarks --------------------------------------------------------------------------------
def _image_size_for(pts_path: pathlib.Path, pts: np.ndarray, given):
    if given:
        return int(given[0]), int(given[1])
    for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        img = pts_path.with_suffix(ext)
        if img.is_file():
            import cv2

            buf = np.fromfile(str(img), dtype=np.uint8)
            im = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if im is not None:
                return int(im.shape[0]), int(im.shape[1])
    # no image: a frame that holds the landmarks with a margin
    m = np.nanmax(pts, axis=0)
    return int(np.ceil(m[1] * 1.1 + 1)), int(np.ceil(m[0] * 1.1 + 1))


def _cmd_fit_landmarks(a) -> int:
    from . import atomic
    from .data import resolve_model
    from .fitting import fit_landmarks
    from .landmarks import read_pts_checked
    from .pipeline import fixed_landmark_rmse

    say = _Progress(a.quiet)
    out = _prepare_outdir(a.output, a.force)
    paths = [pathlib.Path(p) for p in a.pts]
    pts, sizes = [], []
    for p in paths:
        q = read_pts_checked(p)
        hw = _image_size_for(p, q, a.image_size)
        from .landmarks import check_landmarks

        check_landmarks(q, hw, name=str(p))
        pts.append(q)
        sizes.append(hw)
    model = resolve_model(a.model)
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

            name = f"{p.stem}.obj"
            save_mesh(out / name, verts[i], model.faces)
            rec["mesh"] = name
        records.append(rec)
    atomic.write_json(out / "fits.json", {"model": str(a.model), "seconds": dt, "fits": records})
    print(f"geomfit: {len(paths)} fit(s) written to {out.resolve()} (fits.json)")
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
    out = download_model(a.name, url_base=a.url_base, dest=a.dest, force=a.force, progress=say)
    print(f"geomfit: model {a.name!r} installed in {out}")
    return 0


# -- evaluate -------------------------------------------------------------------------------------
_DEPTH_EXT = {".npy", ".npz", ".png", ".tif", ".tiff", ".exr"}


def _load_depth(path: pathlib.Path) -> np.ndarray:
    ext = path.suffix.lower()
    if not path.is_file():
        raise CLIError(f"file not found: {path}")
    if ext == ".npy":
        return np.load(path)
    if ext == ".npz":
        z = np.load(path)
        key = "depth" if "depth" in z.files else z.files[0]
        return z[key]
    import cv2

    im = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise CLIError(f"cannot read depth image {path}")
    if im.ndim == 3:
        im = im[..., 0]
    return im.astype(np.float64)


def _load_mesh(path: pathlib.Path):
    import trimesh

    if not path.is_file():
        raise CLIError(f"file not found: {path}")
    try:
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
        res = {"kind": "depth", "mae": metrics.depth_mae(dp, dg),
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


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomfit", description="Detailed 3D faces from single photos "
                                "(3DMM fit -> Laplacian deformation -> shape from shading).")
    p.add_argument("--version", action="version", version=f"geomfit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("reconstruct", help="reconstruct a face from a photo (coarse, medium, fine)")
    r.add_argument("image", help="photo file (PNG, JPEG, 8/16-bit, grey or colour) or skimage:NAME")
    r.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    r.add_argument("--landmarks", metavar="FILE.pts", help="68 iBUG landmarks (default: detect)")
    r.add_argument("--model", default="sfm", help="model name (sfm) or model file [sfm]")
    r.add_argument("--detector", default="auto", choices=["auto", "dlib", "fan"], help="landmark detector [auto]")
    r.add_argument("--max-side", type=int, default=512,
                   help="working size: longest side in pixels, 0 = full size [512]")
    r.add_argument("--no-fine", action="store_true", help="skip the fine (shape-from-shading) stage")
    r.add_argument("--ply", action="store_true", help="also write .ply meshes")
    r.add_argument("--force", action="store_true", help="write into an existing non-empty OUTDIR")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_reconstruct)

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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``geomfit`` console script; returns the exit status."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        print("geomfit: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"geomfit: error: {msg}", file=sys.stderr)
        if os.environ.get("GEOMFIT_DEBUG"):
            raise
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
