"""Learned components of geomfit (optional: they need torch).

Names are imported lazily, like :mod:`geomfit`'s, so ``import geomfit.learned`` does not import torch;
the first use of a torch-backed name does.
"""
from importlib import import_module

# defining module -> public names re-exported here
_MODULES = {
    "geomfit.learned.refiner": ("Refiner", "ProgressiveGenerator", "ProgressiveDiscriminator", "train_refiner",
                                "gradient_penalty", "discriminator_loss", "generator_loss"),
    "geomfit.learned.refiner_data": ("make_synthetic_pairs", "load_pairs", "encode_depth", "RefinerPairs"),
    "geomfit.learned.pix2pix": ("UNetGenerator", "PatchDiscriminator"),
}
_EXPORTS = {name: mod for mod, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'geomfit.learned' has no attribute {name!r}")
    value = getattr(import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
