"""geomfit.learned: the optional torch layer (learned refiner, differentiable rendering, identity network,
photometric fitting, B-Net/FAN/DRN albedo and detail networks).

Everything here needs torch (``pip install geomfit[torch]``); ``import geomfit`` never imports this
package, and ``import geomfit.learned`` itself does not import torch: public names are resolved lazily
from the table below on first access (the same scheme as :mod:`geomfit`). To add a module, add one
row ``"geomfit.learned.<module>": ("Name", ...)`` to ``_MODULES``. A module must not share a name with a
function it exports (importing ``geomfit.learned.render`` would shadow the function ``render``), hence
``diffrender`` for :func:`render`. A name is exported by one row only.

B-Net, FAN and DRN (:mod:`geomfit.learned.detail`, :mod:`geomfit.learned.uv_dataset`): Wang, Lin, Xu, Che
and Wang, "Low-frequency guided self-supervised learning for high-fidelity 3D face reconstruction in the
wild", ICME 2020.
"""
from geomfit._lazy import lazy_exports as _lazy_exports

# defining module -> public names re-exported here (one row per module)
_MODULES = {
    "geomfit.learned.refiner": ("Refiner", "ProgressiveGenerator", "ProgressiveDiscriminator", "train_refiner",
                                "gradient_penalty", "discriminator_loss", "generator_loss"),
    "geomfit.learned.refiner_data": ("make_synthetic_pairs", "load_pairs", "encode_depth", "RefinerPairs"),
    # pix2pix.PatchDiscriminator(in_ch, ndf) stays importable from its module; the top-level name is
    # detail.PatchDiscriminator(in_channels=3, ndf=64, n_layers=3): the same 70x70 PatchGAN with the same
    # layer layout and state-dict keys, called the same way positionally, usable without arguments.
    "geomfit.learned.pix2pix": ("UNetGenerator",),
    "geomfit.learned.diffrender": ("render", "rasterize_ids", "barycentric_interpolate", "reference_render"),
    "geomfit.learned.identity": ("FaceIdentity", "read_dlib_net", "align_chip", "chip_transform",
                                 "dlib_model_path", "identity_loss"),
    "geomfit.learned.photometric": ("fit_photometric", "fit_photometric_multi", "PhotometricFit",
                                    "VertexAlbedo", "TorchModel"),
    "geomfit.learned.fastganfit": ("FastGANFit", "train_fastganfit", "ganfit_plus_plus", "collect_targets"),
    "geomfit.learned.detail": ("BNet", "FAN", "DRN", "PatchDiscriminator", "PCAAlbedo", "VGG16Features",
                               "train_bnet", "train_fan", "train_drn", "bnet_loss", "gan_discriminator_loss",
                               "gan_generator_loss", "perceptual_loss", "fan_generator_loss", "drn_loss",
                               "apply_displacement", "displaced_normals", "save_detail_model",
                               "load_detail_model", "perceptual_network", "sh_shade"),
    "geomfit.learned.uv_dataset": ("UVDataset",),
}
_EXPORTS = _lazy_exports("geomfit.learned", _MODULES, globals(), extra_all=())
