"""``geomfit train-refiner``: argument parsing and the command body (torch imported only when run)."""
from __future__ import annotations

import pathlib

import numpy as np


def add_train_refiner_parser(sub, func):
    t = sub.add_parser("train-refiner", help="train the progressive CGAN depth refiner (needs torch)")
    t.add_argument("-o", "--output", required=True, metavar="FILE.pt", help="checkpoint (resumed if it exists)")
    t.add_argument("--config", default="DCE+RGB", choices=["D", "DCE", "DCE+RGB"], help="generator input [DCE+RGB]")
    t.add_argument("--resolution", type=int, default=64, choices=[16, 32, 64, 128, 256],
                   help="final network resolution [64]")
    t.add_argument("--minutes", type=float, help="wall-clock budget, split over the growing phases")
    t.add_argument("--images-per-phase", type=int, default=4000, help="without --minutes [4000]")
    t.add_argument("--kind", default="progressive", choices=["progressive", "pix2pix"])
    t.add_argument("--data", metavar="DIR_OR_NPZ",
                   help="your pairs (folder with coarse/ and gt/, see docs/learned.md) or a pairs .npz")
    t.add_argument("--extra-data", nargs="+", metavar="NPZ",
                   help="more pairs files (.npz) added to the training split only (the held-out split stays --data's)")
    t.add_argument("--pairs", type=int, default=3200, help="synthetic pairs to generate when --data is absent [3200]")
    t.add_argument("--encode-resolution", type=int,
                   help="encode the pairs at this resolution and area-downsample them to --resolution "
                        "(the refiner does the same at inference) [--resolution]")
    t.add_argument("--cache", metavar="FILE.npz", help="where to keep the generated pairs (reused when present)")
    t.add_argument("--model", default="sfm", help="morphable model for synthetic pairs [sfm]")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate [3e-4; the paper: 1e-5]")
    t.add_argument("--width", type=float, default=0.25, help="filter counts times the paper's [0.25]")
    t.add_argument("--no-skips", action="store_true", help="plain encoder-decoder (the paper's tables)")
    t.add_argument("--no-residual", action="store_true", help="generator outputs the image, not a correction")
    t.add_argument("--held-out", type=float, default=0.1, help="fraction of pairs held out for the MAE report")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="cpu, cuda or auto [auto]")
    t.add_argument("--threads", type=int, help="torch threads")
    t.add_argument("--fresh", action="store_true", help="do not resume an existing checkpoint")
    t.add_argument("--history", metavar="FILE.json", help="also write the training history and evaluations")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=func)
    return t


def _load_data(a, say):
    from .refiner_data import RefinerPairs, load_pairs, make_synthetic_pairs

    if a.data:
        p = pathlib.Path(a.data)
        if p.is_dir():
            say(f"encoding your pairs from {p}")
            return load_pairs(p, a.resolution)
        pairs = RefinerPairs.load(p)
    else:
        cache = pathlib.Path(a.cache) if a.cache else None
        if cache is not None and cache.is_file():
            say(f"reusing synthetic pairs {cache}")
            pairs = RefinerPairs.load(cache)
        else:
            enc = a.encode_resolution or a.resolution
            say(f"generating {a.pairs} synthetic pairs at {enc}x{enc} (model {a.model}, seed {a.seed})")
            pairs = make_synthetic_pairs(a.pairs, enc, model=a.model, seed=a.seed,
                                         progress=lambda d, n: say(f"  {d}/{n} pairs") if d % 512 < 64 else None)
            if cache is not None:
                pairs.save(cache)
    if pairs.resolution != a.resolution:
        if pairs.resolution < a.resolution:
            raise ValueError(f"the pairs are {pairs.resolution}x{pairs.resolution}, below --resolution {a.resolution}")
        say(f"area-downsampling the {pairs.resolution}x{pairs.resolution} pairs to {a.resolution}x{a.resolution}")
        pairs = pairs.downsample(a.resolution)
    return pairs


def _load_extra(a, resolution, say):
    from .refiner_data import RefinerPairs

    if not getattr(a, "extra_data", None):
        return None
    parts = []
    for f in a.extra_data:
        p = RefinerPairs.load(pathlib.Path(f).expanduser())
        if p.resolution < resolution:
            raise ValueError(f"the extra pairs {f} are {p.resolution}x{p.resolution}, below --resolution {resolution}")
        parts.append(p.downsample(resolution))
        say(f"extra training pairs: {len(p)} from {f}")
    return RefinerPairs(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                        np.concatenate([p.mask for p in parts]), np.concatenate([p.mm_per_unit for p in parts]),
                        {"files": [pathlib.Path(f).name for f in a.extra_data], "parts": [p.meta for p in parts]})


def run_train_refiner(a, say) -> int:
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch is optional
        raise ImportError("geomfit train-refiner needs torch: pip install torch==2.13.0 (CPU) or a CUDA build") from e
    from .. import atomic
    from .refiner import train_refiner

    out = pathlib.Path(a.output).expanduser()
    if out.exists() and not out.is_file():
        raise ValueError(f"output {out} exists and is not a file")
    if a.minutes is not None and not a.minutes > 0:
        raise ValueError("--minutes must be positive")
    pairs = _load_data(a, say)
    extra = _load_extra(a, pairs.resolution, say)
    say(f"{len(pairs)} pairs; training {a.kind} {a.config} at {a.resolution}x{a.resolution} -> {out}")
    res = train_refiner(pairs, out, config=a.config, kind=a.kind, minutes=a.minutes,
                        images_per_phase=a.images_per_phase, batch_size=a.batch_size, lr=a.lr, width=a.width,
                        skips=not a.no_skips, residual=not a.no_residual, held_out=a.held_out, seed=a.seed,
                        resume=not a.fresh, device=a.device, progress=not a.quiet, threads=a.threads,
                        extra_train=extra)
    if a.history:
        atomic.write_json(a.history, res)
    f = res["final"]
    print(f"geomfit: refiner written to {out.resolve()}; held-out depth MAE {f['mae_mm']:.3f} mm "
          f"(coarse input {f['coarse_mae_mm']:.3f} mm, ratio {f['ratio']:.3f}, {f['n']} pairs)")
    return 0
