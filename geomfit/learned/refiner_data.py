"""Training pairs for the depth refiner: encoding, synthetic pairs, user pairs (NumPy only, no torch).

The refiner of Galteri et al. ("Coarse-to-fine 3D face reconstruction", CVPR-W 2019; "Deep 3D
morphable model refinement via progressive growing of conditional Generative Adversarial
Networks", CVIU 185, 2019) translates an image encoding of a coarse 3DMM reconstruction into the
encoding of the detailed ground truth. This module holds everything about those images:

* :func:`encode_depth` -- the crop / resample / per-face normalisation of a depth map (+ photo) into
  the network's input channels (depth, mean curvature, elevation, optional RGB; CVIU Sec. 3.2),
  and :func:`encode_target` for a ground-truth depth in the same frame;
* :func:`make_synthetic_pairs` -- pairs generated on this machine: Surrey-model shapes plus
  procedural skin detail as ground truth, geomfit's own landmark fit from noisy landmarks as the
  coarse input, a shaded textured rendering as the RGB input;
* :func:`load_pairs` -- a user's own pairs (folders of depth maps or meshes).

Conventions: depth in pixel units, larger = closer (geomfit's), NaN or ``mask == False`` outside
the face. Network images are ``[-1, 1]`` (the papers scale to [0, 255] and then to [-1, 1]).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np

__all__ = ["CONFIGS", "encode_depth", "encode_target", "decode_depth_delta", "depth_channels",
           "make_synthetic_pairs", "load_pairs", "RefinerPairs", "calibrate_detail"]

#: Input configuration -> (input channel indices into the stored 6 channels, output channels).
#: Stored channels: 0 depth, 1 mean curvature, 2 elevation, 3-5 RGB. Outputs are the geometry
#: channels (D: depth only; DCE: depth, curvature, elevation), as in CVIU Table 3.
CONFIGS: Dict[str, Tuple[Tuple[int, ...], int]] = {
    "D": ((0,), 1),
    "DCE": ((0, 1, 2), 3),
    "DCE+RGB": ((0, 1, 2, 3, 4, 5), 3),
}

#: Margin of the depth normalisation: the coarse face's [min, max] depth maps to
#: [-1 + 2 m / (1 + 2 m), 1 - 2 m / (1 + 2 m)], leaving room for refined depth beyond it; -1 is background.
DEPTH_MARGIN = 0.1
#: Dimensionless curvature ``H * R`` (R = network resolution) mapped to +-1 (clipped).
CURVATURE_SCALE = 16.0
#: Margin around the mask's bounding box when cropping (fraction of the box side, each side).
CROP_MARGIN = 0.06


def check_config(config: str) -> str:
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
    return config


# ------------------------------------------------------------------------------------------------
# depth-map geometry (vectorised over a leading batch axis)
# ------------------------------------------------------------------------------------------------
def _deriv(d, axis):
    """Central differences along ``axis`` (-1 columns, -2 rows), one-sided next to NaN, 0 if isolated."""
    n = d.shape[axis]
    pad = [(0, 0)] * d.ndim
    pad[axis] = (1, 1)
    p = np.pad(d, pad, constant_values=np.nan)
    fwd = np.take(p, np.arange(2, n + 2), axis=axis) - d
    bwd = d - np.take(p, np.arange(0, n), axis=axis)
    fok, bok = np.isfinite(fwd), np.isfinite(bwd)
    return np.where(fok & bok, 0.5 * (fwd + bwd), np.where(fok, fwd, np.where(bok, bwd, 0.0)))


def depth_channels(depth):
    """Mean curvature and elevation of depth maps (..., H, W) in pixel units, NaN outside the face.

    Returns
    -------
    H : array (..., H, W)
        Mean curvature ``-div(grad d / sqrt(1 + |grad d|^2)) / 2`` (1 / pixel), positive on parts
        bulging towards the viewer (the sign of :func:`geomfit.mesh.mean_curvature` with outward
        normals); 0 outside.
    theta : array (..., H, W)
        Elevation: polar angle ``arccos(n_z)`` of the normal from the viewing axis (radians).

    Notes
    -----
    The papers compute both per mesh vertex (curvature after Cohen-Steiner & Morvan 2003) and
    project them; :class:`geomfit.learned.Refiner` only sees depth maps, so here they are computed
    on the depth map with finite differences, identically for training and inference.
    """
    d = np.asarray(depth, dtype=np.float64)
    gx, gy = _deriv(d, -1), _deriv(d, -2)
    norm = np.sqrt(1.0 + gx * gx + gy * gy)
    nz = 1.0 / norm
    theta = np.arccos(np.clip(nz, -1.0, 1.0))
    fx = np.where(np.isfinite(d), gx / norm, np.nan)
    fy = np.where(np.isfinite(d), gy / norm, np.nan)
    div = _deriv(fx, -1) + _deriv(fy, -2)
    H = np.where(np.isfinite(d), -0.5 * div, 0.0)
    return H, np.where(np.isfinite(d), theta, 0.0)


# ------------------------------------------------------------------------------------------------
# crop / resample / normalise
# ------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    """Where a face's network image lies in the original image and how depth was normalised."""

    r0: int
    c0: int
    side: int
    resolution: int
    lo: float  # depth (network pixel units) mapped to -1
    span: float  # depth range mapped to [-1, 1]

    @property
    def zoom(self) -> float:
        """Network pixels per original pixel."""
        return self.resolution / self.side


def _box(mask, margin=CROP_MARGIN):
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    h = rows[-1] + 1 - rows[0]
    w = cols[-1] + 1 - cols[0]
    side = int(np.ceil(max(h, w) * (1 + 2 * margin))) + 2
    r0 = int(np.floor((rows[0] + rows[-1] + 1) / 2 - side / 2))
    c0 = int(np.floor((cols[0] + cols[-1] + 1) / 2 - side / 2))
    return r0, c0, side


