"""Progressive conditional GAN depth refiner (Galteri et al., CVIU 2019; CVPR-W 2019).

A coarse 3DMM reconstruction, encoded as an image (depth, mean curvature, elevation, optionally the
photo's RGB; :mod:`geomfit.learned.refiner_data`), is translated by an encoder-decoder generator
into the encoding of the detailed face. Generator and discriminator grow together from 4x4 to the
target resolution with fade-in (Karras et al., "Progressive growing of GANs for improved quality,
stability, and variation", ICLR 2018). Losses (CVIU Sec. 4.3):

* discriminator, WGAN-GP (Eq. 2): ``L_D = D(x, y) - D(x, G(x)) + lambda (||grad_xhat D(x, xhat)||_2 - 1)^2``
  with ``xhat`` uniform between real and generated, ``lambda = 10`` (Gulrajani et al. 2017) and
  Karras's drift term ``1e-3 D(x, y)^2``;
* generator: ``L_G = ||y - G(x)||_1 + kappa D(x, G(x))`` with ``kappa = C * 1e-5``, ``C`` the number of
  channels in the pixel loss;
* the discriminator sees the **depth channel only**: its input is the coarse depth (condition) and
  the real or generated depth, 2 channels, whatever the generator's channels are.

Architecture (CVIU Tables 1-2; widths times ``width``, 1 = the paper's): per resolution r a block of
two 3x3 convolutions (``f(r) = min(128, 8192 / r)`` filters: 32 at 256, 64 at 128, 128 below),
mean-pooling in the encoder/discriminator and nearest-neighbour upsampling in the decoder; at 4x4 a
3x3 and a 4x4 convolution; input and output layers ("fromRGB"/"toRGB") are 3x3 convolutions with the
image's channels (Table 1's first row: 3 x 32 x 9 = 864 parameters). LeakyReLU(0.2); pixel
normalisation after every generator convolution; no minibatch standard deviation; weights from a
truncated normal (He standard deviation, cut at 2 sigma), no equalised learning rate.
Where the extracted tables are garbled geomfit follows Karras et al.: the discriminator's 4x4
convolution is "valid" (4x4 -> 1x1) followed by the fully-connected layer (Table 1: 128 parameters),
the generator's keeps 4x4 ("same" padding) to feed the decoder's 4x4 convolution. ``skips=True``
adds U-Net skip connections (encoder features concatenated into the decoder at equal resolution,
as in DeepPrivacy's progressive U-Net); the paper's tables have none (``skips=False``).
"""
from __future__ import annotations

import math
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .refiner_data import CONFIGS, RefinerPairs, check_config, decode_depth_delta, encode_depth

__all__ = ["ProgressiveGenerator", "ProgressiveDiscriminator", "gradient_penalty", "discriminator_loss",
           "generator_loss", "kappa_for", "schedule", "train_refiner", "Refiner", "DEFAULT_CHECKPOINT",
           "photometric_residual", "photometric_safeguard"]

#: The shipped refiner (trained here on synthetic pairs; see docs/learned.md for command and licence).
DEFAULT_CHECKPOINT = pathlib.Path(__file__).with_name("weights") / "refiner_default.pt"
LAMBDA_GP = 10.0
DRIFT = 1e-3


