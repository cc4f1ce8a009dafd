"""B-Net, FAN and DRN: self-supervised albedo and detail networks on UV texture maps.

Wang, Lin, Xu, Che and Wang, "Low-frequency guided self-supervised learning for high-fidelity 3D face
reconstruction in the wild", ICME 2020, Secs. 3.2-3.4 and 4.1. Three networks are trained one after the
other on texture maps ``I_t(UV)`` (:func:`geomfit.uv_texture`, cached by
:class:`geomfit.learned.UVDataset`):

* **B-Net** (:class:`BNet`, Sec. 3.2): ResNet-18 with expansion 2 -> 1024-d feature -> a linear layer
  predicting PCA albedo coefficients ``p_a`` (Eq. 2, :class:`PCAAlbedo`) and 27 RGB spherical-harmonics
  coefficients ``gamma`` (Eq. 3); loss Eq. 4 (:func:`bnet_loss`).
* **FAN** (:class:`FAN`, Sec. 3.3): a U-Net-8 image-to-image albedo network (ngf 16, first and last
  convolutions 3x3 stride 1, an extra block down to 1x1, flipped features); trained against a PatchGAN
  (:class:`PatchDiscriminator`) whose real samples are B-Net albedos, plus pixel and perceptual terms,
  Eqs. 5-8 (:func:`gan_discriminator_loss`, :func:`gan_generator_loss`, :func:`perceptual_loss`,
  :func:`fan_generator_loss`).
* **DRN** (:class:`DRN`, Sec. 3.4): FAN's structure with one output channel, the displacement rate
  ``r_d(UV)`` along the vertex normal (``v' = v + r_d n``, :func:`apply_displacement`); loss Eq. 9
  (:func:`drn_loss`): image-gradient, constancy and smoothness terms.

Tensor layout: images are ``(B, C, S, S)`` float32, rows top-down with v up (row = (1 - v) S, as
:func:`geomfit.uv_texture` makes them). Shading follows :mod:`geomfit.sh` (irradiance coefficients,
camera frame x right, y up, z toward the camera); ``gamma`` is ``(B, 9, 3)``.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_open
from .photometric import _SH_C, sh_basis_torch

__all__ = [
    "BNet", "FAN", "DRN", "PatchDiscriminator", "PCAAlbedo", "VGG16Features",
    "sh_basis_t", "sh_shade", "displaced_normals", "apply_displacement",
    "masked_l1", "bnet_loss", "gan_discriminator_loss", "gan_generator_loss", "perceptual_loss",
    "fan_generator_loss", "drn_loss", "image_gradients",
    "train_bnet", "train_fan", "train_drn", "save_detail_model", "load_detail_model", "perceptual_network",
    "synthetic_detail_set", "normal_error_deg",
]

#: The paper's settings (Sec. 4.1).
PAPER = dict(lr=2e-5, w_a=1.0, w_pixel=0.005, w_percep=0.3, w_grad=0.5, w_const=1.0, w_smooth=20.0)

_C = _SH_C  # geomfit.sh's constants c0..c4


# ------------------------------------------------------------------------------------------------
# Spherical harmonics (Eq. 3), geomfit's convention
# ------------------------------------------------------------------------------------------------
def sh_basis_t(normals: torch.Tensor) -> torch.Tensor:
    """The nine SH basis functions of :func:`geomfit.sh.sh_basis` in torch: ``(B, 3, ...) -> (B, 9, ...)``."""
    return sh_basis_torch(normals, dim=1)


def sh_shade(normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Lambertian SH shading ``sum_b gamma_b H_b(n)`` per colour channel (Wang et al., ICME 2020, Eq. 3).

    Parameters
    ----------
    normals : (B, 3, S, S) unit normals, camera frame.
    gamma : (B, 9, 3) irradiance coefficients (geomfit's convention, :mod:`geomfit.sh`).

    Returns
    -------
    (B, 3, S, S) shading; the synthetic texture is ``albedo * shading``.
    """
    return torch.einsum("bkhw,bkc->bchw", sh_basis_t(normals), gamma)


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """ResNet basic block whose second convolution widens to ``planes * expansion`` channels."""

    def __init__(self, cin, planes, stride, expansion):
        super().__init__()
        cout = planes * expansion
        self.c1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(planes)
        self.c2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class BNet(nn.Module):
    """B-Net (Wang et al., ICME 2020, Sec. 3.2): ResNet-18 with expansion 2 -> PCA albedo + 27 SH coefficients.

    Choice made for "expansion 2" (the paper gives only the resulting 1024-d feature): ResNet-18's
    basic blocks with their *second* 3x3 convolution widened to ``2 * planes`` channels (64, 128,
    256, 512 planes -> 128, 256, 512, 1024 outputs), 1x1 projection shortcuts where the width changes;
    stem, depth (2, 2, 2, 2) and strides as ResNet-18. The last pooling averages the 8x8 map of a
    256x256 input (an adaptive average pool, so other sizes also work), giving the 1024-d feature;
    a linear layer predicts ``n_albedo + 27`` values: ``p_a`` then ``gamma`` (9 SH x RGB, SH index
    major). The linear layer is initialised to small weights and an ambient light (shading 1), so
    training starts from the mean albedo under uniform light.

    Parameters
    ----------
    n_albedo : int
        Number of PCA albedo coefficients (199 for BFM 2009/2017: 226 outputs).
    expansion : int
        2 as in the paper.
    width : int
        Stem width (64 in ResNet-18); smaller only for quick tests.
    in_channels : int
        3 (the RGB texture map).

    Input ``(B, 3, S, S)`` -> output ``(B, n_albedo + 27)``; :meth:`split` gives ``(p_a, gamma)``.
    """

    def __init__(self, n_albedo: int = 199, expansion: int = 2, width: int = 64, in_channels: int = 3):
        super().__init__()
        if int(n_albedo) != n_albedo or n_albedo < 0:
            raise ValueError(f"BNet: n_albedo must be a non-negative integer, got {n_albedo!r}")
        self.config = dict(n_albedo=int(n_albedo), expansion=int(expansion), width=int(width),
                           in_channels=int(in_channels))
        self.n_albedo = int(n_albedo)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for j in range(2):
                layers.append(_Block(cin, planes, 2 if (i > 0 and j == 0) else 1, expansion))
                cin = planes * expansion
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, self.n_albedo + 27)
        with torch.no_grad():
            self.fc.weight.mul_(0.01)
            self.fc.bias.zero_()
            self.fc.bias[self.n_albedo] = 1.0 / _C[0]  # gamma_0 of every channel: shading = 1
            self.fc.bias[self.n_albedo + 1] = 1.0 / _C[0]
            self.fc.bias[self.n_albedo + 2] = 1.0 / _C[0]

    def features(self, x):
        return self.pool(self.layers(self.stem(x))).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))

    def split(self, out):
        """``(p_a (B, n_albedo), gamma (B, 9, 3))`` from the output vector."""
        return out[:, :self.n_albedo], out[:, self.n_albedo:].reshape(-1, 9, 3)