def _crop(a, r0, c0, side, fill):
    """Square crop ``a[r0:r0+side, c0:c0+side]`` padded with ``fill`` where it leaves the image."""
    H, W = a.shape[:2]
    out = np.full((side, side) + a.shape[2:], fill, dtype=np.float64)
    rs, re = max(r0, 0), min(r0 + side, H)
    cs, ce = max(c0, 0), min(c0 + side, W)
    if rs < re and cs < ce:
        out[rs - r0:re - r0, cs - c0:ce - c0] = a[rs:re, cs:ce]
    return out


def _resize(a, size):
    import cv2

    interp = cv2.INTER_AREA if a.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(a, dtype=np.float32), (size, size), interpolation=interp).astype(np.float64)


def _resample_depth(depth, mask, frame: Frame):
    """Masked resample of a depth crop to the network grid; depth rescaled to network pixels."""
    R = frame.resolution
    d = _crop(np.where(mask, depth, 0.0), frame.r0, frame.c0, frame.side, 0.0)
    m = _crop(mask.astype(np.float64), frame.r0, frame.c0, frame.side, 0.0)
    ds, ms = _resize(d, R), _resize(m, R)
    m_net = ms > 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        d_net = np.where(m_net, ds / np.maximum(ms, 1e-12), np.nan) * frame.zoom
    return d_net, m_net


def _validate(depth, mask, image):
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must have shape (H, W), got {d.shape}")
    if mask is None:
        m = np.isfinite(d)
    else:
        m = np.asarray(mask)
        if m.shape != d.shape:
            raise ValueError(f"mask has shape {m.shape} but depth has {d.shape}")
        m = m.astype(bool)
        if bool((m & ~np.isfinite(d)).any()):
            raise ValueError("depth is NaN or infinite inside the mask")
    if m.sum() < 16:
        raise ValueError(f"the mask covers {int(m.sum())} pixels with finite depth; need at least 16")
    img = None
    if image is not None:
        from ..photo import as_float_rgb

        img = as_float_rgb(image)
        if img.shape[:2] != d.shape:
            raise ValueError(f"image has size {img.shape[:2]} but depth has {d.shape}")
    return d, m, img