def paper_width(r: int) -> int:
    """Filters at resolution r in CVIU Tables 1-2: 32 at 256, 64 at 128, 128 at 64 and below."""
    return min(128, 8192 // r)


def _init(m: nn.Module):
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        std = math.sqrt(2.0 / fan_in)
        nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PixelNorm(nn.Module):
    """Karras et al.'s pixelwise feature normalisation ``a / sqrt(mean_c a^2 + 1e-8)``."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def _gconv(cin, cout, k=3, pad=None):
    """Generator convolution: conv, LeakyReLU(0.2), pixel norm. ``pad`` 'same4' pads a 4x4 kernel."""
    if pad == "same4":
        return nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(cin, cout, 4), nn.LeakyReLU(0.2), PixelNorm())
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.LeakyReLU(0.2), PixelNorm())


def _dconv(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.LeakyReLU(0.2))


def _levels(resolution: int) -> int:
    n = int(round(math.log2(resolution))) - 2
    if n < 0 or 4 * 2 ** n != resolution:
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    return n


class _Widths:
    def __init__(self, width: float):
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)

    def __call__(self, r: int) -> int:
        return max(4, int(round(paper_width(r) * self.width)))


class ProgressiveGenerator(nn.Module):
    """Encoder-decoder generator grown from 4x4 to ``resolution`` (CVIU Tables 1-2).

    Parameters
    ----------
    in_ch, out_ch : int
        Input channels (1 for D, 3 for DCE, 6 for DCE+RGB) and output channels (1 or 3).
    resolution : int
        Final resolution (power of two).
    width : float
        Multiplies the paper's filter counts (1.0: Tables 1-2; 0.25 trains on a CPU).
    skips : bool
        U-Net skip connections between encoder and decoder (not in the paper's tables).
    residual : bool
        Add the input's first ``out_ch`` channels (the coarse geometry) to the output, so the
        network learns the correction (not in the paper; it starts training from the coarse input
        instead of from noise, which a CPU budget needs).

    ``forward(x, level, alpha)``: ``x`` is (B, in_ch, r, r) with ``r = 4 * 2**level``; ``alpha`` in
    [0, 1] blends the newest resolution's layers with the 2x-upsampled output of the previous one
    (fade-in); returns (B, out_ch, r, r).
    """

    def __init__(self, in_ch: int, out_ch: int, resolution: int = 256, width: float = 1.0, skips: bool = False,
                 residual: bool = False):
        super().__init__()
        self.in_ch, self.out_ch, self.resolution = int(in_ch), int(out_ch), int(resolution)
        self.width, self.skips, self.residual = float(width), bool(skips), bool(residual)
        if residual and out_ch > in_ch:
            raise ValueError("residual=True needs in_ch >= out_ch")
        self.n_levels = _levels(resolution) + 1
        f = _Widths(width)
        res = [4 * 2 ** k for k in range(self.n_levels)]
        self.from_rgb = nn.ModuleDict({str(r): _gconv(in_ch, f(r)) for r in res})
        enc = {"4": nn.Sequential(_gconv(f(4), f(4)), _gconv(f(4), f(4), 4, "same4"))}
        dec = {"4": nn.Sequential(_gconv(f(4), f(4), 4, "same4"), _gconv(f(4), f(4)))}
        for r in res[1:]:
            enc[str(r)] = nn.Sequential(_gconv(f(r), f(r)), _gconv(f(r), f(r // 2)))
            cin = f(r // 2) + (f(r // 2) if skips else 0)
            dec[str(r)] = nn.Sequential(_gconv(cin, f(r)), _gconv(f(r), f(r)))
        self.enc, self.dec = nn.ModuleDict(enc), nn.ModuleDict(dec)
        self.to_rgb = nn.ModuleDict({str(r): nn.Conv2d(f(r), out_ch, 3, padding=1) for r in res})
        self.apply(_init)
        if residual:  # start exactly at the coarse input
            for m in self.to_rgb.values():
                nn.init.zeros_(m.weight)

    def forward(self, x, level: Optional[int] = None, alpha: float = 1.0):
        level = self.n_levels - 1 if level is None else int(level)
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level must be in [0, {self.n_levels - 1}], got {level}")
        R = 4 * 2 ** level
        if x.ndim != 4 or x.shape[1] != self.in_ch or x.shape[-1] != R or x.shape[-2] != R:
            raise ValueError(f"generator input must be (B, {self.in_ch}, {R}, {R}) at level {level}, got {tuple(x.shape)}")
        feats: Dict[int, torch.Tensor] = {}
        h = self.from_rgb[str(R)](x)
        r = R
        while r > 4:
            h = self.enc[str(r)](h)
            feats[r] = h
            h = F.avg_pool2d(h, 2)
            if r == R and alpha < 1.0:
                h = alpha * h + (1 - alpha) * self.from_rgb[str(r // 2)](F.avg_pool2d(x, 2))
            r //= 2
        h = self.enc["4"](h)
        h = self.dec["4"](h)
        prev = h
        r = 8
        while r <= R:
            prev = h
            up = F.interpolate(h, scale_factor=2, mode="nearest")
            if self.skips:
                up = torch.cat([up, feats[r]], 1)
            h = self.dec[str(r)](up)
            r *= 2
        out = self.to_rgb[str(R)](h)
        if R > 4 and alpha < 1.0:
            old = F.interpolate(self.to_rgb[str(R // 2)](prev), scale_factor=2, mode="nearest")
            out = alpha * out + (1 - alpha) * old
        if self.residual:
            out = out + x[:, :self.out_ch]
        return out


class ProgressiveDiscriminator(nn.Module):
    """WGAN critic grown with the generator (CVIU Table 1), on ``in_ch`` channels (2: condition depth
    and real/generated depth). ``forward(x, level, alpha)`` -> (B,) scores."""

    def __init__(self, in_ch: int = 2, resolution: int = 256, width: float = 1.0):
        super().__init__()
        self.in_ch, self.resolution, self.width = int(in_ch), int(resolution), float(width)
        self.n_levels = _levels(resolution) + 1
        f = _Widths(width)
        res = [4 * 2 ** k for k in range(self.n_levels)]
        self.from_rgb = nn.ModuleDict({str(r): _dconv(in_ch, f(r)) for r in res})
        blocks = {str(r): nn.Sequential(_dconv(f(r), f(r)), _dconv(f(r), f(r // 2))) for r in res[1:]}
        blocks["4"] = nn.Sequential(_dconv(f(4), f(4)), nn.Conv2d(f(4), f(4), 4), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleDict(blocks)
        self.fc = nn.Linear(f(4), 1)
        self.apply(_init)

    def forward(self, x, level: Optional[int] = None, alpha: float = 1.0):
        level = self.n_levels - 1 if level is None else int(level)
        R = 4 * 2 ** level
        if x.ndim != 4 or x.shape[1] != self.in_ch or x.shape[-1] != R:
            raise ValueError(f"discriminator input must be (B, {self.in_ch}, {R}, {R}), got {tuple(x.shape)}")
        h = self.from_rgb[str(R)](x)
        r = R
        while r > 4:
            h = F.avg_pool2d(self.blocks[str(r)](h), 2)
            if r == R and alpha < 1.0:
                h = alpha * h + (1 - alpha) * self.from_rgb[str(r // 2)](F.avg_pool2d(x, 2))
            r //= 2
        h = self.blocks["4"](h)
        return self.fc(h.flatten(1)).squeeze(1)


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def kappa_for(n_channels: int) -> float:
    """Adversarial weight ``kappa = C * 1e-5`` (CVIU Sec. 4.3), C = channels in the pixel loss."""
    return float(n_channels) * 1e-5


def _critic(D, cond_depth, depth, level, alpha):
    return D(torch.cat([cond_depth, depth], 1), level, alpha)


def gradient_penalty(D, cond_depth, real_depth, fake_depth, level=None, alpha=1.0, lam: float = LAMBDA_GP,
                     eps: Optional[torch.Tensor] = None):
    """WGAN-GP term of CVIU Eq. 2: ``lam * mean_b (||grad_xhat D(x, xhat)||_2 - 1)^2``.

    ``xhat = eps * real + (1 - eps) * fake`` with ``eps ~ U(0, 1)`` per sample (or given, shape
    (B,)); the gradient is taken with respect to ``xhat`` only (not the condition), its norm over
    all of a sample's pixels.
    """
    B = real_depth.shape[0]
    if eps is None:
        eps = torch.rand(B, device=real_depth.device)
    e = eps.view(B, 1, 1, 1).to(real_depth.dtype)
    xhat = (e * real_depth.detach() + (1 - e) * fake_depth.detach()).requires_grad_(True)
    out = _critic(D, cond_depth.detach(), xhat, level, alpha)
    (g,) = torch.autograd.grad(out.sum(), xhat, create_graph=True)
    return lam * ((g.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def discriminator_loss(D, cond_depth, real_depth, fake_depth, level=None, alpha=1.0, lam: float = LAMBDA_GP,
                       drift: float = DRIFT):
    """CVIU Eq. 2 averaged over the batch, plus Karras's drift ``drift * D(x, y)^2``.

    Returns (loss, dict of the terms as floats).
    """
    d_real = _critic(D, cond_depth, real_depth, level, alpha)
    d_fake = _critic(D, cond_depth, fake_depth.detach(), level, alpha)
    gp = gradient_penalty(D, cond_depth, real_depth, fake_depth, level, alpha, lam)
    loss = d_real.mean() - d_fake.mean() + gp + drift * (d_real ** 2).mean()
    return loss, {"d_real": float(d_real.mean().detach()), "d_fake": float(d_fake.mean().detach()),
                  "gp": float(gp.detach())}


def generator_loss(D, cond_depth, target, output, level=None, alpha=1.0, kappa: Optional[float] = None):
    """``L_G = mean |y - G(x)| + kappa * mean D(x, G(x))`` (CVIU Sec. 4.3).

    ``target`` and ``output`` carry all the pixel-loss channels (depth first); the critic sees the
    depth channel (index 0) only. ``kappa`` defaults to ``C * 1e-5`` with C = ``output.shape[1]``.
    Returns (loss, dict).
    """
    if kappa is None:
        kappa = kappa_for(output.shape[1])
    l1 = (target - output).abs().mean()
    adv = _critic(D, cond_depth, output[:, :1], level, alpha).mean()
    return l1 + kappa * adv, {"l1": float(l1.detach()), "adv": float(adv.detach()), "kappa": kappa}


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def schedule(resolution: int):
    """Phases of progressive growing: [(level, 'stab')] at 4x4, then ('fade', 'stab') per level."""
    out = [(0, "stab")]
    for lv in range(1, _levels(resolution) + 1):
        out += [(lv, "fade"), (lv, "stab")]
    return out


def _phase_weights(resolution: int):
    """Share of a time budget per phase: proportional to the phase's resolution."""
    w = np.array([4 * 2 ** lv for lv, _ in schedule(resolution)], dtype=np.float64)
    return w / w.sum()


def _down(t, r):
    R = t.shape[-1]
    return t if R == r else F.avg_pool2d(t, R // r)


def _blend_real(t, r, alpha):
    """Karras's fade-in of real images: ``alpha t + (1 - alpha) up(down(t))`` at resolution r."""
    t = t
    if alpha >= 1.0 or r <= 4:
        return t
    low = F.interpolate(F.avg_pool2d(t, 2), scale_factor=2, mode="nearest")
    return alpha * t + (1 - alpha) * low


def _device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _State:
    phase: int = 0
    phase_images: int = 0
    phase_seconds: float = 0.0
    step: int = 0
    images: int = 0
    seconds: float = 0.0
    history: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)


def _save_checkpoint(path, payload):
    from .. import atomic

    with atomic.atomic_open(path, "wb") as f:
        torch.save(payload, f)


def _masked_mae(pred_d, true_d, mask, mm_per_unit):
    """Per-sample MAE (mm) of the normalised depth channel over the mask."""
    err = (pred_d - true_d).abs() * mask
    n = mask.flatten(1).sum(1)
    mae = (err.flatten(1).sum(1) / n.clamp_min(1)) * mm_per_unit
    return torch.where(n > 0, mae, torch.full_like(mae, float("nan")))


def evaluate(G, pairs: RefinerPairs, config: str, level=None, kind: str = "progressive", batch: int = 64,
             device=None) -> dict:
    """Held-out depth MAE (mm over the face mask) of a generator and of the coarse input.

    At ``level`` below the final one, images are area-downsampled to that resolution.
    """
    dev = _device(device)
    idx, _ = CONFIGS[config]
    R = pairs.resolution
    r = R if level is None else 4 * 2 ** int(level)
    G.eval()
    maes, coarse = [], []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            x = _down(torch.from_numpy(pairs.x[s:s + batch, list(idx)].astype(np.float32)).to(dev), r)
            y = _down(torch.from_numpy(pairs.y[s:s + batch, :1].astype(np.float32)).to(dev), r)
            m = (_down(torch.from_numpy(pairs.mask[s:s + batch, None].astype(np.float32)).to(dev), r) > 0.999).float()
            mm = torch.from_numpy(pairs.mm_per_unit[s:s + batch]).float().to(dev)
            out = G(x, level) if kind == "progressive" else G(x)
            maes.append(_masked_mae(out[:, :1], y, m, mm).cpu())
            coarse.append(_masked_mae(x[:, :1], y, m, mm).cpu())
    G.train()
    a, c = torch.cat(maes).numpy(), torch.cat(coarse).numpy()
    ok = np.isfinite(a) & np.isfinite(c)
    if not ok.any():  # no pixel fully inside a face at this resolution
        return {"resolution": r, "mae_mm": float("nan"), "coarse_mae_mm": float("nan"), "ratio": float("nan"),
                "mae_mm_std": float("nan"), "n": 0}
    a, c = a[ok], c[ok]
    return {"resolution": r, "mae_mm": float(a.mean()), "coarse_mae_mm": float(c.mean()),
            "ratio": float(a.mean() / c.mean()), "mae_mm_std": float(a.std()), "n": int(len(a))}


def _build(kind, config, resolution, width, skips, ngf, device, residual=False):
    idx, out_ch = CONFIGS[config]
    if kind == "progressive":
        G = ProgressiveGenerator(len(idx), out_ch, resolution, width, skips, residual)
        D = ProgressiveDiscriminator(2, resolution, width)
    elif kind == "pix2pix":
        from .pix2pix import PatchDiscriminator, UNetGenerator

        G = UNetGenerator(len(idx), 1, resolution, ngf, residual)
        D = PatchDiscriminator(2, ngf)
    else:
        raise ValueError(f"kind must be 'progressive' or 'pix2pix', got {kind!r}")
    return G.to(device), D.to(device)


class _Bar:
    def __init__(self, enabled):
        self.enabled = enabled and sys.stderr is not None
        self.last = 0.0

    def __call__(self, text, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if force or now - self.last > 0.5:
            self.last = now
            print("\r" + text[:150].ljust(150), end="\n" if force else "", file=sys.stderr, flush=True)


def train_refiner(pairs: RefinerPairs, output, *, config: str = "DCE+RGB", kind: str = "progressive",
                  minutes: Optional[float] = None, images_per_phase: int = 4000, batch_size: int = 16,
                  lr: float = 1e-5, betas=(0.0, 0.99), width: float = 0.25, skips: bool = True, residual: bool = True,
                  ngf: int = 16,
                  held_out: float = 0.1, seed: int = 0, resume: bool = True, device=None, progress: bool = True,
                  checkpoint_every_s: float = 60.0, eval_max: int = 256, threads: Optional[int] = None,
                  extra_train: Optional[RefinerPairs] = None) -> dict:
    """Train a refiner (progressive CGAN, or the pix2pix baseline) and write a checkpoint.

    Parameters
    ----------
    pairs : RefinerPairs
        Encoded pairs at the final resolution; ``held_out`` of them are kept for the MAE report.
    output : path
        Checkpoint file (``.pt``), written atomically every ``checkpoint_every_s`` and at every
        phase end; an existing one with the same settings is resumed when ``resume``.
    config : {'D', 'DCE', 'DCE+RGB'}
        Generator input channels (CVIU Table 3); the pixel loss is on the output geometry channels
        (D: depth; else depth, curvature, elevation), the discriminator on depth.
    kind : {'progressive', 'pix2pix'}
        pix2pix: U-Net + 70x70 PatchGAN, non-progressive, depth output, vanilla GAN loss + 100 L1
        (Isola et al. 2017), Adam(2e-4, 0.5, 0.999).
    minutes : float, optional
        Wall-clock budget. Progressive: split over the phases in proportion to their resolution
        (the schedule always completes, at fewer images per phase); pix2pix: the whole budget.
        Without it, ``images_per_phase`` images per phase (pix2pix: that many times the number of
        phases of the progressive schedule).
    batch_size, lr, betas :
        Adam settings (the paper: batch 4, learning rate 1e-5; betas of Karras et al.).
    width, skips, residual :
        See :class:`ProgressiveGenerator`.
    ngf : int
        pix2pix base width.
    device : str, optional
        'cpu', 'cuda', default: CUDA when available.
    threads : int, optional
        torch intra-op threads.
    extra_train : RefinerPairs, optional
        More pairs (same resolution) added to the training split only: the held-out split and its
        report stay those of ``pairs`` (e.g. more synthetic identities, or pairs whose input is a
        blurred ground truth, :func:`~geomfit.learned.refiner_data.make_synthetic_pairs`).

    Returns
    -------
    dict
        ``history`` (per logged step), ``evals`` (held-out MAE at each phase end), images/s per
        resolution, the checkpoint path.
    """
    check_config(config)
    dev = _device(device)
    if threads:
        torch.set_num_threads(int(threads))
    R = pairs.resolution
    phases = schedule(R) if kind == "progressive" else [(_levels(R), "stab")]
    train, test = pairs.split(held_out, seed)
    n_extra = 0
    if extra_train is not None:
        if not isinstance(extra_train, RefinerPairs):
            raise TypeError(f"extra_train must be RefinerPairs, got {type(extra_train).__name__}")
        if extra_train.resolution != R:
            raise ValueError(f"extra_train pairs are {extra_train.resolution}x{extra_train.resolution}, "
                             f"the pairs {R}x{R}")
        n_extra = len(extra_train)
        train = RefinerPairs(np.concatenate([train.x, extra_train.x.astype(train.x.dtype)]),
                             np.concatenate([train.y, extra_train.y.astype(train.y.dtype)]),
                             np.concatenate([train.mask, extra_train.mask]),
                             np.concatenate([train.mm_per_unit, extra_train.mm_per_unit]), dict(train.meta))
    if len(test) > eval_max:
        test = test.subset(np.arange(eval_max))
    args = {"kind": kind, "config": config, "resolution": R, "width": width, "skips": skips, "residual": residual,
            "ngf": ngf,
            "batch_size": batch_size, "lr": lr, "betas": list(betas), "seed": seed, "minutes": minutes,
            "images_per_phase": images_per_phase, "held_out": held_out, "n_pairs": len(pairs),
            "n_extra_train": n_extra, "extra_meta": dict(extra_train.meta) if extra_train is not None else None,
            "encode_resolution": int(pairs.meta.get("encode_resolution", R)),
            "pairs_meta": pairs.meta}
    torch.manual_seed(seed)
    G, D = _build(kind, config, R, width, skips, ngf, dev, residual)
    if kind == "pix2pix":
        lr_, betas_ = 2e-4, (0.5, 0.999)
    else:
        lr_, betas_ = lr, tuple(betas)
    optG = torch.optim.Adam(G.parameters(), lr=lr_, betas=betas_)
    optD = torch.optim.Adam(D.parameters(), lr=lr_, betas=betas_)
    st = _State()
    out = pathlib.Path(output)
    if resume and out.is_file():
        ck = torch.load(out, map_location=dev, weights_only=False)
        same = {k: ck.get("args", {}).get(k) for k in ("kind", "config", "resolution", "width", "skips", "residual", "ngf")}
        if same != {k: args[k] for k in same}:
            raise ValueError(f"{out} was trained with other settings {same}; remove it or pass resume=False")
        G.load_state_dict(ck["G"])
        D.load_state_dict(ck["D"])
        optG.load_state_dict(ck["optG"])
        optD.load_state_dict(ck["optD"])
        st = _State(**ck["state"])
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"])
    rng = np.random.default_rng(seed + st.step)
    idx, out_ch = CONFIGS[config]
    xs = torch.from_numpy(train.x[:, list(idx)].astype(np.float32))
    ys = torch.from_numpy(train.y[:, :out_ch].astype(np.float32)) if kind == "progressive" else \
        torch.from_numpy(train.y[:, :1].astype(np.float32))
    budget = None
    if minutes is not None:
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        budget = minutes * 60.0 * (_phase_weights(R) if kind == "progressive" else np.array([1.0]))
    n_img_phase = images_per_phase if kind == "progressive" else images_per_phase * len(schedule(R))
    bar = _Bar(progress)
    bce = nn.BCEWithLogitsLoss()
    last_ck = time.perf_counter()
    throughput: Dict[str, list] = {}

    def payload():
        return {"format": "geomfit-refiner-checkpoint", "version": 1, "args": args, "G": G.state_dict(),
                "D": D.state_dict(), "optG": optG.state_dict(), "optD": optD.state_dict(),
                "state": st.__dict__, "torch_rng": torch.get_rng_state()}

    while st.phase < len(phases):
        level, ph = phases[st.phase]
        r = 4 * 2 ** level
        t_phase = time.perf_counter() - st.phase_seconds
        while True:
            done_frac = (st.phase_seconds / budget[st.phase]) if budget is not None else st.phase_images / n_img_phase
            if done_frac >= 1.0:
                break
            alpha = min(1.0, done_frac) if ph == "fade" else 1.0
            t0 = time.perf_counter()
            bi = torch.from_numpy(rng.integers(0, len(xs), batch_size))
            x = _blend_real(_down(xs[bi], r), r, alpha).to(dev)
            y = _blend_real(_down(ys[bi], r), r, alpha).to(dev)
            cond = x[:, :1]
            if kind == "progressive":
                fake = G(x, level, alpha)
                optD.zero_grad(set_to_none=True)
                ld, dterms = discriminator_loss(D, cond, y[:, :1], fake[:, :1], level, alpha)
                ld.backward()
                optD.step()
                optG.zero_grad(set_to_none=True)
                lg, gterms = generator_loss(D, cond, y, fake, level, alpha)
                lg.backward()
                optG.step()
            else:
                fake = G(x)
                optD.zero_grad(set_to_none=True)
                pr, pf = D(torch.cat([cond, y], 1)), D(torch.cat([cond, fake.detach()], 1))
                ld = 0.5 * (bce(pr, torch.ones_like(pr)) + bce(pf, torch.zeros_like(pf)))
                ld.backward()
                optD.step()
                optG.zero_grad(set_to_none=True)
                pf = D(torch.cat([cond, fake], 1))
                l1 = (fake - y).abs().mean()
                lg = bce(pf, torch.ones_like(pf)) + 100.0 * l1
                lg.backward()
                optG.step()
                dterms, gterms = {}, {"l1": float(l1.detach())}
            dt = time.perf_counter() - t0
            st.step += 1
            st.images += batch_size
            st.phase_images += batch_size
            st.phase_seconds = time.perf_counter() - t_phase
            st.seconds += dt
            throughput.setdefault(str(r), []).append(batch_size / dt)
            if st.step % 10 == 0:
                st.history.append({"step": st.step, "images": st.images, "seconds": round(st.seconds, 2),
                                   "resolution": r, "phase": ph, "alpha": round(alpha, 3), "loss_d": float(ld.detach()),
                                   "loss_g": float(lg.detach()), **{k: v for k, v in gterms.items() if k != "kappa"}, **dterms})
            ips = np.median(throughput[str(r)][-50:])
            bar(f"[{kind} {config}] phase {st.phase + 1}/{len(phases)} {r}x{r} {ph} a={alpha:.2f} "
                f"{min(done_frac, 1):5.1%} | img {st.images} | {ips:5.1f} img/s | L1 {gterms['l1']:.4f} "
                f"| LD {float(ld.detach()):+.3f}")
            if time.perf_counter() - last_ck > checkpoint_every_s:
                _save_checkpoint(out, payload())
                last_ck = time.perf_counter()
        ev = evaluate(G, test, config, level if kind == "progressive" else None, kind, device=dev)
        ev.update(phase=st.phase, level=level, kind=ph, images=st.images, seconds=round(st.seconds, 1))
        st.evals.append(ev)
        bar(f"[{kind} {config}] phase {st.phase + 1}/{len(phases)} {r}x{r} {ph} done: held-out depth MAE "
            f"{ev['mae_mm']:.3f} mm (coarse {ev['coarse_mae_mm']:.3f} mm, ratio {ev['ratio']:.3f})", force=True)
        st.phase += 1
        st.phase_images = 0
        st.phase_seconds = 0.0
        _save_checkpoint(out, payload())
        last_ck = time.perf_counter()
    ips = {k: float(np.median(v)) for k, v in throughput.items()}
    return {"checkpoint": str(out), "history": st.history, "evals": st.evals, "images_per_s": ips,
            "final": st.evals[-1] if st.evals else None, "images": st.images, "seconds": st.seconds}


# ------------------------------------------------------------------------------------------------
# photometric safeguard (not in Galteri et al.)
# ------------------------------------------------------------------------------------------------
#: Share of the face pixels (lowest errors) that :func:`photometric_residual` averages (robust to albedo edges).
SAFEGUARD_TRIM = 0.8


def _smooth(a, mask, sigma):
    """Normalised Gaussian convolution over the mask (the background does not leak in)."""
    import cv2

    k = int(2 * np.ceil(3 * sigma) + 1)
    num = cv2.GaussianBlur(np.where(mask, a, 0.0), (k, k), sigma)
    den = cv2.GaussianBlur(mask.astype(np.float64), (k, k), sigma)
    return num / np.maximum(den, 1e-9)


def _box_side(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)


def _shading_error_map(depth, mask, image):
    """Per-pixel squared error ``sum_c (Y(n) @ sh_c - I_c)^2`` of the photo against the depth's best SH shading.

    ``sh`` is the least-squares lighting per channel (:func:`geomfit.sh.fit_sh_lighting`) with a
    constant albedo per channel (it folds into ``sh``). Returns the map (0 outside) and the pixels
    used (the mask eroded by 2 pixels: no one-sided normals at the silhouette).
    """
    import cv2

    from ..render import depth_normals
    from ..sh import fit_sh_lighting, shade

    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inner.sum() < 16:
        inner = mask
    n = np.nan_to_num(np.asarray(depth_normals(np.where(mask, depth, np.nan))), nan=0.0)
    sh = fit_sh_lighting(image, n, 1.0, inner)
    e = ((shade(n, sh) - image) ** 2).sum(-1)
    return np.where(inner, e, 0.0), inner


def _trimmed_mean(e, trim=SAFEGUARD_TRIM):
    e = np.sort(np.asarray(e, dtype=np.float64))
    return float(e[: max(1, int(trim * len(e)))].mean())


def photometric_residual(depth, mask, image) -> float:
    """Robust photometric residual of a depth map against the photo under least-squares SH lighting.

    The mean of the lowest ``SAFEGUARD_TRIM`` (80 %) of the per-pixel errors
    ``sum_c (Y(n_p) @ sh_c - I_c(p))^2`` over the face (eroded by 2 pixels), where ``n`` are the
    normals of ``depth`` (:func:`geomfit.render.depth_normals`) and ``sh`` the least-squares
    second-order SH lighting per channel with a constant albedo per channel
    (:func:`geomfit.sh.fit_sh_lighting`; Ramamoorthi & Hanrahan, "An efficient representation for
    irradiance environment maps", SIGGRAPH 2001; Jin et al., Pattern Recognition Letters 2021,
    Eqs. 4-5). Trimming discards the worst-explained pixels (albedo edges: brows, lips, eyes). A
    rotation of the whole face is largely absorbed by the lighting, a depth offset entirely.
    """
    d, m, img = _check_safeguard_inputs(depth, mask, image)
    e, inner = _shading_error_map(d, m, img)
    return _trimmed_mean(e[inner])


def _check_safeguard_inputs(depth, mask, image, refined=None):
    from ..photo import as_float_rgb

    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must have shape (H, W), got {d.shape}")
    m = np.isfinite(d) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != d.shape:
        raise ValueError(f"mask has shape {m.shape} but depth has {d.shape}")
    img = as_float_rgb(image)
    if img.shape[:2] != d.shape:
        raise ValueError(f"image has size {img.shape[:2]} but depth has {d.shape}")
    if refined is not None and np.shape(refined) != d.shape:
        raise ValueError(f"refined has shape {np.shape(refined)} but depth has {d.shape}")
    if not np.isfinite(d[m]).all() or (refined is not None and not np.isfinite(np.asarray(refined)[m]).all()):
        raise ValueError("depth is NaN or infinite inside the mask")
    if m.sum() < 16:
        raise ValueError(f"the mask covers {int(m.sum())} pixels; need at least 16")
    return d, m, img


def photometric_safeguard(depth, refined, mask, image, sigma: Optional[float] = None):
    """Keep a refinement only where and if it explains the photo's shading better than its input.

    Parameters
    ----------
    depth, refined : arrays (H, W)
        The refiner's input and output (pixel units, larger = closer).
    mask : bool array (H, W)
        Face pixels.
    image : array (H, W, 3)
        The aligned photo (linear RGB, or uint8).
    sigma : float, optional
        Standard deviation (pixels) of the Gaussian that pools per-pixel residuals into regions;
        default 1/16 of the mask's bounding-box side.

    Returns
    -------
    out : array (H, W)
        ``depth + w * (refined - depth)``, NaN outside the mask. Candidates: the full refinement
        (``w = 1``) and a regional one (``w`` = the smoothed indicator of the pixels whose pooled
        error the refinement lowers; errors capped at their 80th percentile); the one with the
        lower :func:`photometric_residual` is returned if that is not above the input's, else the
        input itself. The returned depth's
        residual is therefore never above the input's (equal residuals keep the refinement: shading
        cannot see a depth offset).
    info : dict
        Residuals of input, candidates and output, and which was chosen.

    Notes
    -----
    Not part of Galteri et al. (CVIU 2019), whose refiner has no test at inference. A network trained
    on synthetic pairs can move a face that needs no change (a real scan, a good fit); the photo's
    shading is independent evidence. The test compares least-squares SH lighting fits
    (:func:`photometric_residual`; Ramamoorthi & Hanrahan 2001, Jin et al. 2021 Eqs. 4-5) with a
    constant albedo and a trimmed mean, so albedo edges (brows, lips) weigh on neither candidate.
    Where the albedo carries shading of its own (a photo texture with baked-in light) the test
    can prefer a smoother or a wrong surface; docs/learned.md reports what it does on a real scan.
    Shading constrains local relief, hardly the overall pose or a smooth change of shape: those
    parts of a refinement pass whenever the relief does not get worse.
    """
    import cv2

    d, m, img = _check_safeguard_inputs(depth, mask, image, refined)
    r = np.where(m, np.asarray(refined, dtype=np.float64), d)
    side = _box_side(m)
    sigma = side / 16.0 if sigma is None else float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    e_in, inner = _shading_error_map(d, m, img)
    e_ref, _ = _shading_error_map(r, m, img)
    # albedo edges weigh no more than the trimmed residual lets them
    cap = np.quantile(np.concatenate([e_in[inner], e_ref[inner]]), SAFEGUARD_TRIM)
    k = int(2 * np.ceil(3 * sigma) + 1)
    better = (_smooth(np.minimum(e_ref, cap), inner, sigma) < _smooth(np.minimum(e_in, cap), inner, sigma)) & m
    den = np.maximum(cv2.GaussianBlur(m.astype(np.float64), (k, k), sigma), 1e-9)
    w = cv2.GaussianBlur(better.astype(np.float64), (k, k), sigma) / den
    regional = d + w * (r - d)
    res = {"input": _trimmed_mean(e_in[inner]), "refined": _trimmed_mean(e_ref[inner])}
    res["regional"] = _trimmed_mean(_shading_error_map(regional, m, img)[0][inner])
    cands = ("refined", "regional") if (w[m] > 0).any() else ("refined",)  # w = 0: the regional one is the input
    best = min(cands, key=lambda c: res[c])
    chosen = best if res[best] <= res["input"] else "input"  # a tie (e.g. a depth offset) keeps the change
    out = {"input": d, "refined": r, "regional": regional}[chosen]
    info = {"residual": res, "chosen": chosen, "accepted_fraction": float(w[m].mean()) if chosen == "regional"
            else (1.0 if chosen == "refined" else 0.0), "sigma_px": float(sigma)}
    return np.where(m, out, np.nan), info


# ------------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------------
class Refiner:
    """A trained depth refiner: NumPy depth in, refined NumPy depth out.

    Use :meth:`load` (``"default"``: the refiner shipped with geomfit, or a checkpoint written by
    :func:`train_refiner` / ``geomfit train-refiner``) and :meth:`refine`.
    """

    def __init__(self, generator: nn.Module, config: str, resolution: int, kind: str = "progressive",
                 meta: Optional[dict] = None, device=None):
        self.G = generator.eval()
        self.config = check_config(config)
        self.resolution = int(resolution)
        self.kind = kind
        self.meta = dict(meta or {})
        self.device = _device(device) if device is not None else next(generator.parameters()).device
        #: resolution the depth is encoded at before area-downsampling to the network's (>= resolution)
        self.encode_resolution = self.resolution
        #: what :func:`photometric_safeguard` decided in the last :meth:`refine` call (None: not run)
        self.last_safeguard: Optional[dict] = None

    @property
    def needs_image(self) -> bool:
        return "RGB" in self.config

    @classmethod
    def load(cls, name_or_path="default", device="cpu") -> "Refiner":
        """Load ``"default"`` (the packaged refiner) or a checkpoint file."""
        if str(name_or_path) == "default":
            path = DEFAULT_CHECKPOINT
            if not path.is_file():
                raise FileNotFoundError(f"the default refiner is not installed ({path} is missing)")
        else:
            path = pathlib.Path(name_or_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"refiner checkpoint not found: {path}")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise ValueError(f"{path} is not a refiner checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ck, dict) or ck.get("format") != "geomfit-refiner-checkpoint":
            raise ValueError(f"{path} is not a geomfit refiner checkpoint")
        a = ck["args"]
        dev = _device(device)
        G, _ = _build(a["kind"], a["config"], a["resolution"], a["width"], a["skips"], a.get("ngf", 16), dev,
                      a.get("residual", False))
        sd = {k: v.float() for k, v in ck["G"].items()}
        G.load_state_dict(sd)
        meta = {k: v for k, v in ck.items() if k not in ("G", "D", "optG", "optD", "torch_rng")}
        ref = cls(G, a["config"], a["resolution"], a["kind"], meta, dev)
        ref.encode_resolution = int(a.get("encode_resolution", a["resolution"]))
        return ref

    def save(self, path, half: bool = True, extra: Optional[dict] = None):
        """Write an inference-only checkpoint (generator weights, float16 by default)."""
        sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in self.G.state_dict().items()}
        args = dict(self.meta.get("args", {}))
        args.update(kind=self.kind, config=self.config, resolution=self.resolution,
                    encode_resolution=self.encode_resolution,
                    width=getattr(self.G, "width", args.get("width", 0.25)),
                    skips=getattr(self.G, "skips", args.get("skips", False)),
                   residual=getattr(self.G, "residual", args.get("residual", False)))
        payload = {"format": "geomfit-refiner-checkpoint", "version": 1, "args": args, "G": sd,
                   "state": self.meta.get("state", {}), **(extra or {})}
        _save_checkpoint(path, payload)
        return pathlib.Path(path)

    def refine(self, depth, mask=None, image=None, safeguard: bool = True) -> np.ndarray:
        """Refine a depth map (geomfit conventions: pixel units, larger = closer, NaN outside).

        Parameters
        ----------
        depth : array (H, W)
            Coarse (or medium) depth, any size.
        mask : bool array (H, W), optional
            Face pixels (default: finite depth); depth must be finite there.
        image : array (H, W, 3), optional
            The aligned photo (uint8 or float in [0, 1]; linear RGB is best); required by DCE+RGB
            refiners.
        safeguard : bool
            With a photo, keep the network's change only where and if it lowers the photometric
            residual of a least-squares SH lighting fit (:func:`photometric_safeguard`; not in the
            paper); :attr:`last_safeguard` records the decision. Without a photo it is not run.

        Returns
        -------
        ndarray (H, W)
            Refined depth: the input plus the network's change, NaN outside the mask.

        Notes
        -----
        The face is cropped to its mask's box, resampled to the network's resolution and
        normalised per face (:func:`geomfit.learned.refiner_data.encode_depth`); the generator's
        depth channel minus its input is resampled back and added to the full-resolution input,
        so detail finer than the network's grid is kept (Galteri et al., CVIU 2019, Secs. 3.2, 4).
        """
        if self.needs_image and image is None:
            raise ValueError(f"this refiner ({self.config}) needs the photo: pass image=(H, W, 3)")
        d = np.asarray(depth, dtype=np.float64)
        x, mnet, frame = encode_depth(d, mask, image if self.needs_image else None, self.encode_resolution)
        if self.encode_resolution != self.resolution:  # as RefinerPairs.downsample did for training
            from .refiner_data import pool

            k = self.encode_resolution // self.resolution
            x, mnet = pool(x, k).astype(np.float32), pool(mnet.astype(np.float32), k) > 0.999
        m = np.isfinite(d) if mask is None else np.asarray(mask, dtype=bool)
        idx, _ = CONFIGS[self.config]
        with torch.no_grad():
            xt = torch.from_numpy(x[list(idx)][None]).to(self.device)
            out = self.G(xt)[0, 0].cpu().numpy().astype(np.float64)
        delta = decode_depth_delta(out - x[0], mnet, frame, d.shape)
        refined = np.where(m, d + delta, np.nan)
        self.last_safeguard = None
        if safeguard and image is not None:
            refined, self.last_safeguard = photometric_safeguard(d, refined, m, image)
        return refined
