"""The ``train-detail`` command and the ``reconstruct --detail`` hook (B-Net, FAN, DRN).

Wang, Lin, Xu, Che and Wang, "Low-frequency guided self-supervised learning for high-fidelity 3D face
reconstruction in the wild", ICME 2020: the three networks are trained one after the other (Fig. 2 (b)-(g));
at inference only the texture map, FAN and DRN are needed (Fig. 2 (a), (d), (f)).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from types import SimpleNamespace
from typing import Optional

import numpy as np

__all__ = ["run_train_detail", "apply_detail_networks", "parse_detail_specs", "write_detail_outputs"]

_PHOTO_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class _Bar:
    """A one-line progress bar on stderr (``stage [#####.....] step/steps loss``)."""

    def __init__(self, quiet: bool, every: int = 10):
        self.quiet, self.every, self.t0 = quiet, every, time.perf_counter()

    def __call__(self, stage, step, steps, loss):
        if self.quiet or (step % self.every and step != steps):
            return
        n = int(30 * step / max(steps, 1))
        end = "\n" if step == steps else "\r"
        print(f"[geomfit {time.perf_counter() - self.t0:7.1f}s] {stage:4s} [{'#' * n}{'.' * (30 - n)}] "
              f"{step}/{steps} loss {loss:.5g}", file=sys.stderr, end=end, flush=True)


def run_train_detail(a, say) -> int:
    """``geomfit train-detail PHOTOS_DIR -o DIR``: UV dataset, then B-Net, FAN and DRN, each saved to DIR.

    Resumable per stage: the dataset cache (``uv_dataset.npz``) and every finished stage's checkpoint
    (``bnet.pt``, ``fan.pt``, ``drn.pt``, written atomically) are reused when the command is run again with
    the same DIR; a stage trained with a different number of steps is retrained.
    """
    import torch

    from ..data import resolve_model
    from ..io import load_model
    from . import detail as D
    from .uv_dataset import UVDataset

    src = pathlib.Path(a.photos).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"train-detail: {src} is not a directory of photos")
    photos = sorted(p for p in src.iterdir() if p.suffix.lower() in _PHOTO_EXT)
    if not photos:
        raise ValueError(f"train-detail: no photos ({', '.join(_PHOTO_EXT)}) in {src}")
    out = pathlib.Path(a.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(a.threads)))
    model = resolve_model(a.model)
    lms = [p.with_suffix(".pts") if p.with_suffix(".pts").is_file() else None for p in photos]
    say(f"{len(photos)} photos, {sum(x is not None for x in lms)} with .pts landmarks; UV maps {a.size}x{a.size}")
    ds = UVDataset.from_photos(photos, landmarks=lms, model=model, size=a.size, detector=a.detector,
                               cache=out / "uv_dataset.npz", progress=lambda i, n, s: say(f"texture {i}/{n}: {s}"))
    albedo_model = None
    if a.albedo_model:
        am = load_model(a.albedo_model)
        albedo_model = D.PCAAlbedo.from_model(am if am.texcoords is not None else _with_texcoords(am, model), a.size)
    bar = _Bar(a.quiet)
    bar.t0 = getattr(say, "t0", bar.t0)
    common = dict(steps=a.steps, lr=a.lr, progress=bar)

    def stage(name, train):
        path = out / f"{name}.pt"
        if path.is_file():
            m = D.load_detail_model(path)
            if m.checkpoint_extra.get("steps") == a.steps:
                say(f"{name}: reusing {path}")
                return m
        say(f"{name}: training {a.steps} steps")
        m, hist = train()
        D.save_detail_model(path, m, extra={"steps": a.steps, "loss_first": hist[0], "loss_last": hist[-1]})
        return m

    bnet = stage("bnet", lambda: D.train_bnet(ds, albedo_model, batch_size=a.batch, **common))
    fan = stage("fan", lambda: D.train_fan(ds, bnet=bnet, batch_size=a.batch, perceptual=a.perceptual, **common))
    drn = stage("drn", lambda: D.train_drn(ds, fan=fan, bnet=bnet, batch_size=a.batch, **common))
    (out / "train_detail.json").write_text(json.dumps({
        "photos": [str(p) for p in photos], "size": a.size, "steps": a.steps, "lr": a.lr, "batch": a.batch,
        "albedo_model": a.albedo_model, "perceptual": a.perceptual,
        "checkpoints": {k: str(out / f"{k}.pt") for k in ("bnet", "fan", "drn")}}, indent=1))
    print(f"geomfit: B-Net, FAN and DRN written to {out.resolve()} (use: geomfit reconstruct IMAGE -o OUT "
          f"--detail {out / 'drn.pt'} --detail {out / 'fan.pt'})")
    del drn
    return 0


def _with_texcoords(colour_model, shape_model):
    if colour_model.n_vertices != shape_model.n_vertices or shape_model.texcoords is None:
        raise ValueError("train-detail: the albedo model has no texture coordinates and does not share the shape "
                         "model's topology")
    colour_model.texcoords = shape_model.texcoords
    return colour_model