def encode_depth(depth, mask=None, image=None, resolution: int = 64):
    """Encode a (coarse) depth map and optional photo as the refiner's 6-channel input image.

    Parameters
    ----------
    depth : array (H, W)
        Depth in pixel units, larger = closer; NaN outside the face.
    mask : bool array (H, W), optional
        Face pixels (default: finite depth). Depth must be finite inside.
    image : array (H, W, 3), optional
        The photo aligned with ``depth`` (uint8 or float in [0, 1]); zeros (-1 after scaling) when
        absent.
    resolution : int
        Network resolution R (a power of two).

    Returns
    -------
    x : float32 array (6, R, R)
        Depth, mean curvature, elevation, R, G, B, each in [-1, 1]; -1 outside the face.
    mask_net : bool array (R, R)
    frame : Frame
        Crop box and normalisation, for :func:`encode_target` and :func:`decode_depth_delta`.

    Notes
    -----
    Galteri et al. (CVIU 2019, Sec. 3.2 and 5.4) render each face to a fixed-size image and scale
    every channel to [0, 255], then to [-1, 1] for training. Here the face is cropped to a square
    around its mask (margin ``CROP_MARGIN``), resampled to R x R (area filter, mask-aware), depth is
    rescaled to network pixels and normalised per face: the coarse face's depth range
    ``[lo, hi]`` widened by ``DEPTH_MARGIN`` on each side maps to [-1, 1]; elevation
    ``theta`` in [0, pi/2] maps linearly to [-1, 1]; mean curvature times R is divided by
    ``CURVATURE_SCALE`` and clipped.
    """
    d, m, img = _validate(depth, mask, image)
    R = int(resolution)
    if R < 4 or R & (R - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    r0, c0, side = _box(m)
    frame = Frame(r0, c0, side, R, 0.0, 1.0)
    d_net, m_net = _resample_depth(d, m, frame)
    if m_net.sum() < 4:
        raise ValueError("the face is too small to encode at this resolution")
    lo, hi = float(np.nanmin(d_net[m_net])), float(np.nanmax(d_net[m_net]))
    span = max(hi - lo, 1e-3)
    frame.lo = lo - DEPTH_MARGIN * span
    frame.span = span * (1 + 2 * DEPTH_MARGIN)
    x = np.full((6, R, R), -1.0)
    x[:3] = _geometry_channels(d_net, m_net, frame)
    if img is not None:
        rgb = _resize(_crop(img, r0, c0, side, 0.0), R)
        x[3:] = np.where(m_net[None], np.moveaxis(rgb, -1, 0) * 2.0 - 1.0, -1.0)
    return x.astype(np.float32), m_net, frame


def _geometry_channels(d_net, m_net, frame: Frame):
    R = frame.resolution
    dd = np.where(m_net, d_net, np.nan)
    H, theta = depth_channels(dd)
    out = np.full((3, R, R), -1.0)
    out[0] = np.where(m_net, 2.0 * (dd - frame.lo) / frame.span - 1.0, -1.0)
    out[1] = np.where(m_net, np.clip(H * R / CURVATURE_SCALE, -1.0, 1.0), -1.0)
    out[2] = np.where(m_net, np.clip(theta / (np.pi / 2) * 2.0 - 1.0, -1.0, 1.0), -1.0)
    return out


def encode_target(gt_depth, frame: Frame, mask_net, coarse_x=None):
    """Encode a ground-truth depth map (same image frame as the coarse one) for training.

    The target is defined on the coarse face's network mask ``mask_net`` (the refiner changes
    depth, not the silhouette): where the ground truth has no surface inside it, the coarse depth
    is kept (``coarse_x`` channel 0). Returns (3, R, R) float32: depth, curvature, elevation.
    """
    g = np.asarray(gt_depth, dtype=np.float64)
    gm = np.isfinite(g)
    d_net, m_gt = _resample_depth(g, gm, frame)
    both = mask_net & m_gt
    dn = np.where(both, d_net, np.nan)
    if coarse_x is not None:
        coarse_d = (coarse_x[0].astype(np.float64) + 1.0) / 2.0 * frame.span + frame.lo
        dn = np.where(mask_net & ~m_gt, coarse_d, dn)
    dn = np.where(mask_net, dn, np.nan)
    return _geometry_channels(dn, mask_net & np.isfinite(dn), frame).astype(np.float32)


def decode_depth_delta(delta_norm, mask_net, frame: Frame, shape):
    """Map a change of the normalised depth channel back to an (H, W) change in original pixels.

    The change is resampled bilinearly from R x R to the crop, multiplied back from network to
    original pixel units; outside ``mask_net`` it is 0 (the refined depth fades into the input at
    the silhouette).
    """
    import cv2

    dl = np.where(mask_net, np.asarray(delta_norm, dtype=np.float64) * frame.span / 2.0, 0.0) / frame.zoom
    up = cv2.resize(dl.astype(np.float32), (frame.side, frame.side), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    H, W = shape
    out = np.zeros((H, W))
    rs, re = max(frame.r0, 0), min(frame.r0 + frame.side, H)
    cs, ce = max(frame.c0, 0), min(frame.c0 + frame.side, W)
    if rs < re and cs < ce:
        out[rs:re, cs:ce] = up[rs - frame.r0:re - frame.r0, cs - frame.c0:ce - frame.c0]
    return out


def pool(a, k: int):
    """Mean over k x k blocks of the last two axes."""
    a = np.asarray(a)
    if k == 1:
        return a
    *lead, H, W = a.shape
    return a.reshape(*lead, H // k, k, W // k, k).astype(np.float32).mean(axis=(-3, -1))


# ------------------------------------------------------------------------------------------------
# the dataset container
# ------------------------------------------------------------------------------------------------
@dataclass
class RefinerPairs:
    """Encoded training pairs at one resolution.

    Attributes
    ----------
    x : float16/float32 array (N, 6, R, R)
        Inputs: depth, curvature, elevation, RGB in [-1, 1] (a config picks channels, :data:`CONFIGS`).
    y : array (N, 3, R, R)
        Targets: depth, curvature, elevation of the ground truth, same normalisation as ``x``.
    mask : bool array (N, R, R)
    mm_per_unit : array (N,)
        Millimetres per unit of the normalised depth channel (for MAE in mm); NaN when unknown.
    meta : dict
        How the pairs were made (generator, seed, calibration numbers).
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    mm_per_unit: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.x)
        if self.x.ndim != 4 or self.x.shape[1] != 6:
            raise ValueError(f"x must have shape (N, 6, R, R), got {self.x.shape}")
        R = self.x.shape[-1]
        if self.y.shape != (n, 3, R, R) or self.mask.shape != (n, R, R) or self.mm_per_unit.shape != (n,):
            raise ValueError(f"inconsistent pair arrays: x {self.x.shape}, y {self.y.shape}, mask {self.mask.shape}, "
                             f"mm_per_unit {self.mm_per_unit.shape}")

    def __len__(self):
        return len(self.x)

    @property
    def resolution(self) -> int:
        return int(self.x.shape[-1])

    def downsample(self, resolution: int) -> "RefinerPairs":
        """Area-downsample to a lower power-of-two resolution (what :class:`Refiner` does at inference
        when its network resolution is below the encoding resolution); the mask keeps pixels whose
        every sub-pixel is on the face."""
        R, r = self.resolution, int(resolution)
        if r == R:
            return self
        if r > R or R % r or r & (r - 1):
            raise ValueError(f"cannot downsample {R}x{R} pairs to {r}x{r}")
        meta = dict(self.meta, encode_resolution=self.meta.get("encode_resolution", R), resolution=r)
        return RefinerPairs(pool(self.x, R // r).astype(self.x.dtype), pool(self.y, R // r).astype(self.y.dtype),
                            pool(self.mask.astype(np.float32), R // r) > 0.999, self.mm_per_unit.copy(), meta)

    def subset(self, idx) -> "RefinerPairs":
        return RefinerPairs(self.x[idx], self.y[idx], self.mask[idx], self.mm_per_unit[idx], dict(self.meta))

    def split(self, held_out: float = 0.1, seed: int = 0):
        """(train, test) split by sample (synthetic pairs are independent identities)."""
        if not 0 < held_out < 1:
            raise ValueError(f"held_out must be in (0, 1), got {held_out}")
        n = len(self)
        n_test = max(1, int(round(n * held_out)))
        if n - n_test < 1:
            raise ValueError(f"{n} pairs are too few to hold {n_test} out")
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))

    def save(self, path):
        import json

        from .. import atomic

        with atomic.atomic_open(path, "wb") as f:
            np.savez(f, x=self.x.astype(np.float16), y=self.y.astype(np.float16), mask=self.mask,
                     mm_per_unit=self.mm_per_unit, meta=np.array(json.dumps(self.meta)))
        return pathlib.Path(path)

    @classmethod
    def load(cls, path) -> "RefinerPairs":
        import json

        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"pairs file not found: {p}")
        try:
            z = np.load(p, allow_pickle=False)
            return cls(z["x"], z["y"], z["mask"].astype(bool), z["mm_per_unit"].astype(np.float64),
                       json.loads(str(z["meta"])))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{p} is not a refiner pairs file ({e})") from e


# ------------------------------------------------------------------------------------------------
# procedural skin detail, in anatomical coordinates (mm on the mean face)
# ------------------------------------------------------------------------------------------------
#: Amplitudes (mm) of the procedural detail; see :func:`calibrate_detail` and docs/learned.md.
DETAIL_MM = {"forehead": 0.6, "crows_feet": 0.4, "nasolabial": 1.5, "undulation": 0.35, "pores": 0.05}


def _fourier_noise(rng, B, px, py, n, wavelength_mm, amp):
    """Band-limited noise: ``amp * sqrt(2/n) sum_k sin(k_k . p + phi_k)`` with |k| = 2 pi / wavelength."""
    ang = rng.uniform(0, 2 * np.pi, (B, n))
    lam = rng.uniform(0.7, 1.4, (B, n)) * wavelength_mm
    kx, ky = np.cos(ang) * 2 * np.pi / lam, np.sin(ang) * 2 * np.pi / lam
    ph = rng.uniform(0, 2 * np.pi, (B, n))
    out = np.zeros(px.shape)
    for k in range(n):  # n terms (a few dozen), each vectorised over all pixels of all samples
        out += np.sin(kx[:, k, None, None] * px + ky[:, k, None, None] * py + ph[:, k, None, None])
    return out * amp * np.sqrt(2.0 / n)


def _grooves(dist, width):
    return np.exp(-0.5 * (dist / width) ** 2)


def procedural_detail(px, py, anchors, rng, scale=1.0):
    """Skin detail (mm, positive = towards the viewer) at anatomical coordinates ``(px, py)`` (B, H, W).

    Forehead wrinkles (horizontal grooves above the brows), crow's feet (grooves radiating from the
    outer eye corners), nasolabial folds (a groove from the nose wing to beside the mouth corner),
    mid-frequency undulation (5-15 mm) and pore-scale noise (0.5-1 mm); each feature's strength is
    drawn per face (age-like variation), times ``DETAIL_MM`` and ``scale``.
    """
    B = px.shape[0]
    a = anchors
    s = lambda lo, hi: rng.uniform(lo, hi, (B, 1, 1))  # noqa: E731
    out = np.zeros(px.shape)
    # forehead: 3-5 grooves, 7-12 mm apart, starting 8-14 mm above the brows, slightly wavy
    brow = a["brow_y"]
    spacing, start = s(7, 12), s(8, 14)
    wob = s(1, 3) * np.sin(px * 2 * np.pi / s(40, 90) + s(0, 6.3))
    yy = py - brow - start + wob
    k = np.round(yy / spacing)
    dist = yy - k * spacing
    env = (k >= 0) & (k <= 4) & (np.abs(px) < 55)
    env = env * np.clip((55 - np.abs(px)) / 15, 0, 1)
    out -= DETAIL_MM["forehead"] * s(0, 2) * _grooves(dist, s(0.8, 1.5)) * env
    # crow's feet: 3-5 grooves within +-35 degrees of the outward horizontal, 4-22 mm from the corner
    for side in (-1.0, 1.0):
        cx, cy = a["eye_outer_x"] * side, a["eye_y"]
        dx, dy = (px - cx) * side, py - cy
        r = np.hypot(dx, dy)
        th = np.arctan2(dy, dx)
        step = np.deg2rad(s(12, 20))
        kk = np.round(th / step)
        dth = (th - kk * step) * r
        env = ((np.abs(th) < np.deg2rad(38)) & (dx > 0)) * np.clip((r - 4) / 4, 0, 1) * np.clip((22 - r) / 6, 0, 1)
        out -= DETAIL_MM["crows_feet"] * s(0, 2) * _grooves(dth, 0.8) * env
        # nasolabial fold: groove along the segment nose wing -> beside the mouth corner
        p0 = np.array([a["nose_wing_x"] * side, a["nose_wing_y"]])
        p1 = np.array([(a["mouth_x"] + 6) * side, a["mouth_y"] - 8])
        v = p1 - p0
        t = np.clip(((px - p0[0]) * v[0] + (py - p0[1]) * v[1]) / (v @ v), 0, 1)
        dist = np.hypot(px - p0[0] - t * v[0], py - p0[1] - t * v[1])
        env = np.sin(np.pi * t) ** 0.5
        out -= DETAIL_MM["nasolabial"] * s(0, 2) * _grooves(dist, s(1.5, 3.0)) * env
    out += _fourier_noise(rng, B, px, py, 16, 9.0, DETAIL_MM["undulation"]) * s(0.5, 1.5)
    out += _fourier_noise(rng, B, px, py, 24, 0.8, DETAIL_MM["pores"]) * s(0.5, 1.5)
    return out * scale


def _anchors(model):
    """Anatomical anchor coordinates (mm) on the model's mean shape from its iBUG landmark vertices."""
    mean = np.asarray(model.mean, dtype=np.float64)
    L = {k: mean[v] for k, v in model.landmarks.items()}
    need = (20, 25, 37, 40, 43, 46, 32, 36, 49, 55, 34)
    missing = [k for k in need if k not in L]
    if missing:
        raise ValueError(f"the model's landmark mapping lacks iBUG points {missing} (needed for skin detail)")
    return {
        "brow_y": (L[20][1] + L[25][1]) / 2,
        "eye_y": (L[37][1] + L[46][1]) / 2,
        "eye_outer_x": (abs(L[37][0]) + abs(L[46][0])) / 2,
        "nose_wing_x": (abs(L[32][0]) + abs(L[36][0])) / 2 + 4,
        "nose_wing_y": (L[32][1] + L[36][1]) / 2 + 2,
        "mouth_x": (abs(L[49][0]) + abs(L[55][0])) / 2,
        "mouth_y": (L[49][1] + L[55][1]) / 2,
    }


def _albedo(px, py, anchors, rng):
    """Procedural skin albedo (B, H, W, 3) in [0, 1] at anatomical coordinates (mm)."""
    B = px.shape[0]
    s = lambda lo, hi, n=1: rng.uniform(lo, hi, (B, 1, 1, n))  # noqa: E731
    base = s(0.35, 0.85) * np.array([1.0, 0.78, 0.66]) * s(0.9, 1.1, 3)
    low = _fourier_noise(rng, B, px, py, 12, 30.0, 0.05)[..., None]
    spots = np.clip(_fourier_noise(rng, B, px, py, 24, 3.0, 1.0), 1.2, None)[..., None] - 1.2
    a = anchors
    brows = np.exp(-0.5 * ((py - a["brow_y"] - 1) / 3.0) ** 2) * np.clip((a["eye_outer_x"] + 8 - np.abs(px)) / 6, 0, 1) \
        * (np.abs(px) > 8)
    lips = np.exp(-0.5 * ((py - a["mouth_y"]) / 4.0) ** 2) * np.clip((a["mouth_x"] + 2 - np.abs(px)) / 5, 0, 1)
    alb = base * (1 + low) - 0.25 * spots * base
    alb = alb * (1 - 0.55 * s(0.3, 1.0) * brows[..., None]) + lips[..., None] * np.array([0.08, -0.06, -0.04])
    return np.clip(alb, 0.02, 1.0)


def _random_sh(rng, B):
    """Random irradiance SH (B, 9) in geomfit's order: ambient plus a directional lobe and small 2nd order."""
    sh = np.zeros((B, 9))
    sh[:, 0] = rng.uniform(0.7, 1.0, B) / 0.282095
    d = rng.normal(size=(B, 3))
    d[:, 2] = np.abs(d[:, 2]) + 0.5  # light from the camera's side
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    strength = rng.uniform(0.2, 0.6, B) / 0.488603
    sh[:, 1], sh[:, 2], sh[:, 3] = d[:, 1] * strength, d[:, 2] * strength, d[:, 0] * strength
    sh[:, 4:] = rng.normal(0, 0.05, (B, 5))
    return sh


# ------------------------------------------------------------------------------------------------
# synthetic pairs
# ------------------------------------------------------------------------------------------------
def _landmark_targets(model, V):
    """(B, 68, 3) ground-truth landmark positions: fixed vertices, jaw from the contour candidates."""
    B = V.shape[0]
    out = np.full((B, 68, 3), np.nan)
    for k, v in model.landmarks.items():
        out[:, int(k) - 1] = V[:, int(v)]
    right, left = model.contours.get("right", []), model.contours.get("left", [])
    if len(right) >= 8 and len(left) >= 8:
        ri = np.round(np.linspace(0, len(right) - 1, 8)).astype(int)
        li = np.round(np.linspace(0, len(left) - 1, 8)).astype(int)
        out[:, 0:8] = V[:, np.asarray(right)[ri]]
        out[:, 9:17] = V[:, np.asarray(left)[li]]
    return out


def make_synthetic_pairs(n: int, resolution: int = 64, *, model="sfm", seed: int = 0, render_scale: int = 2,
                         landmark_noise: float = 0.03, detail_scale: float = 1.0, max_yaw_deg: float = 30.0,
                         blurred_fraction: float = 0.0, blur_px=(0.5, 2.0),
                         chunk: int = 64, progress=None) -> RefinerPairs:
    """Generate coarse/ground-truth training pairs for the refiner on this machine.

    Parameters
    ----------
    n : int
        Number of pairs.
    resolution : int
        Network resolution R of the encoded pairs (faces are rendered at ``render_scale * R`` and
        area-resampled).
    model : str, path or MorphableModel
        The morphable model (``"sfm"``: the Surrey Face Model).
    seed : int
    landmark_noise : float
        Standard deviation of the 2D landmark noise as a fraction of the inter-ocular distance
        (outer eye corners); detectors err by 3-4 % of it.
    detail_scale : float
        Multiplies the procedural detail amplitudes (``DETAIL_MM``).
    max_yaw_deg : float
        Yaw is uniform in +-max_yaw, pitch in +-max_yaw/2, roll in +-max_yaw/3 (the papers augment
        with +-45/+-20/+-20 degrees).
    blurred_fraction : float
        Fraction of the pairs (drawn at random) whose coarse input is the ground truth itself,
        Gaussian-blurred by ``blur_px`` (uniform range, pixels of the ``render_scale * R`` render)
        instead of the landmark fit: an input whose shape is already right, where the refiner should
        only restore detail. Not in Galteri et al.; it teaches "do no harm" on inputs such as a
        smoothed real scan or a shape-from-shading result.
    blur_px : (float, float)
        Range of the blur's standard deviation.
    chunk : int
        Faces fitted and rendered per batch.

    Returns
    -------
    RefinerPairs

    Notes
    -----
    Ground truth: a shape drawn from the model (identity ~ N(0, 0.8^2 I), one or two expressions
    at random strength) plus :func:`procedural_detail` displaced along the viewing direction
    (faded towards the silhouette). Coarse input: :func:`geomfit.fitting.fit_landmarks` on that
    face's projected landmarks plus Gaussian noise, rendered with the fitted camera (what the
    pipeline does with a photo). RGB input: the ground truth shaded with a random SH light
    (:func:`geomfit.sh.shade`) times a procedural skin albedo, plus noise. The unobservable depth
    offset of orthographic projection is removed by shifting the ground truth to the coarse depth's
    median over their common pixels. This replaces the FRGC scans of Galteri et al. (CVIU 2019,
    Sec. 5.1), which cannot be downloaded here.
    """
    from ..camera import ScaledOrthographic, euler_to_matrix
    from ..data import resolve_model
    from ..fitting import fit_landmarks
    from ..render import depth_normals, interpolate, rasterize
    from ..sh import shade

    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= float(blurred_fraction) <= 1.0:
        raise ValueError(f"blurred_fraction must be in [0, 1], got {blurred_fraction}")
    blur_lo, blur_hi = (float(v) for v in blur_px)
    if not 0.0 < blur_lo <= blur_hi:
        raise ValueError(f"blur_px must be a range 0 < lo <= hi, got {blur_px}")
    mdl = resolve_model(model)
    anchors = _anchors(mdl)
    rng = np.random.default_rng(seed)
    R = int(resolution)
    S = int(render_scale) * R
    faces = np.asarray(mdl.faces, dtype=np.int64)
    mean = np.asarray(mdl.mean, dtype=np.float64)
    xs, ys, ms, mm = [], [], [], []
    done = 0
    while done < n:
        B = min(chunk, n - done)
        idc = rng.normal(0, 0.8, (B, mdl.n_id))
        exc = np.zeros((B, mdl.n_exp))
        if mdl.n_exp:
            for j in range(2):  # up to two active expressions
                pick = rng.integers(0, mdl.n_exp, B)
                exc[np.arange(B), pick] += rng.uniform(0, 0.8, B) * (rng.random(B) < (0.7 if j == 0 else 0.3))
        V = np.asarray(mdl.shape(idc, exc), dtype=np.float64)
        yaw = np.deg2rad(rng.uniform(-1, 1, B) * max_yaw_deg)
        pitch = np.deg2rad(rng.uniform(-1, 1, B) * max_yaw_deg / 2)
        roll = np.deg2rad(rng.uniform(-1, 1, B) * max_yaw_deg / 3)
        Rm = np.asarray(euler_to_matrix(yaw, pitch, roll))
        width = np.ptp(V[..., 0], axis=1)
        scale = 0.8 * S / width * rng.uniform(0.9, 1.05, B)
        RV = np.einsum("bij,bnj->bni", Rm, V)
        ctr = 0.5 * (RV.min(1) + RV.max(1))
        t = S / 2 - scale[:, None] * ctr[:, :2] + rng.normal(0, 0.02 * S, (B, 2))
        L3 = _landmark_targets(mdl, V)
        L2 = np.stack([scale[:, None] * np.einsum("bij,bnj->bni", Rm, L3)[..., 0] + t[:, None, 0],
                       S - (scale[:, None] * np.einsum("bij,bnj->bni", Rm, L3)[..., 1] + t[:, None, 1])], -1)
        iod = np.linalg.norm(L2[:, 36] - L2[:, 45], axis=1)
        L2 = L2 + rng.normal(size=L2.shape) * (landmark_noise * iod)[:, None, None]
        L2 = np.clip(L2, 0, S - 1e-3)
        fit = fit_landmarks(mdl, L2, image_size=np.tile([S, S], (B, 1)).astype(np.float64))
        Vc = np.asarray(fit.vertices)
        gt_d = np.full((B, S, S), np.nan)
        px = np.zeros((B, S, S))
        py = np.zeros((B, S, S))
        nz = np.zeros((B, S, S))
        co_d = np.full((B, S, S), np.nan)
        for b in range(B):  # one rasterizer kernel call per face
            cam = ScaledOrthographic(scale[b], Rm[b], t[b])
            ras = rasterize(cam.to_screen(V[b], S), faces, S, S)
            gt_d[b] = ras.depth
            anat = interpolate(ras, mean[:, :2])
            px[b], py[b] = anat[..., 0], anat[..., 1]
            camc = ScaledOrthographic(float(np.asarray(fit.scale)[b]), np.asarray(fit.rotation)[b],
                                      np.asarray(fit.translation)[b])
            co_d[b] = rasterize(camc.to_screen(Vc[b], S), faces, S, S).depth
        n0 = np.stack([np.asarray(depth_normals(gt_d[b]))[..., 2] for b in range(B)])
        nz = np.nan_to_num(n0, nan=0.0)
        detail = procedural_detail(px, py, anchors, rng, scale=detail_scale)
        fade = np.clip((nz - 0.2) / 0.3, 0, 1)
        gt_d = gt_d + detail * scale[:, None, None] * fade
        nrm = np.stack([np.asarray(depth_normals(gt_d[b])) for b in range(B)])
        sh = _random_sh(rng, B)
        shading = np.einsum("bhwk,bk->bhw", np.asarray(_sh_basis(nrm)), sh)
        alb = _albedo(px, py, anchors, rng)
        img = np.clip(alb * np.clip(shading, 0, None)[..., None] + rng.normal(0, 0.01, alb.shape), 0, 1)
        img = np.where(np.isfinite(gt_d)[..., None], img, 0.0)
        if blurred_fraction > 0:  # (no draws otherwise: the pairs of a given seed stay reproducible)
            blurred = rng.random(B) < blurred_fraction
            sig = rng.uniform(blur_lo, blur_hi, B)
            for b in np.flatnonzero(blurred):
                co_d[b] = _masked_blur(gt_d[b], sig[b])
        for b in range(B):
            cm = np.isfinite(co_d[b])
            if cm.sum() < 64:
                continue
            both = cm & np.isfinite(gt_d[b])
            off = np.median(co_d[b][both] - gt_d[b][both]) if both.any() else 0.0
            x, mnet, frame = encode_depth(co_d[b], cm, img[b], R)
            y = encode_target(gt_d[b] + off, frame, mnet, coarse_x=x)
            xs.append(x)
            ys.append(y)
            ms.append(mnet)
            mm.append(frame.span / 2.0 / frame.zoom / scale[b])
        done += B
        if progress is not None:
            progress(done, n)
    meta = {"generator": "geomfit.learned.refiner_data.make_synthetic_pairs", "n": int(n), "resolution": R,
            "seed": int(seed), "render_scale": int(render_scale), "landmark_noise": landmark_noise,
            "detail_scale": detail_scale, "detail_mm": DETAIL_MM, "max_yaw_deg": max_yaw_deg,
            "blurred_fraction": float(blurred_fraction), "blur_px": [blur_lo, blur_hi],
            "model": _model_label(getattr(mdl, "name", str(model)))}
    return RefinerPairs(np.stack(xs).astype(np.float16), np.stack(ys).astype(np.float16), np.stack(ms),
                        np.asarray(mm, dtype=np.float64), meta)


def _model_label(name) -> str:
    """The model's file name without its folder: pair metadata (and the checkpoints that carry it) must
    not record a path on the machine that made them."""
    import pathlib

    return pathlib.PurePath(str(name)).name or str(name)


def _masked_blur(depth, sigma):
    """Gaussian blur (standard deviation ``sigma`` px) of a depth map over its finite pixels only
    (normalised convolution: the silhouette does not pull depth towards the background)."""
    import cv2

    m = np.isfinite(depth)
    k = int(2 * np.ceil(3 * sigma) + 1)
    num = cv2.GaussianBlur(np.where(m, depth, 0.0), (k, k), sigma)
    den = cv2.GaussianBlur(m.astype(np.float64), (k, k), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m, num / np.maximum(den, 1e-9), np.nan)


def _sh_basis(normals):
    from ..sh import sh_basis

    n = np.nan_to_num(normals, nan=0.0)
    return sh_basis(n)


# ------------------------------------------------------------------------------------------------
# calibration against a real scan
# ------------------------------------------------------------------------------------------------
def high_frequency_amplitude(depth_mm, mm_per_px, sigmas_mm=(1.0, 2.0, 4.0), erode_px=3, region=None):
    """RMS and 95th percentile (mm) of ``depth - lowpass(depth)`` over the interior of a depth map.

    The low-pass is a mask-normalised Gaussian of standard deviation ``sigma`` mm; the face mask
    is eroded by ``erode_px + 3 sigma`` pixels so the silhouette does not count; ``region`` (bool,
    same shape) restricts the pixels measured further.
    """
    import cv2

    d = np.asarray(depth_mm, dtype=np.float64)
    m = np.isfinite(d)
    out = {}
    for sg in sigmas_mm:
        sp = sg / mm_per_px
        k = int(2 * np.ceil(3 * sp) + 1)
        num = cv2.GaussianBlur(np.where(m, d, 0.0), (k, k), sp)
        den = cv2.GaussianBlur(m.astype(np.float64), (k, k), sp)
        low = num / np.maximum(den, 1e-12)
        er = int(erode_px + np.ceil(3 * sp))
        inner = cv2.erode(m.astype(np.uint8), np.ones((2 * er + 1, 2 * er + 1), np.uint8)) > 0
        if region is not None:
            inner &= region
        r = (d - low)[inner]
        out[f"sigma_{sg:g}mm"] = {"rms_mm": float(np.sqrt(np.mean(r ** 2))),
                                  "p95_abs_mm": float(np.percentile(np.abs(r), 95)), "pixels": int(inner.sum())}
    return out


def calibrate_detail(scan_obj, ljson=None, model="sfm", mm_per_px: float = 0.5, seed: int = 0,
                     feature_radius_mm: float = 12.0):
    """Measure a real scan's high-frequency depth amplitude on skin and the synthetic ground truth's.

    The scan is mapped into the model's frame in millimetres by the least-squares similarity
    transform (Umeyama) of its 51 inner iBUG landmarks (``ljson``, menpo's format) onto the model
    mean's, rendered frontally at ``mm_per_px`` together with the model mean, and
    :func:`high_frequency_amplitude` is measured on "skin": pixels covered by both, farther than
    ``feature_radius_mm`` from every inner landmark (eyes, brows, nose, mouth are left out: they
    are shape, not skin detail). The same is measured on the mean shape with and without
    :func:`procedural_detail` (one random draw, unit ``detail_scale``). Returns a dict.
    """
    import trimesh

    from ..camera import ScaledOrthographic
    from ..data import resolve_model
    from ..render import interpolate, rasterize

    mdl = resolve_model(model)
    mean = np.asarray(mdl.mean, dtype=np.float64)
    m = trimesh.load(str(scan_obj), process=False, force="mesh")
    v = np.asarray(m.vertices, dtype=np.float64)
    f = np.asarray(m.faces, dtype=np.int64)
    if ljson is None:
        raise ValueError("calibrate_detail needs the scan's landmarks (ljson)")
    pts = np.asarray(_ljson_points(ljson), dtype=np.float64)
    nums = [k for k in sorted(mdl.landmarks) if k >= 18]
    lm = mean[[mdl.landmarks[k] for k in nums]]
    Rk, tk, sk = _similarity(pts[np.asarray(nums) - 1], lm)
    v = sk * v @ Rk.T + tk
    lo, hi = mean[:, :2].min(0) - 5, mean[:, :2].max(0) + 5
    S = int(np.ceil((hi - lo).max() / mm_per_px)) + 8
    cam = ScaledOrthographic(1.0 / mm_per_px, np.eye(3), -lo / mm_per_px + 4)
    ras_s = rasterize(cam.to_screen(v, S), f, S, S)
    ras_m = rasterize(cam.to_screen(mean, S), np.asarray(mdl.faces), S, S)
    ds, dm = np.asarray(ras_s.depth) * mm_per_px, np.asarray(ras_m.depth) * mm_per_px
    anat = interpolate(ras_m, mean[:, :2])
    # skin: covered by both, away from the inner landmarks
    uv = np.asarray(cam.project(lm, S))
    jj, ii = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5)
    dmin = np.min(np.hypot(jj[..., None] - uv[:, 0], ii[..., None] - uv[:, 1]), axis=-1) * mm_per_px
    skin = np.isfinite(ds) & np.isfinite(dm) & (dmin > feature_radius_mm)
    det = procedural_detail(anat[None, ..., 0], anat[None, ..., 1], _anchors(mdl), np.random.default_rng(seed))[0]
    res = {
        "scan": high_frequency_amplitude(ds, mm_per_px, region=skin),
        "model_mean": high_frequency_amplitude(dm, mm_per_px, region=skin),
        "model_mean+detail": high_frequency_amplitude(dm + det, mm_per_px, region=skin),
        "detail_alone_rms_mm_on_skin": float(np.sqrt(np.mean(det[skin] ** 2))),
        "scan_scale_mm_per_unit": float(sk),
        "mm_per_px": mm_per_px,
        "feature_radius_mm": feature_radius_mm,
    }
    return res


# ------------------------------------------------------------------------------------------------
# user pairs
# ------------------------------------------------------------------------------------------------
_DEPTH_EXT = (".npy", ".png", ".tif", ".tiff")
_MESH_EXT = (".obj", ".ply", ".off", ".stl")


def _read_depth_file(p: pathlib.Path):
    if p.suffix.lower() == ".npy":
        d = np.load(p).astype(np.float64)
    else:
        import cv2

        im = cv2.imdecode(np.fromfile(str(p), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if im is None:
            raise ValueError(f"cannot read depth image {p}")
        if im.ndim == 3:
            im = im[..., 0]
        d = im.astype(np.float64)
        d[im == 0] = np.nan  # PNG convention: 0 = no surface
    if d.ndim != 2:
        raise ValueError(f"{p}: depth must be 2-D, got shape {d.shape}")
    return d


def _render_mesh_pair(coarse_path, gt_path, size):
    import trimesh

    from ..camera import ScaledOrthographic
    from ..render import rasterize

    def load(p):
        m = trimesh.load(str(p), process=False, force="mesh")
        v, f = np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)
        if len(v) == 0 or len(f) == 0:
            raise ValueError(f"mesh {p} has no triangles")
        return v, f

    vg, fg = load(gt_path)
    vc, fc = load(coarse_path)
    lo, hi = vg[:, :2].min(0), vg[:, :2].max(0)
    s = 0.9 * size / max(float((hi - lo).max()), 1e-9)
    t = size / 2 - s * (lo + hi) / 2
    cam = ScaledOrthographic(s, np.eye(3), t)
    dg = rasterize(cam.to_screen(vg, size), fg, size, size).depth
    dc = rasterize(cam.to_screen(vc, size), fc, size, size).depth
    return np.asarray(dc), np.asarray(dg), 1.0 / s


def load_pairs(folder, resolution: int = 64, *, mesh_render_size: int = 256) -> RefinerPairs:
    """Load a user's own coarse / ground-truth pairs (e.g. FRGC or Bosphorus scans and 3DMM fits).

    Layout::

        folder/coarse/NAME.{npy,png,tif,obj,ply}   coarse reconstruction (depth map or mesh)
        folder/gt/NAME.{same kind}                 ground truth, same NAME
        folder/rgb/NAME.{png,jpg}                  optional photo / textured rendering (depth maps only)

    Depth maps: ``.npy`` float arrays in pixel units, larger = closer, NaN = no surface; 16-bit
    PNG/TIFF with 0 = no surface. Coarse and ground truth must be in the same image frame.
    Meshes: both in the same model frame, viewed along -z; they are rendered orthographically to
    ``mesh_render_size`` pixels with one camera fitted to the ground truth's x/y extent.

    Returns
    -------
    RefinerPairs
        Encoded at ``resolution``; ``mm_per_unit`` in model units (meshes) or NaN (depth maps).

    Raises
    ------
    ValueError
        Missing folders, no matching names, a pair of different kinds or sizes, unreadable files.
    """
    root = pathlib.Path(folder)
    cdir, gdir, rdir = root / "coarse", root / "gt", root / "rgb"
    if not cdir.is_dir() or not gdir.is_dir():
        raise ValueError(f"{root} must contain the folders coarse/ and gt/")
    ok_ext = _DEPTH_EXT + _MESH_EXT
    cmap = {p.stem: p for p in sorted(cdir.iterdir()) if p.suffix.lower() in ok_ext}
    gmap = {p.stem: p for p in sorted(gdir.iterdir()) if p.suffix.lower() in ok_ext}
    names = sorted(set(cmap) & set(gmap))
    if not names:
        raise ValueError(f"no file names appear in both {cdir} and {gdir} (extensions {ok_ext})")
    xs, ys, ms, mm = [], [], [], []
    for name in names:
        cp, gp = cmap[name], gmap[name]
        c_mesh, g_mesh = cp.suffix.lower() in _MESH_EXT, gp.suffix.lower() in _MESH_EXT
        if c_mesh != g_mesh:
            raise ValueError(f"pair {name!r}: one is a mesh and the other a depth map")
        img = None
        if c_mesh:
            dc, dg, unit = _render_mesh_pair(cp, gp, mesh_render_size)
        else:
            dc, dg, unit = _read_depth_file(cp), _read_depth_file(gp), np.nan
            if dc.shape != dg.shape:
                raise ValueError(f"pair {name!r}: coarse {dc.shape} and ground truth {dg.shape} differ in size")
            rp = [p for p in (rdir / f"{name}.png", rdir / f"{name}.jpg") if p.is_file()] if rdir.is_dir() else []
            if rp:
                from ..photo import load_photo

                img = load_photo(str(rp[0]))
                if img.shape[:2] != dc.shape:
                    raise ValueError(f"pair {name!r}: rgb {img.shape[:2]} and depth {dc.shape} differ in size")
        cm = np.isfinite(dc)
        if cm.sum() < 16:
            raise ValueError(f"pair {name!r}: the coarse depth has fewer than 16 valid pixels")
        x, mnet, frame = encode_depth(dc, cm, img, resolution)
        ys.append(encode_target(dg, frame, mnet, coarse_x=x))
        xs.append(x)
        ms.append(mnet)
        mm.append(frame.span / 2.0 / frame.zoom * unit)
    meta = {"generator": "geomfit.learned.refiner_data.load_pairs", "folder": str(root), "names": names,
            "resolution": int(resolution)}
    return RefinerPairs(np.stack(xs).astype(np.float16), np.stack(ys).astype(np.float16), np.stack(ms),
                        np.asarray(mm, dtype=np.float64), meta)


def _ljson_points(path):
    """68 landmark points of a menpo LJSON file (version 2 ``groups`` layout or version 1)."""
    import json

    with open(path) as fh:
        j = json.load(fh)
    if "groups" in j:
        grp = next(iter(j["groups"].values()))
        pts = grp["landmarks"]["points"]
    else:
        pts = j["landmarks"]["points"]
    if len(pts) != 68:
        raise ValueError(f"{path}: expected 68 landmarks, found {len(pts)}")
    return pts


def _similarity(src, dst):
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991); returns (R, t, s)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    U, S, Vt = np.linalg.svd(b.T @ a)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / (a ** 2).sum())
    return R, md - s * R @ ms, s