class _UNetFlip(nn.Module):
    """U-Net with flipped features (the FAN/DRN structure of Wang et al., ICME 2020, Sec. 3.3)."""

    def __init__(self, out_channels, ngf=16, size=256, in_channels=3, activation="sigmoid", zero_last=False):
        super().__init__()
        n = int(round(math.log2(size)))
        if 2 ** n != size or n < 1:
            raise ValueError(f"{type(self).__name__}: size must be a power of two >= 2, got {size!r}")
        self.config = dict(ngf=int(ngf), size=int(size), in_channels=int(in_channels))
        self.size = size
        self.activation = activation
        self.inc = nn.Conv2d(in_channels, ngf, 3, 1, 1)           # stride 1, kernel 3
        ch = [2 * ngf] + [ngf * min(2 ** i, 8) for i in range(1, n + 1)]
        self.downs = nn.ModuleList()
        for i in range(1, n + 1):
            inner = i == n
            mods = [nn.LeakyReLU(0.2), nn.Conv2d(ch[i - 1], ch[i], 4, 2, 1, bias=False)]
            if not inner:
                mods.append(nn.BatchNorm2d(ch[i]))
            self.downs.append(nn.Sequential(*mods))
        self.ups = nn.ModuleList()
        for i in range(n, 0, -1):
            cin = ch[i] if i == n else 2 * ch[i]
            self.ups.append(nn.Sequential(nn.ReLU(True), nn.ConvTranspose2d(cin, ch[i - 1], 4, 2, 1, bias=False),
                                          nn.BatchNorm2d(ch[i - 1])))
        self.outc = nn.Sequential(nn.ReLU(True), nn.Conv2d(2 * ch[0], out_channels, 3, 1, 1))  # stride 1, kernel 3
        if zero_last:
            nn.init.zeros_(self.outc[1].weight)
            nn.init.zeros_(self.outc[1].bias)

    def forward(self, x):
        if x.ndim != 4 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"{type(self).__name__}: input must be (B, C, {self.size}, {self.size}), got {tuple(x.shape)}")
        h = self.inc(x)
        h = torch.cat([h, torch.flip(h, dims=[-1])], 1)  # flipped features (left-right symmetric UV layout)
        skips = [h]
        for d in self.downs:
            h = d(h)
            skips.append(h)
        h = self.ups[0](skips[-1])
        for k, up in enumerate(self.ups[1:]):
            h = up(torch.cat([h, skips[-2 - k]], 1))
        h = self.outc(torch.cat([h, skips[0]], 1))
        if self.activation == "sigmoid":
            h = torch.sigmoid(h)
        return h


class FAN(_UNetFlip):
    """Facial Albedo Network (Wang et al., ICME 2020, Sec. 3.3): texture map (B, 3, S, S) -> albedo (B, 3, S, S).

    pix2pix's U-Net-8 with ngf 16 and the paper's three changes: (1) ngf = 16; (2) the first and last
    convolutions are 3x3 with stride 1, so, for the deepest layer to be 1x1, the encoder has
    ``log2(S)`` stride-2 blocks (8 at 256: pix2pix's 8 levels, with the extra block replacing the
    down-sampling the first convolution no longer does); (3) the first convolution's features are
    concatenated with their left-right flip before the U-Net (the UV layout is mirror symmetric), and
    that same 2*ngf-channel map is the outermost skip. Channels per level ``ngf * min(2^i, 8)``,
    LeakyReLU(0.2)/Conv4x4s2/BatchNorm down (no norm at 1x1), ReLU/ConvTranspose4x4s2/BatchNorm up,
    no dropout; a sigmoid keeps the albedo in [0, 1].

    Parameters
    ----------
    ngf : int
        16 in the paper.
    size : int
        Map size S (256 in the paper); sets the number of levels. Power of two.
    """

    def __init__(self, ngf: int = 16, size: int = 256, in_channels: int = 3):
        super().__init__(3, ngf, size, in_channels, activation="sigmoid")