def parse_detail_specs(specs):
    """``["drn:PATH", "fan:PATH", "DIR"]`` -> ``{"drn": path, "fan": path}``. A bare ``.pt`` path is read to
    find its kind; a directory contributes its ``drn.pt`` / ``fan.pt``."""
    out = {}
    for s in specs or []:
        kind, _, path = s.partition(":") if s.split(":", 1)[0] in ("drn", "fan") else ("", "", s)
        p = pathlib.Path(path).expanduser()
        if p.is_dir():
            for k in ("drn", "fan"):
                if (p / f"{k}.pt").is_file():
                    out[k] = p / f"{k}.pt"
            continue
        if not p.is_file():
            raise FileNotFoundError(f"--detail: no checkpoint at {p}")
        if not kind:
            from .detail import load_detail_model

            kind = type(load_detail_model(p)).__name__.lower()
            if kind not in ("drn", "fan"):
                raise ValueError(f"--detail: {p} is a {kind} checkpoint; need a DRN or FAN")
        out[kind] = p
    if not out:
        raise ValueError("--detail: give drn:PATH and/or fan:PATH (or a train-detail output directory)")
    return out


def apply_detail_networks(rec, drn=None, fan=None, subdivisions: int = 2):
    """Run FAN and DRN on a reconstruction (Wang et al. 2020, Sec. 3.4: ``v' = v + r_d n``).

    The working-size photo is resampled into UV space through the medium mesh and the coarse camera
    (:func:`geomfit.uv_texture`); DRN's rate map displaces the medium mesh, midpoint-subdivided
    ``subdivisions`` times (texture coordinates subdivided alike) so that the map's detail has vertices
    to land on, along its vertex normals; FAN gives the albedo map.

    Parameters
    ----------
    rec : geomfit.pipeline.Reconstruction
    drn, fan : torch modules or checkpoint paths, optional

    Returns
    -------
    SimpleNamespace
        ``vertices``, ``faces`` (the detailed mesh, model space; None without DRN), ``rate_map`` (S, S),
        ``albedo`` (S, S, 3) or None, ``texture`` (the UVTexture), ``texcoords`` of the detailed mesh.
    """
    import torch

    from ..mesh import subdivide
    from ..uv import uv_texture
    from .detail import apply_displacement, load_detail_model

    drn = load_detail_model(drn) if isinstance(drn, (str, pathlib.Path)) else drn
    fan = load_detail_model(fan) if isinstance(fan, (str, pathlib.Path)) else fan
    if drn is None and fan is None:
        raise ValueError("apply_detail_networks: give a DRN and/or a FAN")
    model = rec.model
    if model.texcoords is None:
        raise ValueError(f"apply_detail_networks: model {getattr(model, 'name', '')!r} has no texture coordinates")
    size = (drn if drn is not None else fan).size
    cam = rec.camera
    v = np.asarray(rec.medium.vertices, np.float64)
    f = np.asarray(rec.medium.faces, np.int64)
    H, W = rec.image.shape[:2]
    R = np.asarray(cam.rotation, np.float64)
    s = float(np.asarray(cam.scale))
    proj = np.asarray(cam.to_screen(v, H))[:, :2]
    fit = SimpleNamespace(vertices=v, rotation=R, projected=proj, scale=s,
                          model=SimpleNamespace(faces=f, texcoords=model.texcoords))
    tex = uv_texture(rec.image, fit, size=size)
    x = torch.from_numpy(np.ascontiguousarray(tex.texture, np.float32)).permute(2, 0, 1)[None]
    res = SimpleNamespace(vertices=None, faces=None, rate_map=None, albedo=None, texture=tex, texcoords=None)
    with torch.no_grad():
        if fan is not None:
            res.albedo = fan.eval()(x)[0].permute(1, 2, 0).numpy()
        if drn is not None:
            rate = drn.eval()(x)[0, 0].numpy()
            rate = np.where(tex.mask, rate, 0.0)
            res.rate_map = rate
            tc3 = np.column_stack([model.texcoords, np.zeros(len(v))])
            vs, fs = subdivide(v, f, subdivisions)
            tcs, _ = subdivide(tc3, f, subdivisions)
            res.vertices, _ = apply_displacement(vs, fs, tcs[:, :2], rate)
            res.faces, res.texcoords = fs, tcs[:, :2]
    return res


def write_detail_outputs(rec, detail: dict, folder) -> list:
    """Apply ``{"drn": path, "fan": path}`` to a reconstruction and write ``detail.obj`` (DRN),
    ``albedo_uv.png`` (FAN) and ``detail_maps.npz`` (texture, visibility, rate and albedo maps) into
    ``folder``. Returns the file names."""
    from .. import atomic
    from ..mesh import save_mesh

    folder = pathlib.Path(folder)
    det = apply_detail_networks(rec, drn=detail.get("drn"), fan=detail.get("fan"))
    files = []
    if det.vertices is not None:
        save_mesh(folder / "detail.obj", det.vertices, det.faces)
        files.append("detail.obj")
    if det.albedo is not None:
        atomic.write_image(folder / "albedo_uv.png", (np.clip(det.albedo, 0, 1) * 255).round().astype(np.uint8))
        files.append("albedo_uv.png")
    maps = {"texture": det.texture.texture, "visible": det.texture.visible}
    if det.rate_map is not None:
        maps["rate"] = det.rate_map
    if det.albedo is not None:
        maps["albedo"] = det.albedo
    with atomic.atomic_open(folder / "detail_maps.npz", "wb") as fh:
        np.savez_compressed(fh, **maps)
    files.append("detail_maps.npz")
    return files