class DRN(_UNetFlip):
    """Detail Recovering Network (Wang et al., ICME 2020, Sec. 3.4): texture map -> displacement rate (B, 1, S, S).

    FAN's structure with one output channel and no output activation: ``r_d(UV)`` in model units
    along the vertex normal (``v' = v + r_d n``). The last convolution starts at zero, so an untrained
    DRN adds no detail.
    """

    def __init__(self, ngf: int = 16, size: int = 256, in_channels: int = 3):
        super().__init__(1, ngf, size, in_channels, activation=None, zero_last=True)


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of Isola et al. 2017 (70x70 receptive field at n_layers 3).

    Conv4x4s2(64)/LeakyReLU, [Conv4x4s2/BatchNorm/LeakyReLU] x (n_layers - 1) doubling up to 8*ndf,
    Conv4x4s1/BatchNorm/LeakyReLU, Conv4x4s1 -> one logit per patch. Input (B, 3, S, S) albedo maps.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        self.config = dict(in_channels=int(in_channels), ndf=int(ndf), n_layers=int(n_layers))
        mods = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        m = 1
        for i in range(1, n_layers):
            mp, m = m, min(2 ** i, 8)
            mods += [nn.Conv2d(ndf * mp, ndf * m, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * m), nn.LeakyReLU(0.2, True)]
        mp, m = m, min(2 ** n_layers, 8)
        mods += [nn.Conv2d(ndf * mp, ndf * m, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * m), nn.LeakyReLU(0.2, True),
                 nn.Conv2d(ndf * m, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class PCAAlbedo(nn.Module):
    """A linear albedo model in UV space, ``R_a = m_a + U_a p_a`` (Wang et al., ICME 2020, Eq. 2).

    ``basis`` columns are scaled by the standard deviations, so ``p_a ~ N(0, I)`` under the model and
    ``E_a = ||p_a||^2`` (Eq. 4) is its prior. Build it with :meth:`from_model` (a per-vertex colour
    model such as BFM's, resampled into UV through the texture coordinates) or :meth:`from_textures`
    (PCA of a set of texture maps; what the tests use).

    Parameters
    ----------
    mean : array (3, S, S)
    basis : array (K, 3, S, S)
    mask : bool array (S, S)
        Texels the model covers.
    """

    def __init__(self, mean, basis, mask):
        super().__init__()
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        basis = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
        mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if mean.ndim != 3 or mean.shape[0] != 3 or basis.ndim != 4 or basis.shape[1:] != mean.shape \
                or mask.shape != mean.shape[1:]:
            raise ValueError(f"PCAAlbedo: need mean (3, S, S), basis (K, 3, S, S), mask (S, S); got "
                             f"{tuple(mean.shape)}, {tuple(basis.shape)}, {tuple(mask.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("mask", mask)

    @property
    def n_components(self) -> int:
        return int(self.basis.shape[0])

    @property
    def size(self) -> int:
        return int(self.mean.shape[-1])

    def forward(self, p_a):
        """``(B, K) -> (B, 3, S, S)`` albedo maps."""
        return self.mean[None] + torch.einsum("bk,kchw->bchw", p_a, self.basis)

    @classmethod
    def from_model(cls, model, size: int = 256, n_components: Optional[int] = None, value_scale: Optional[float] = None):
        """Resample a per-vertex colour PCA model (``model.color_mean`` (N, 3), ``model.color_basis``
        (N, 3, K), e.g. BFM 2009/2017 read by :func:`geomfit.io.load_model`) into UV space through
        ``model.texcoords``. ``value_scale`` divides the colours (default: 255 when the mean exceeds
        2, i.e. BFM's 0-255 values, else 1)."""
        from ..uv import uv_raster

        if getattr(model, "color_mean", None) is None or getattr(model, "color_basis", None) is None:
            raise ValueError("PCAAlbedo.from_model: the model has no colour (albedo) model; load one with a "
                             "texture model (e.g. BFM 2009/2017) or use PCAAlbedo.from_textures")
        if getattr(model, "texcoords", None) is None:
            raise ValueError("PCAAlbedo.from_model: the model has no texture coordinates")
        cm = np.asarray(model.color_mean, np.float64)
        cb = np.asarray(model.color_basis, np.float64)
        if n_components is not None:
            cb = cb[:, :, :n_components]
        if value_scale is None:
            value_scale = 255.0 if cm.max() > 2.0 else 1.0
        ras = uv_raster(model.texcoords, model.faces, size)
        m = np.asarray(ras.mask)
        tri = np.asarray(model.faces)[np.asarray(ras.triangle_id)[m]]
        bary = np.asarray(ras.barycentric)[m]
        mean = np.zeros((3, size, size))
        mean[:, m] = np.einsum("mk,mkc->cm", bary, cm[tri]) / value_scale
        basis = np.zeros((cb.shape[2], 3, size, size))
        basis[:, :, m] = np.einsum("mk,mkcj->jcm", bary, cb[tri]) / value_scale
        return cls(mean, basis, m)

    @classmethod
    def from_textures(cls, textures, masks, n_components: int = 10):
        """PCA of texture maps ``(N, S, S, 3)`` (values where ``masks`` (N, S, S) are False are replaced
        by the per-texel mean of the others). Basis columns scaled by the singular values / sqrt(N - 1)."""
        t = np.asarray(textures, np.float64)
        mk = np.asarray(masks, bool)
        if t.ndim != 4 or t.shape[-1] != 3 or mk.shape != t.shape[:3]:
            raise ValueError(f"PCAAlbedo.from_textures: textures (N, S, S, 3) and masks (N, S, S), got "
                             f"{t.shape}, {mk.shape}")
        n, S = t.shape[0], t.shape[1]
        cnt = mk.sum(0)
        mean = (t * mk[..., None]).sum(0) / np.maximum(cnt, 1)[..., None]
        filled = np.where(mk[..., None], t, mean[None])
        X = (filled - mean[None]).reshape(n, -1)
        k = int(min(n_components, max(n - 1, 0)))
        if k > 0:
            _, sv, vt = np.linalg.svd(X, full_matrices=False)
            basis = (vt[:k] * (sv[:k, None] / math.sqrt(max(n - 1, 1)))).reshape(k, S, S, 3)
        else:
            basis = np.zeros((0, S, S, 3))
        return cls(mean.transpose(2, 0, 1), basis.transpose(0, 3, 1, 2), cnt > 0)


# ------------------------------------------------------------------------------------------------
# Perceptual features (Eq. 8)
# ------------------------------------------------------------------------------------------------
class VGG16Features(nn.Module):
    """VGG-16 convolutional layers (configuration D) returning relu1_2, relu2_2, relu3_3, relu4_3.

    The layout of torchvision's ``vgg16().features`` (state-dict keys ``features.0.weight`` ...), so a
    user's ImageNet checkpoint (e.g. torchvision's ``vgg16-397923af.pth``, which is not shipped here)
    loads with :meth:`from_checkpoint`. Inputs are RGB in [0, 1] and are normalised with ImageNet's
    mean and standard deviation.
    """

    _CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
    _TAPS = (3, 8, 15, 22)  # indices of relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's features

    def __init__(self):
        super().__init__()
        mods, c = [], 3
        for v in self._CFG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(c, v, 3, 1, 1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*mods)
        self.register_buffer("mu", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path):
        """Load the ``features.*`` tensors of a VGG-16 state dict (a whole-model torchvision checkpoint works)."""
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"VGG16Features: no checkpoint at {p}")
        sd = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        feats = {k: v for k, v in sd.items() if k.startswith("features.")}
        net = cls()
        own = net.state_dict()
        need = [k for k in own if k.startswith("features.")]
        missing = [k for k in need if k not in feats]
        if missing:
            raise ValueError(f"VGG16Features: {p} is not a VGG-16 checkpoint (missing {missing[:3]}...)")
        for k in need:
            if tuple(feats[k].shape) != tuple(own[k].shape):
                raise ValueError(f"VGG16Features: {p}: {k} has shape {tuple(feats[k].shape)}, expected {tuple(own[k].shape)}")
        net.load_state_dict({**own, **{k: feats[k] for k in need}})
        return net.eval()

    def forward(self, x) -> List[torch.Tensor]:
        h = (x - self.mu) / self.sigma
        out = []
        for i, m in enumerate(self.features):
            h = m(h)
            if i in self._TAPS:
                out.append(h)
            if i >= self._TAPS[-1]:
                break
        return out


class _IdentityFeatures(nn.Module):
    """The face-recognition ResNet's residual-level activations (``geomfit.learned.identity``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.net.requires_grad_(False)

    def forward(self, x):
        H, W = self.net.input_size
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return list(self.net.features(x)[1])


def perceptual_network(spec="auto") -> Optional[Callable]:
    """Resolve the feature network ``F`` of the perceptual loss (Wang et al., ICME 2020, Eq. 8).

    Parameters
    ----------
    spec : None, "auto", "identity", "vgg16:PATH", path, or callable
        ``None``: no perceptual term. ``"identity"``: the intermediate activations of dlib's
        face-recognition ResNet (:class:`geomfit.learned.FaceIdentity`, whose weights ship with the
        ``face_recognition_models`` package). ``"vgg16:PATH"`` or a ``.pth`` path: a user's VGG-16
        checkpoint (the paper's choice, ImageNet weights; not shipped). ``"auto"``: the identity
        network when it can be loaded, else None. A callable ``x -> list of feature maps`` is used as is.

    Returns
    -------
    callable or None
    """
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"perceptual: expected None, 'auto', 'identity', 'vgg16:PATH' or a callable, got {spec!r}")
    s = os.fspath(spec)
    if s in ("auto", "identity"):
        try:
            from .identity import FaceIdentity

            return _IdentityFeatures(FaceIdentity.from_dlib())
        except (ImportError, FileNotFoundError, ValueError, OSError) as e:
            if s == "auto":
                return None
            raise ValueError(f"perceptual='identity': the identity network is not available ({e})") from e
    if s.startswith("vgg16:"):
        s = s[len("vgg16:"):]
    return VGG16Features.from_checkpoint(s)


# ------------------------------------------------------------------------------------------------
# Losses (Eqs. 4-9)
# ------------------------------------------------------------------------------------------------
def masked_l1(a, b, mask):
    """Mean of ``|a - b|`` over the texels where ``mask`` (B, 1, S, S) is 1 and over channels."""
    m = mask.to(a.dtype)
    if m.ndim == 3:
        m = m[:, None]
    den = m.sum() * a.shape[1]
    return (torch.abs(a - b) * m).sum() / torch.clamp(den, min=1.0)


def bnet_loss(texture, visible, synth, p_a, w_a: float = PAPER["w_a"]):
    """Wang et al., ICME 2020, Eq. 4: ``E_pixel + w_a E_a`` with ``E_pixel = |I_t(UV) - I_syn(UV)|`` (mean over visible
    texels and channels) and ``E_a = ||p_a||^2`` (mean over the batch)."""
    return masked_l1(texture, synth, visible) + w_a * (p_a ** 2).sum(1).mean()


def gan_discriminator_loss(d_real, d_fake):
    """The discriminator's side of Wang et al., ICME 2020, Eq. 6: maximising ``E[log D(x)] + E[log(1 - D(G(z)))]``,
    written as the loss ``-E[log D(x)] - E[log(1 - D(G(z)))]`` on logits (D = sigmoid of the logit)."""
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def gan_generator_loss(d_fake):
    """The generator's side of Eq. 6 in the non-saturating form of Goodfellow et al. (as pix2pix):
    ``-E[log D(G(z))]``."""
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def perceptual_loss(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]):
    """Wang et al., ICME 2020, Eq. 8: ``(1/n) sum_j ||F_j(a) - F_j(b)||_2 / (H_j W_j C_j)``, per sample, mean over the batch."""
    if len(feats_a) != len(feats_b) or not feats_a:
        raise ValueError("perceptual_loss: need the same non-zero number of feature maps for both images")
    tot = 0.0
    for fa, fb in zip(feats_a, feats_b):
        chw = fa[0].numel()
        tot = tot + torch.sqrt(((fa - fb) ** 2).flatten(1).sum(1) + 1e-12) / chw
    return (tot / len(feats_a)).mean()


def fan_generator_loss(texture, visible, synth, d_fake, feature_net=None, w_pixel: float = PAPER["w_pixel"],
                       w_percep: float = PAPER["w_percep"], w_gan: float = 1.0):
    """FAN's loss (Eqs. 5 and 7): ``w_gan * E_GAN(G) + w_pixel E_pixel + w_percep E_percep``.

    ``E_pixel`` is Eq. 4's masked L1 with FAN's albedo in ``synth``; ``E_percep`` (Eq. 8) compares the
    feature maps of the visible parts of ``texture`` and ``synth`` (invisible texels set to 0 in both).
    Returns ``(total, parts)``.
    """
    e_pix = masked_l1(texture, synth, visible)
    e_gan = gan_generator_loss(d_fake) if d_fake is not None else texture.new_zeros(())
    e_per = texture.new_zeros(())
    if feature_net is not None and w_percep:
        m = visible.to(texture.dtype)
        m = m[:, None] if m.ndim == 3 else m
        e_per = perceptual_loss(feature_net(texture * m), feature_net(synth * m))
    total = w_gan * e_gan + w_pixel * e_pix + w_percep * e_per
    return total, dict(gan=e_gan.item(), pixel=e_pix.item(), percep=e_per.item())


def image_gradients(x):
    """Forward differences ``(dx, dy)`` of (B, C, S, S) maps: ``dx[..., j] = x[..., j+1] - x[..., j]``."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def drn_loss(texture, visible, synth, delta, mask, w_grad: float = PAPER["w_grad"], w_const: float = PAPER["w_const"],
             w_smooth: float = PAPER["w_smooth"]):
    """DRN's loss, Wang et al. Eq. 9: ``w_grad E_grad + w_const E_const + w_smooth E_smooth``.

    * ``E_grad = |grad I_t - grad I_syn|``: forward differences along rows and columns, mean over the
      pairs of horizontally / vertically adjacent texels that are both visible, and over channels;
    * ``E_const = |Delta d|``: the Euclidean length of the displacement ``Delta d = r_d n`` (B, 3, S, S),
      mean over ``mask`` texels;
    * ``E_smooth = sum_i sum_{j in N(i)} ||Delta d_i - Delta d_j||^2``: on the UV grid the 1-ring of a texel
      is its 4-neighbourhood; normalised by the number of neighbour pairs inside ``mask`` (the paper's
      plain sum would scale the weight with the map size).

    Returns ``(total, parts)``.
    """
    v = visible.to(texture.dtype)
    v = v[:, None] if v.ndim == 3 else v
    m = mask.to(texture.dtype)
    m = m[:, None] if m.ndim == 3 else m
    gxt, gyt = image_gradients(texture)
    gxs, gys = image_gradients(synth)
    vx = v[..., :, 1:] * v[..., :, :-1]
    vy = v[..., 1:, :] * v[..., :-1, :]
    C = texture.shape[1]
    e_grad = ((torch.abs(gxt - gxs) * vx).sum() + (torch.abs(gyt - gys) * vy).sum()) / torch.clamp(
        (vx.sum() + vy.sum()) * C, min=1.0)
    e_const = (torch.sqrt((delta ** 2).sum(1, keepdim=True) + 1e-12) * m).sum() / torch.clamp(m.sum(), min=1.0)
    dx, dy = image_gradients(delta)
    mx = m[..., :, 1:] * m[..., :, :-1]
    my = m[..., 1:, :] * m[..., :-1, :]
    e_smooth = (((dx ** 2).sum(1, keepdim=True) * mx).sum() + ((dy ** 2).sum(1, keepdim=True) * my).sum()) / \
        torch.clamp(mx.sum() + my.sum(), min=1.0)
    total = w_grad * e_grad + w_const * e_const + w_smooth * e_smooth
    return total, dict(grad=e_grad.item(), const=e_const.item(), smooth=e_smooth.item())


def displaced_normals(normals, dpdu, dpdv, rate, mask, size=None):
    """Normals of the displaced surface ``P + r_d n`` in UV space (first order).

    With ``P_u, P_v`` the surface tangents per unit texture coordinate (:class:`geomfit.uv.UVTexture`
    ``dpdu``/``dpdv``) the displaced tangents are ``P_u + (d r_d / du) n`` and ``P_v + (d r_d / dv) n``
    (the ``r_d dn/du`` curvature term is dropped); their cross product, oriented like ``n``, is
    normalised. ``d r_d / du`` uses central differences on the grid (one-sided at the mask border,
    0 for an isolated texel); rows go down, so ``dv = -1/S`` per row.

    Parameters
    ----------
    normals, dpdu, dpdv : (B, 3, S, S)
    rate : (B, 1, S, S)
    mask : (B, 1, S, S) or (B, S, S)

    Returns
    -------
    (B, 3, S, S) unit normals (``normals`` where ``mask`` is 0).
    """
    S = rate.shape[-1]
    m = mask.to(rate.dtype)
    m = m[:, None] if m.ndim == 3 else m

    def deriv(axis):
        r = rate * m
        pad = (1, 1, 0, 0) if axis == -1 else (0, 0, 1, 1)
        rp = F.pad(r, pad)
        mp = F.pad(m, pad)
        if axis == -1:
            fwd, bwd = rp[..., 2:] - r, r - rp[..., :-2]
            mf, mb = mp[..., 2:] * m, mp[..., :-2] * m
        else:
            fwd, bwd = rp[..., 2:, :] - r, r - rp[..., :-2, :]
            mf, mb = mp[..., 2:, :] * m, mp[..., :-2, :] * m
        return (fwd * mf + bwd * mb) / torch.clamp(mf + mb, min=1.0)

    ru = deriv(-1) * S            # per unit u (columns step 1/S)
    rv = -deriv(-2) * S           # rows go down: v decreases by 1/S per row
    tu = dpdu + ru * normals
    tv = dpdv + rv * normals
    n = torch.cross(tu, tv, dim=1)
    sign = torch.sign((torch.cross(dpdu, dpdv, dim=1) * normals).sum(1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    n = n * sign
    n = n / torch.clamp(torch.linalg.vector_norm(n, dim=1, keepdim=True), min=1e-12)
    return torch.where(m > 0, n, normals)


def apply_displacement(vertices, faces, texcoords, rate_map, normals=None):
    """Move vertices along their normals by a displacement-rate UV map: ``v' = v + r_d n`` (Wang et al., ICME 2020, Sec. 3.4).

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    texcoords : array (N, 2)
        v up (OBJ convention), as :func:`geomfit.uv_texture`.
    rate_map : array (S, S) or (1, S, S)
        DRN's output for the mesh, model units.
    normals : array (N, 3), optional
        Unit vertex normals (default :func:`geomfit.vertex_normals`).

    Returns
    -------
    vertices (N, 3), rates (N,)
        Each vertex moved by its bilinearly sampled rate along its unit normal.
    """
    from ..mesh import vertex_normals
    from ..uv import sample_bilinear

    v = np.asarray(vertices, np.float64)
    r = np.asarray(rate_map.detach().cpu().numpy() if isinstance(rate_map, torch.Tensor) else rate_map, np.float64)
    r = r.reshape(r.shape[-2:])
    tc = np.asarray(texcoords, np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or tc.shape != (v.shape[0], 2):
        raise ValueError(f"apply_displacement: vertices (N, 3) and texcoords (N, 2) needed, got {v.shape}, {tc.shape}")
    if not np.isfinite(r).all():
        raise ValueError("apply_displacement: rate_map contains NaN or infinite values")
    n = vertex_normals(v, faces) if normals is None else np.asarray(normals, np.float64)
    S = r.shape[0]
    rates = sample_bilinear(r[..., None], tc[:, 0] * S, (1.0 - tc[:, 1]) * S)[:, 0]
    return v + rates[:, None] * n, rates


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _lowpass(tex, vis, sigma_px):
    """Visibility-normalised Gaussian blur (B, 3, S, S): the default low-frequency albedo stand-in."""
    k = max(1, int(3 * sigma_px))
    x = torch.arange(-k, k + 1, dtype=tex.dtype, device=tex.device)
    g = torch.exp(-x ** 2 / (2 * sigma_px ** 2))
    g = g / g.sum()
    v = vis.to(tex.dtype)
    v = v[:, None] if v.ndim == 3 else v

    def blur(z):
        c = z.shape[1]
        z = F.conv2d(F.pad(z, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(z, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)

    num = blur(tex * v)
    den = blur(v)
    return torch.where(den > 1e-3, num / torch.clamp(den, min=1e-3), num)


def _fit_sh(texture, visible, albedo, normals, ridge=1e-4):
    """Per-image least-squares SH lighting (B, 9, 3) with the albedo fixed: ``I_t ~ albedo * Y(n) gamma``."""
    Y = sh_basis_t(normals)                                   # (B, 9, S, S)
    v = visible.to(texture.dtype)
    v = v[:, None] if v.ndim == 3 else v
    out = []
    for c in range(3):
        A = (Y * albedo[:, c:c + 1] * v).flatten(2)          # (B, 9, P)
        b = (texture[:, c:c + 1] * v).flatten(2)             # (B, 1, P)
        AtA = A @ A.transpose(1, 2) + ridge * torch.eye(9, dtype=A.dtype, device=A.device)
        Atb = A @ b.transpose(1, 2)
        out.append(torch.linalg.solve(AtA, Atb)[..., 0])
    return torch.stack(out, -1)


def _default_albedo_light(tex, vis, nrm, sigma_px):
    """The documented stand-in when B-Net/FAN are not given: SH lighting fitted with a constant (unit)
    albedo, then the albedo = the shading-divided texture low-passed by a Gaussian of ``sigma_px``
    texels (visibility-normalised), then the lighting re-fitted against that albedo."""
    ones = torch.ones_like(tex)
    gamma = _fit_sh(tex, vis, ones, nrm)
    shading = sh_shade(nrm, gamma)
    v = vis.to(tex.dtype)
    v = v[:, None] if v.ndim == 3 else v
    ok = v * (shading.min(1, keepdim=True).values > 0.05).to(tex.dtype)
    ratio = torch.where(ok > 0, tex / torch.clamp(shading, min=0.05), torch.zeros_like(tex))
    albedo = torch.clamp(_lowpass(ratio, ok, sigma_px), 0.0, 1.0)
    return albedo, _fit_sh(tex, vis, albedo, nrm)


def _device(device):
    return torch.device(device if device is not None else "cpu")


def _batches(n, batch_size, steps, seed):
    g = np.random.default_rng(seed)
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        if order.size < batch_size:
            order = np.concatenate([order, g.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def _fixed_per_map(dataset, batches, chunk, device, fn):
    """Quantities of each map that training does not change (targets, lighting), computed once.

    ``fn(batch) -> tuple of (B, ...) tensors`` runs without gradients on chunks of ``chunk`` maps, over
    every map that ``batches`` (the index arrays of the training steps) uses, and nowhere else. The
    results stay in host memory beside the dataset; the returned ``lookup(idx)`` gives the rows of the
    maps ``idx`` on ``device``, as ``fn`` on ``dataset.batch(idx)`` would have."""
    used = np.unique(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    pos = np.full(len(dataset), -1, np.int64)
    pos[used] = np.arange(used.size)
    with torch.no_grad():
        parts = [[t.cpu() for t in fn(dataset.batch(used[i:i + chunk], device))] for i in range(0, used.size, chunk)]
    stored = [torch.cat(col) for col in zip(*parts)]

    def lookup(idx):
        rows = torch.from_numpy(pos[np.asarray(idx)])
        return tuple(t[rows].to(device) for t in stored)

    return lookup


def _progress(progress, stage, step, steps, loss):
    if progress is not None:
        progress(stage, step, steps, loss)


def train_bnet(dataset, albedo_model=None, *, steps: int = 1000, batch_size: int = 8, lr: float = PAPER["lr"],
               w_a: float = PAPER["w_a"], n_components: int = 10, bnet: Optional[BNet] = None, width: int = 64,
               device=None, seed: int = 0, progress=None):
    """Train B-Net by self-supervision (Wang et al., ICME 2020, Sec. 3.2, Eq. 4).

    The synthetic texture is ``I_syn = R_a(p_a) * sum_b gamma_b H_b(n)`` (Eqs. 2-3) with B-Net's ``p_a``
    and ``gamma``, the PCA albedo model ``albedo_model`` and the dataset's UV normals; the loss is
    ``E_pixel + w_a ||p_a||^2`` over visible texels. Adam with the paper's learning rate by default.

    Parameters
    ----------
    dataset : UVDataset
    albedo_model : PCAAlbedo, optional
        The paper uses BFM's 199-component model (:meth:`PCAAlbedo.from_model`). Default: the PCA
        (``n_components``) of the dataset's own low-passed textures (the first 512), which is *not* an
        albedo model (lighting stays in it) but lets the stage run without one.
    steps, batch_size, lr, w_a : training settings (paper: Adam, lr 2e-5, w_a = 1).
    bnet : BNet, optional
        Continue training this network (resume).
    width : int
        Stem width of a new B-Net (64 = ResNet-18).
    device : torch device, optional
    seed : int
    progress : callable(stage, step, steps, loss), optional

    Returns
    -------
    (BNet, list of float)
        The trained network (its ``albedo_model`` attribute holds the PCA model) and the loss per step.
    """
    dev = _device(device)
    torch.manual_seed(seed)
    if albedo_model is None:  # stand-in: PCA of (at most 512 of) the low-passed textures
        sub = np.arange(min(len(dataset), 512))
        lp = _lowpass(dataset.tensor("texture", sub), dataset.tensor("visible", sub), sigma_px=dataset.size / 32)
        albedo_model = PCAAlbedo.from_textures(lp.permute(0, 2, 3, 1).numpy(), dataset.visible[sub], n_components)
    if albedo_model.size != dataset.size:
        raise ValueError(f"train_bnet: albedo model is {albedo_model.size}x{albedo_model.size}, dataset {dataset.size}")
    albedo_model = albedo_model.to(dev)
    net = (bnet if bnet is not None else BNet(albedo_model.n_components, width=width)).to(dev)
    if net.n_albedo != albedo_model.n_components:
        raise ValueError(f"train_bnet: B-Net predicts {net.n_albedo} albedo coefficients, the model has "
                         f"{albedo_model.n_components}")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    hist = []
    net.train()
    for step, idx in enumerate(_batches(len(dataset), batch_size, steps, seed)):
        b = dataset.batch(idx, dev)
        p_a, gamma = net.split(net(b["texture"]))
        synth = albedo_model(p_a) * sh_shade(b["normals"], gamma)
        loss = bnet_loss(b["texture"], b["visible"], synth, p_a, w_a)
        hist.append(_descend(opt, loss))
        _progress(progress, "bnet", step + 1, steps, hist[-1])
    net.albedo_model = albedo_model
    return net.eval(), hist


def _descend(opt, loss) -> float:
    """One optimiser step on ``loss``; returns its value."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _bnet_outputs(bnet, albedo_model, texture):
    with torch.no_grad():
        was = bnet.training
        bnet.eval()
        p_a, gamma = bnet.split(bnet(texture))
        bnet.train(was)
        return albedo_model(p_a), gamma


def train_fan(dataset, bnet: Optional[BNet] = None, albedo_model=None, *, steps: int = 1000, batch_size: int = 4,
              lr: float = PAPER["lr"], w_pixel: float = PAPER["w_pixel"], w_percep: float = PAPER["w_percep"],
              w_gan: float = 1.0, perceptual="auto", fan: Optional[FAN] = None,
              discriminator: Optional[PatchDiscriminator] = None, ngf: int = 16, ndf: int = 64, device=None,
              seed: int = 0, progress=None):
    """Train FAN with a PatchGAN and pixel + perceptual terms (Wang et al., ICME 2020, Sec. 3.3, Eqs. 5-8).

    With ``bnet`` (the paper): B-Net gives each texture's lighting ``gamma`` and its PCA albedo, which
    is the "real" sample ``x`` of Eq. 6; FAN's albedo times the SH shading is ``I_syn`` for Eq. 7.
    Without it (documented default): the lighting is fitted per texture by least squares with a unit
    albedo, the real samples are the shading-divided textures low-passed by a Gaussian of ``S/32``
    texels (visibility-normalised), and the lighting is re-fitted against them. These targets (real
    sample, lighting, shading) do not change during training: they are computed once per map, before
    the first step, each map within a chunk of ``batch_size`` maps.

    Parameters
    ----------
    dataset : UVDataset
    bnet : BNet, optional
        From :func:`train_bnet` (its ``albedo_model`` is used unless ``albedo_model`` is given).
    perceptual : see :func:`perceptual_network` ("auto": the identity network when available).
    steps, batch_size, lr, w_pixel, w_percep, w_gan : paper: Adam lr 2e-5, w_pixel 0.005, w_percep 0.3.
    fan, discriminator : optional networks to continue training (resume).

    Returns
    -------
    (FAN, list of float)
        The trained FAN (``fan.discriminator`` holds D; ``fan.loss_parts`` the terms per step) and FAN's
        loss (Eq. 7 plus the GAN term) per step.
    """
    dev = _device(device)
    torch.manual_seed(seed)
    S = dataset.size
    if bnet is not None:
        albedo_model = albedo_model if albedo_model is not None else getattr(bnet, "albedo_model", None)
        if albedo_model is None:
            raise ValueError("train_fan: bnet has no albedo_model; pass albedo_model=")
        bnet = bnet.to(dev)
        albedo_model = albedo_model.to(dev)
    G = (fan if fan is not None else FAN(ngf=ngf, size=S)).to(dev)
    D = (discriminator if discriminator is not None else PatchDiscriminator(ndf=ndf)).to(dev)
    feat = perceptual_network(perceptual)
    if isinstance(feat, nn.Module):
        feat = feat.to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    hist, parts_hist = [], []

    def targets(b):  # D's real sample (on the UV layout only: outside it the PCA albedo is 0, FAN's output free)
        tex, vis, nrm = b["texture"], b["visible"], b["normals"]
        if bnet is not None:
            real, gamma = _bnet_outputs(bnet, albedo_model, tex)
        else:
            real, gamma = _default_albedo_light(tex, vis, nrm, S / 32)
        return real * b["mask"], sh_shade(nrm, gamma)

    batches = list(_batches(len(dataset), batch_size, steps, seed))
    fixed = _fixed_per_map(dataset, batches, batch_size, dev, targets)
    G.train()
    D.train()
    for step, idx in enumerate(batches):
        b = dataset.batch(idx, dev)
        tex, vis, m = b["texture"], b["visible"], b["mask"]
        real, shading = fixed(idx)
        albedo = G(tex)
        # discriminator step (Eq. 6); none when the GAN term is switched off
        d_loss = torch.zeros(())
        if w_gan:
            d_loss = gan_discriminator_loss(D(real), D(albedo.detach() * m))
            _descend(opt_d, d_loss)
        # generator step (Eqs. 5, 7, 8)
        g_loss, parts = fan_generator_loss(tex, vis, albedo * shading, D(albedo * m) if w_gan else None, feat,
                                       w_pixel, w_percep, w_gan)
        hist.append(_descend(opt_g, g_loss))
        parts_hist.append(dict(parts, discriminator=d_loss.item()))
        _progress(progress, "fan", step + 1, steps, hist[-1])
    G.discriminator = D
    G.loss_parts = parts_hist
    return G.eval(), hist


def train_drn(dataset, fan: Optional[FAN] = None, bnet: Optional[BNet] = None, *, steps: int = 1000,
              batch_size: int = 4, lr: float = PAPER["lr"], w_grad: float = PAPER["w_grad"],
              w_const: float = PAPER["w_const"], w_smooth: float = PAPER["w_smooth"], drn: Optional[DRN] = None,
              ngf: int = 16, device=None, seed: int = 0, progress=None):
    """Train DRN by self-supervision on image gradients (Wang et al., ICME 2020, Sec. 3.4, Eq. 9).

    ``I_syn = A * sum_b gamma_b H_b(n')`` with ``n'`` the normals of the surface displaced by DRN's
    rate along the normals (:func:`displaced_normals`); the albedo ``A`` is FAN's (the paper trains
    DRN "based on FAN") and the lighting B-Net's. Defaults when they are not passed: the stand-in of
    :func:`train_fan` (lighting fitted with a unit albedo, ``A`` = the shading-divided texture
    low-passed by a Gaussian of ``S/32`` texels) and, with FAN but no B-Net, lighting fitted against
    FAN's albedo with the undisplaced normals. Albedo and lighting are computed once per map, before
    the first step (as in :func:`train_fan`).

    Returns
    -------
    (DRN, list of float)
        The trained DRN (``drn.loss_parts``: the three terms per step) and its loss (Eq. 9) per step.
    """
    dev = _device(device)
    torch.manual_seed(seed)
    S = dataset.size
    if fan is not None:
        fan = fan.to(dev).eval()
    albedo_model = getattr(bnet, "albedo_model", None) if bnet is not None else None
    if bnet is not None:
        bnet = bnet.to(dev)
        albedo_model = albedo_model.to(dev)
    net = (drn if drn is not None else DRN(ngf=ngf, size=S)).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    hist, parts_hist = [], []

    def albedo_light(b):
        tex, vis, nrm = b["texture"], b["visible"], b["normals"]
        if fan is not None:
            albedo = fan(tex)
            gamma = _bnet_outputs(bnet, albedo_model, tex)[1] if bnet is not None else _fit_sh(tex, vis, albedo, nrm)
        else:
            albedo, gamma = _default_albedo_light(tex, vis, nrm, S / 32)
            if bnet is not None:
                gamma = _bnet_outputs(bnet, albedo_model, tex)[1]
        return albedo, gamma

    batches = list(_batches(len(dataset), batch_size, steps, seed))
    fixed = _fixed_per_map(dataset, batches, batch_size, dev, albedo_light)
    net.train()
    for step, idx in enumerate(batches):
        b = dataset.batch(idx, dev)
        tex, vis, nrm, mask = b["texture"], b["visible"], b["normals"], b["mask"]
        albedo, gamma = fixed(idx)
        rate = net(tex)
        n2 = displaced_normals(nrm, b["dpdu"], b["dpdv"], rate, mask)
        synth = albedo * sh_shade(n2, gamma)
        loss, parts = drn_loss(tex, vis, synth, rate * nrm, mask, w_grad, w_const, w_smooth)
        parts_hist.append(parts)
        hist.append(_descend(opt, loss))
        _progress(progress, "drn", step + 1, steps, hist[-1])
    net.loss_parts = parts_hist
    return net.eval(), hist


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
_CLASSES = {"BNet": BNet, "FAN": FAN, "DRN": DRN, "PatchDiscriminator": PatchDiscriminator}


def save_detail_model(path, module: nn.Module, extra: Optional[dict] = None):
    """Write a B-Net/FAN/DRN/PatchDiscriminator checkpoint atomically (class, constructor settings, weights;
    a B-Net's PCA albedo model and a FAN's discriminator go along)."""
    name = type(module).__name__
    if name not in _CLASSES:
        raise TypeError(f"save_detail_model: expected one of {sorted(_CLASSES)}, got {name}")
    payload = {"format": "geomfit-detail", "version": 1, "class": name, "config": dict(module.config),
               "state": module.state_dict(), "extra": dict(extra or {})}
    am = getattr(module, "albedo_model", None)
    if am is not None:  # a submodule: its buffers are in the state dict
        payload["albedo_model"] = {"n_components": am.n_components, "size": am.size}
    d = getattr(module, "discriminator", None)
    if d is not None:
        payload["discriminator"] = {"config": dict(d.config)}
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p) as fh:
        torch.save(payload, fh)
    return p


def load_detail_model(path, map_location="cpu") -> nn.Module:
    """Read a checkpoint written by :func:`save_detail_model`; the module is returned in eval mode."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"load_detail_model: no checkpoint at {p}")
    try:
        d = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"load_detail_model: {p} is not a readable torch checkpoint ({e})") from e
    if not isinstance(d, dict) or d.get("format") != "geomfit-detail" or d.get("class") not in _CLASSES:
        raise ValueError(f"load_detail_model: {p} is not a geomfit B-Net/FAN/DRN checkpoint")
    m = _CLASSES[d["class"]](**d["config"])
    if "albedo_model" in d:
        k, S = d["albedo_model"]["n_components"], d["albedo_model"]["size"]
        m.albedo_model = PCAAlbedo(np.zeros((3, S, S)), np.zeros((k, 3, S, S)), np.zeros((S, S), bool))
    if "discriminator" in d:
        m.discriminator = PatchDiscriminator(**d["discriminator"]["config"])
    m.load_state_dict(d["state"])
    m.checkpoint_extra = d.get("extra", {})
    return m.eval()


# ------------------------------------------------------------------------------------------------
# Synthetic data with a known displacement map
# ------------------------------------------------------------------------------------------------
def synthetic_detail_set(n: int = 8, size: int = 64, seed: int = 0, amplitude: float = 0.012,
                         wavelength_texels: float = 8.0):
    """Texture maps rendered from a surface with known fine displacement (for testing DRN).

    Each sample is a spherical cap ``P(u, v) = (2u - 1, 2v - 1, h)`` (model units) displaced along its
    normal by a procedural wrinkle map ``r(u, v)`` (a few sinusoidal ridges of random direction and
    phase, about ``wavelength_texels`` texels long, ``amplitude`` high, faded by a random smooth
    envelope), with a smooth random albedo and random SH lighting (ambient plus a directional term).
    The texture is ``albedo * shading(n_true)``, where ``n_true`` are the normals of the exact displaced
    surface ``P + r n`` by central differences (so the curvature term that :func:`displaced_normals`
    drops is in the data). The UV dataset carries the *undisplaced* normals and tangents, as a 3DMM
    fit would.

    Returns
    -------
    (UVDataset, rates (n, S, S), true_normals (n, S, S, 3))
    """
    from .uv_dataset import UVDataset

    rng = np.random.default_rng(seed)
    S = int(size)
    t = (np.arange(S) + 0.5) / S
    U, V = np.meshgrid(t, 1.0 - t)                 # row 0 is v = 1 (v up)
    x, y = 2 * U - 1, 2 * V - 1
    c = 3.0
    h = np.sqrt(c - x ** 2 - y ** 2)
    P = np.stack([x, y, h], -1)
    dpdu = np.stack([np.full_like(x, 2.0), np.zeros_like(x), -2 * x / h], -1)
    dpdv = np.stack([np.zeros_like(x), np.full_like(x, 2.0), -2 * y / h], -1)
    nrm = np.cross(dpdu, dpdv)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    from ..sh import sh_basis

    tex, rates, ntrue = [], [], []
    for _ in range(n):
        r = np.zeros((S, S))
        for _k in range(4):
            ang = rng.uniform(0, np.pi)
            k = 2 * np.pi / (wavelength_texels / S * rng.uniform(0.8, 1.5))
            ph = rng.uniform(0, 2 * np.pi)
            env = np.exp(-((U - rng.uniform(0.2, 0.8)) ** 2 + (V - rng.uniform(0.2, 0.8)) ** 2) / 0.08)
            r += amplitude * env * np.sin(k * (np.cos(ang) * U + np.sin(ang) * V) + ph)
        Q = P + r[..., None] * nrm
        qu = np.gradient(Q, axis=1) * S            # d/du: columns step 1/S
        qv = -np.gradient(Q, axis=0) * S           # d/dv: rows go down
        nt = np.cross(qu, qv)
        nt /= np.linalg.norm(nt, axis=-1, keepdims=True)
        alb = np.stack([0.55 + 0.1 * np.sin(rng.uniform(1, 3) * x + rng.uniform(0, 6)),
                        0.42 + 0.08 * np.cos(rng.uniform(1, 3) * y + rng.uniform(0, 6)),
                        0.33 + 0.05 * np.sin(rng.uniform(1, 3) * (x + y))], -1)
        g = np.zeros((9, 3))
        g[0] = 0.6 / 0.282095
        d = rng.normal(size=3)
        d[2] = abs(d[2]) + 0.5
        d /= np.linalg.norm(d)
        g[[3, 1, 2]] = (0.9 * d)[:, None] / 0.488603 * np.array([1.0, 0.97, 0.93])[None]
        tex.append(np.clip(alb * (sh_basis(nt.reshape(-1, 3)) @ g).reshape(S, S, 3), 0, 1))
        rates.append(r)
        ntrue.append(nt)
    nb = lambda a: np.broadcast_to(a, (n,) + a.shape).copy()  # noqa: E731
    ds = UVDataset(texture=np.array(tex), visible=np.ones((n, S, S), bool), mask=np.ones((n, S, S), bool),
                   normals=nb(nrm), dpdu=nb(dpdu), dpdv=nb(dpdv), sources=[f"synthetic#{i}" for i in range(n)])
    return ds, np.array(rates), np.array(ntrue)


def normal_error_deg(drn: Optional[nn.Module], dataset, true_normals) -> float:
    """Mean angle (degrees) between the normals of the surface displaced by ``drn``'s rate (``None``: no
    displacement) and ``true_normals`` (N, S, S, 3), over the dataset's mask."""
    with torch.no_grad():
        b = dataset.batch(np.arange(len(dataset)))
        rate = drn.eval()(b["texture"]) if drn is not None else torch.zeros_like(b["texture"][:, :1])
        n2 = displaced_normals(b["normals"], b["dpdu"], b["dpdv"], rate, b["mask"])
    nt = torch.from_numpy(np.ascontiguousarray(true_normals)).float().permute(0, 3, 1, 2)
    cos = torch.clamp((n2 * nt).sum(1), -1, 1)
    ang = torch.rad2deg(torch.arccos(cos))
    m = b["mask"][:, 0] > 0
    return float(ang[m].mean())
