"""Evaluation scenes with a known answer for the fine stage (and training data for learned refiners).

Every scene is a dict with the same keys:

``image`` (H, W, 3) linear RGB in [0, 1]; ``depth`` (H, W) the true depth (orthographic, pixel units,
larger = closer, NaN outside the rendered surface); ``depth_blur`` the input depth (the true depth
low-passed: what a medium-scale reconstruction knows); ``mask`` (H, W) bool, the face pixels;
``albedo`` (H, W, 3) the true albedo; ``sh`` (9, 3) the true light (geomfit's SH convention,
:mod:`geomfit.sh`); ``normals`` (H, W, 3) the true normals (:func:`geomfit.render.depth_normals` of
``depth``); ``name``; and, where known, ``landmarks`` (68, 2) iBUG ``(x, y)`` pixel positions,
``regions`` (H, W) int labels, ``noise`` (the sigma of the added Gaussian noise), ``occluder``
(H, W) bool (pixels whose colour is not skin).

Two families:

* :func:`synthetic_scene`: an ellipsoid with sinusoidal wrinkles and bumps under a piecewise-smooth
  blotchy albedo; noise-free by default; no data files needed.
* :func:`james_scene`: a real textured photogrammetry head scan ("james", BSD licence, in
  ``$GEOMFIT_DATA/scans/james``: OBJ with UVs, its photo texture as the albedo, 68 3D landmarks),
  rendered orthographically, shaded with second-order SH light (:data:`LIGHTS`), with Gaussian noise.
  The scan's texture is a real skin texture (stubble, pores, brows, lips), so it is the yardstick for
  "texture must not become geometry"; ``albedo="smooth"`` blurs it (the low-texture variant).

:func:`realistic_suite` lists the scenes the tests and ``benchmarks/bench_fine.py`` use, and
:func:`normal_error` is the measure (mean angle to the true normals inside the mask).
"""
from __future__ import annotations

import json
import pathlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from .grid import masked_gaussian

__all__ = [
    "LIGHTS",
    "synthetic_scene",
    "james_scene",
    "james_available",
    "realistic_suite",
    "normal_error",
]

#: SH irradiance lights (geomfit's convention, (9,) grey; a colour tint is applied per scene) used
#: by :func:`james_scene`: frontal, from the side, from the top, and a low-frequency mix with
#: second-order terms.  Each is rescaled per scene so the brightest 1 % of the face sits at 0.85.
LIGHTS: Dict[str, np.ndarray] = {
    "frontal": np.array([2.6, 0.10, 0.90, 0.05, 0.0, 0.0, 0.05, 0.0, 0.0]),
    "side": np.array([2.4, 0.10, 0.55, -0.95, 0.0, 0.0, 0.0, -0.15, 0.10]),
    "top": np.array([2.4, 0.85, 0.60, 0.10, 0.0, 0.25, -0.10, 0.0, 0.0]),
    "mixed": np.array([2.5, 0.35, 0.70, -0.45, 0.12, -0.10, 0.15, 0.10, -0.12]),
}

_TINT = np.array([1.0, 0.97, 0.93])

# iBUG-68 order from the old menpo LJSON group order of the scan (chin, leye, reye, leyebrow, nose,
# reyebrow, mouth).
_LJSON_TO_IBUG = np.r_[0:17, 29:34, 43:48, 34:43, 17:23, 23:29, 48:68]


def _gauss_masked(a, mask, sigma):
    """:func:`geomfit.grid.masked_gaussian` with reflecting boundaries."""
    return masked_gaussian(a, mask, sigma, mode="reflect")


def normal_error(normals, scene, mask=None, erode=1) -> float:
    """Mean angle in degrees between ``normals`` and the scene's true normals inside the mask.

    Parameters
    ----------
    normals : array (H, W, 3)
        Unit normals (geomfit's frame, :func:`geomfit.render.depth_normals`).
    scene : dict
        A scene of this module (its ``normals`` and ``mask``).
    mask : bool array (H, W), optional
        Evaluate here instead of the scene's mask.
    erode : int
        Pixels removed from the mask border first (one-sided differences there).
    """
    from scipy.ndimage import binary_erosion

    from .backend import asnumpy

    n = np.asarray(asnumpy(normals), dtype=np.float64)
    t = scene["normals"]
    if n.shape != t.shape:
        raise ValueError(f"normals must have shape {t.shape}, got {n.shape}")
    m = scene["mask"] if mask is None else np.asarray(mask, bool)
    if erode:
        m = binary_erosion(m, iterations=int(erode))
    cos = np.clip((n * t).sum(-1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos))[m].mean())


# ----------------------------------------------------------------------------------------------
# Synthetic scene
# ----------------------------------------------------------------------------------------------

def synthetic_scene(size=96, seed=0, wrinkle_amplitude=0.6, wrinkle_period=8.0, blur_sigma=3.0, albedo_gradient=0.0,
                    n_blotches=6, edge_width=1.0, blotch_radius=(0.05, 0.12), noise=0.0):
    """A synthetic face-like test scene with known geometry, albedo and light.

    An ellipsoid (pixel units, larger = closer) plus sinusoidal wrinkles on the upper half and a few
    Gaussian bumps, rendered with a known SH light (geomfit's convention, :mod:`geomfit.sh`) and a
    piecewise-smooth textured albedo (coloured blotches with logistic edges of ``edge_width`` pixels
    on a skin tone, times ``1 + albedo_gradient (u + v / 2)``). The input depth blurs the details
    away (Gaussian, ``blur_sigma`` pixels).

    Parameters
    ----------
    size : int
        Image side in pixels.
    seed : int
        Seed of the bump, blotch and light draws.
    noise : float
        Sigma of Gaussian noise added to the image (before clipping to [0, 1]).

    Returns
    -------
    dict
        The module's scene keys, with ``detail`` (the wrinkle/bump height field) and ``regions``
        (1 = skin, one label per blotch).
    """
    from scipy.ndimage import gaussian_filter

    from .render import depth_normals
    from .sh import shade

    rng = np.random.default_rng(seed)
    H = W = int(size)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    R = 0.46 * size
    u, v = (xx - cx) / (0.85 * R), (yy - cy) / R
    rr = u * u + v * v
    mask = rr < 0.92
    base = 0.8 * R * np.sqrt(np.clip(1.0 - rr, 0.0, None)) + 10.0
    detail = wrinkle_amplitude * np.sin(2 * np.pi * yy / wrinkle_period) * np.exp(-((v + 0.35) / 0.25) ** 2)
    for _ in range(4):
        bx, by = rng.uniform(-0.5, 0.5, 2)
        detail += 1.5 * wrinkle_amplitude * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * 0.06 ** 2))
    depth = base + detail
    depth_blur = base + gaussian_filter(detail, blur_sigma)
    skin = np.array([0.75, 0.55, 0.45])
    alb = np.broadcast_to(skin, (H, W, 3)).copy()
    regions = mask.astype(np.int64)
    for _ in range(int(n_blotches)):
        bx, by = rng.uniform(-0.6, 0.6, 2)
        rad = rng.uniform(*blotch_radius)
        col = skin * rng.uniform(0.6, 0.9, 3)
        dist = np.sqrt((u - bx) ** 2 + (v - by) ** 2) * R  # pixels
        w = 1.0 / (1.0 + np.exp((dist - rad * R) / max(edge_width, 1e-6)))
        alb = alb * (1 - w[..., None]) + col * w[..., None]
        regions[mask & (w > 0.5)] = regions.max() + 1
    alb *= (1.0 + albedo_gradient * (u + 0.5 * v))[..., None]
    sh = np.zeros((9, 3))
    sh[0] = 2.6
    sh[1] = 0.35
    sh[2] = 0.7
    sh[3] = -0.45
    sh[4:] = 0.08 * rng.standard_normal((5, 1))
    sh = sh * np.array([1.0, 0.97, 0.94])
    n = depth_normals(depth)
    img = alb * shade(n, sh)
    if noise:
        img = img + float(noise) * np.random.default_rng(seed + 1).standard_normal(img.shape)
    img = np.clip(img, 0, 1)
    return dict(image=img, depth=depth, depth_blur=depth_blur, mask=mask, albedo=alb, sh=sh, normals=n,
                detail=detail, regions=regions, noise=float(noise),
                name=f"synthetic_{int(n_blotches)}blotches_g{albedo_gradient:g}")


# ----------------------------------------------------------------------------------------------
# The james scan
# ----------------------------------------------------------------------------------------------

def _james_dir(data_dir=None) -> Optional[pathlib.Path]:
    if data_dir is None:
        from .data import data_dir as _dd

        base = _dd()
        if base is None:
            return None
        data_dir = base / "scans" / "james"
    d = pathlib.Path(data_dir)
    return d if all((d / f).is_file() for f in ("james.obj", "james.jpg", "james.ljson")) else None


def james_available(data_dir=None) -> Tuple[bool, str]:
    """Whether the james scan can be loaded: ``(True, "")`` or ``(False, reason)``."""
    d = _james_dir(data_dir)
    if d is None:
        return False, ("the james scan (james.obj, james.jpg, james.ljson) is not in $GEOMFIT_DATA/scans/james "
                       "(set GEOMFIT_DATA to the project's data folder)")
    try:
        import trimesh  # noqa: F401
    except ImportError:
        return False, "trimesh is not installed (pip install trimesh)"
    return True, ""


_SCAN_CACHE: Dict[str, tuple] = {}


def _load_james(d: pathlib.Path):
    key = str(d.resolve())
    if key in _SCAN_CACHE:
        return _SCAN_CACHE[key]
    import cv2
    import trimesh

    mesh = trimesh.load(d / "james.obj", process=False, force="mesh")
    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int64)
    uv = getattr(mesh.visual, "uv", None)
    if uv is None:
        raise ValueError(f"{d / 'james.obj'} has no texture coordinates")
    tex = cv2.imread(str(d / "james.jpg"), cv2.IMREAD_COLOR)
    if tex is None:
        raise ValueError(f"cannot read {d / 'james.jpg'}")
    tex = tex[..., ::-1].astype(np.float64) / 255.0
    tex = np.where(tex <= 0.04045, tex / 12.92, ((tex + 0.055) / 1.055) ** 2.4)  # sRGB -> linear
    lj = json.loads((d / "james.ljson").read_text())
    pts = np.asarray(lj["groups"]["LJSON"]["landmarks"]["points"], np.float64)
    if pts.shape != (68, 3):
        raise ValueError(f"{d / 'james.ljson'}: expected 68 3D landmarks, got {pts.shape}")
    lm = pts[_LJSON_TO_IBUG]
    # a frontal frame from the landmarks: x from the image-left eye to the image-right eye, y up
    # (mouth to eyes), z = x cross y (towards the viewer)
    ex = lm[42:48].mean(0) - lm[36:42].mean(0)
    ex /= np.linalg.norm(ex)
    up = lm[36:48].mean(0) - lm[48:68].mean(0)
    ey = up - (up @ ex) * ex
    ey /= np.linalg.norm(ey)
    ez = np.cross(ex, ey)
    Rm = np.stack([ex, ey, ez])
    if (lm[30] - lm[36:48].mean(0)) @ ez < 0:  # the nose tip must point towards the viewer
        Rm = np.stack([-ex, ey, -ez])
    out = (v @ Rm.T, f, np.asarray(uv, np.float64), tex, lm @ Rm.T)
    _SCAN_CACHE[key] = out
    return out


def james_scene(size=256, light="frontal", noise=0.003, albedo="textured", blur_sigma=None, seed=0,
                occluder=None, data_dir=None, albedo_sigma=None, yaw=0.0):
    """The real "james" head scan rendered as a fine-stage test scene.

    The scan (6.7k vertices, its photogrammetry texture as the albedo) is turned to a frontal pose
    with its 68 landmarks, rendered orthographically with :func:`geomfit.render.rasterize` /
    :func:`geomfit.render.interpolate` (depth in pixel units, texture looked up bilinearly through the
    interpolated UVs and decoded from sRGB), shaded as ``albedo * Y(n) @ sh`` with second-order SH
    (:mod:`geomfit.sh`) and given Gaussian noise.  The input depth is the true depth blurred.

    Parameters
    ----------
    size : int
        Image side (the face spans about 80 % of it).  128-256 for tests, 512 for the benchmark.
    light : str or array (9,) / (9, 3)
        A key of :data:`LIGHTS` or SH irradiance coefficients; named lights are tinted slightly warm
        and scaled so the brightest 1 % of the face is at 0.85.
    noise : float
        Sigma of the Gaussian image noise (linear intensities; the issue's range 0.002-0.01).
    albedo : {"textured", "smooth"}
        The scan's texture, or the texture blurred (Gaussian, sigma ``albedo_sigma``, default
        ``size / 64`` px).  Even blurred so, the texture's log-luminance varies 2-20x more than the
        missing detail's shading in the bands where that detail lives (docs/fine.md); ``albedo_sigma
        = size / 16`` makes a low-texture albedo.
    blur_sigma : float, optional
        Sigma (pixels) of the blur that makes the input depth; default ``size / 128`` (the missing
        detail scales with the image).
    seed : int
        Seed of the noise.
    occluder : {None, "glasses"}
        Render a spectacle frame (dark, slightly glossy rims round both eyes and a bridge) into the
        image; the true depth stays the face's (the frame must not become geometry).
    albedo_sigma : float, optional
        Blur of the ``"smooth"`` albedo in pixels (default ``size / 64``).
    yaw : float
        Turn the head about the vertical axis by this many degrees before rendering (positive: the
        nose turns towards the image's right); the light stays in the camera frame.
    data_dir : path, optional
        The folder with ``james.obj``, ``james.jpg`` and ``james.ljson`` (default
        ``$GEOMFIT_DATA/scans/james``).

    Returns
    -------
    dict
        The module's scene keys, with ``landmarks`` (68, 2) and ``occluder`` (H, W) bool.

    Raises
    ------
    FileNotFoundError
        The scan is missing (:func:`james_available` says why).
    """
    import cv2

    from .render import depth_normals, interpolate, rasterize
    from .sh import shade

    ok, why = james_available(data_dir)
    if not ok:
        raise FileNotFoundError(why)
    size = int(size)
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if albedo not in ("textured", "smooth"):
        raise ValueError(f"albedo must be 'textured' or 'smooth', got {albedo!r}")
    if occluder not in (None, "glasses"):
        raise ValueError(f"occluder must be None or 'glasses', got {occluder!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    v, f, uv, tex, lm3 = _load_james(_james_dir(data_dir))
    if yaw:
        t = np.radians(float(yaw))
        Ry = np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, 1.0, 0.0], [-np.sin(t), 0.0, np.cos(t)]])
        c0 = lm3.mean(0)
        v, lm3 = (v - c0) @ Ry.T + c0, (lm3 - c0) @ Ry.T + c0
    # screen frame: x = column, y = row (down), z = depth (larger = closer), face width ~ 0.8 size
    jaw = lm3[:17, :2]
    lo = np.array([jaw[:, 0].min(), lm3[:, 1].min()])
    hi = np.array([jaw[:, 0].max(), lm3[17:27, 1].max()])
    scale = 0.72 * size / (hi[0] - lo[0])
    centre = np.array([(lo[0] + hi[0]) / 2, lo[1] + 0.62 * (hi[1] - lo[1])])

    def to_screen(p):
        return np.stack([(p[:, 0] - centre[0]) * scale + size / 2, size / 2 - (p[:, 1] - centre[1]) * scale,
                         p[:, 2] * scale], -1)

    vs = to_screen(v)
    ras = rasterize(vs, f, size, size)
    depth = np.asarray(ras.depth, np.float64)
    lm2 = to_screen(lm3)[:, :2]
    # face mask: the landmarks' hull with the brows raised to take in the forehead
    brow_up = lm2[17:27].copy()
    lift = 0.45 * (lm2[8, 1] - lm2[17:27, 1].mean())
    brow_up[:, 1] -= lift
    hull = cv2.convexHull(np.round(np.vstack([lm2[:17], brow_up, lm2[17:27]]) * 4).astype(np.int32))
    face = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(face, hull, 1, lineType=cv2.LINE_8, shift=2)
    mask = (face > 0) & np.asarray(ras.mask) & np.isfinite(depth)
    # albedo from the texture atlas
    uvp = np.asarray(interpolate(ras, uv), np.float64)
    th, tw = tex.shape[:2]
    mapx = (uvp[..., 0] * (tw - 1)).astype(np.float32)
    mapy = ((1.0 - uvp[..., 1]) * (th - 1)).astype(np.float32)
    alb = cv2.remap(tex.astype(np.float32), mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    alb = np.where(np.asarray(ras.mask)[..., None], alb.astype(np.float64), 0.0)
    if albedo == "smooth":
        sig_a = size / 64.0 if albedo_sigma is None else float(albedo_sigma)
        if not sig_a > 0:
            raise ValueError(f"albedo_sigma must be > 0, got {albedo_sigma}")
        alb = np.where(ras.mask[..., None], _gauss_masked(alb, np.asarray(ras.mask), sig_a), 0.0)
    occ = np.zeros((size, size), bool)
    spec = np.zeros((size, size))
    if occluder == "glasses":
        occ, spec = _glasses_layer(lm2, size)
        alb = np.where(occ[..., None], np.array([0.025, 0.022, 0.02]), alb)
    # true normals and shading
    dfill = np.where(np.isfinite(depth), depth, np.nanmin(depth[mask]) if mask.any() else 0.0)
    normals = depth_normals(np.where(ras.mask, dfill, np.nan))
    normals = np.where(np.isfinite(normals), normals, np.array([0.0, 0.0, 1.0]))
    if isinstance(light, str):
        if light not in LIGHTS:
            raise ValueError(f"light must be one of {sorted(LIGHTS)} or SH coefficients, got {light!r}")
        sh = LIGHTS[light][:, None] * _TINT[None, :]
        S = shade(normals, sh)
        q = np.quantile((alb * S)[mask].max(-1), 0.99) if mask.any() else 1.0
        sh = sh * (0.85 / max(q, 1e-6))
        name_light = light
    else:
        sh = np.asarray(light, np.float64)
        if sh.shape == (9,):
            sh = np.repeat(sh[:, None], 3, 1)
        if sh.shape != (9, 3):
            raise ValueError(f"light coefficients must have shape (9,) or (9, 3), got {sh.shape}")
        name_light = "custom"
    img = alb * shade(normals, sh) + spec[..., None] * 0.6
    if noise:
        img = img + float(noise) * np.random.default_rng(seed).standard_normal(img.shape)
    img = np.clip(np.where(ras.mask[..., None], img, 0.0), 0.0, 1.0)
    bs = size / 128.0 if blur_sigma is None else float(blur_sigma)
    depth_blur = np.where(ras.mask, _gauss_masked(dfill, np.asarray(ras.mask), bs), np.nan)
    name = f"james_{albedo}_{name_light}_n{noise:g}" + ("_glasses" if occluder else "")
    if albedo == "smooth" and albedo_sigma is not None:
        name += f"_s{float(albedo_sigma):g}"
    if yaw:
        name += f"_yaw{float(yaw):g}"
    return dict(image=img, depth=np.where(ras.mask, depth, np.nan), depth_blur=depth_blur, mask=mask,
                albedo=alb, sh=sh, normals=normals, landmarks=lm2, occluder=occ & mask, noise=float(noise),
                name=name)


def _glasses_layer(lm2, size):
    """A spectacle frame from the landmarks: elliptical rims round the eyes and a bridge; returns the
    frame pixels and a specular highlight map (a glossy streak along each rim)."""
    import cv2

    layer = np.zeros((size, size), np.uint8)
    iod = np.linalg.norm(lm2[36:42].mean(0) - lm2[42:48].mean(0))
    th = max(2, int(round(0.07 * iod)))
    centres = []
    for sl in (slice(36, 42), slice(42, 48)):
        c = lm2[sl].mean(0)
        centres.append(c)
        axes = (int(round(0.42 * iod)), int(round(0.30 * iod)))
        cv2.ellipse(layer, (int(round(c[0])), int(round(c[1]))), axes, 0, 0, 360, 1, th)
    a, b = centres
    p0 = (int(round(a[0] + 0.42 * iod)), int(round(a[1] - 0.05 * iod)))
    p1 = (int(round(b[0] - 0.42 * iod)), int(round(b[1] - 0.05 * iod)))
    cv2.line(layer, p0, p1, 1, th)
    occ = layer > 0
    spec = np.zeros((size, size))
    hl = np.zeros((size, size), np.uint8)
    for c in centres:
        axes = (int(round(0.42 * iod)), int(round(0.30 * iod)))
        cv2.ellipse(hl, (int(round(c[0])), int(round(c[1]))), axes, 0, 200, 250, 1, max(1, th // 2))
    spec[(hl > 0) & occ] = 1.0
    return occ, spec


def realistic_suite(size=128, james=True, synthetic=True, lights=("frontal", "side", "top"),
                    noises=(0.003, 0.008), smooth=True, glasses=True, synthetic_size=96) -> List[dict]:
    """The scene suite the fine stage is tuned and tested on.

    james (when available): textured albedo under every light in ``lights`` and noise in ``noises``;
    with ``smooth``, the smooth-albedo variant under the same lights at the first noise level; with
    ``glasses``, the frontal textured scene with a spectacle frame.  Synthetic (at
    ``synthetic_size``): uniform albedo, 3 large blotches, 6 small blotches, an albedo gradient
    (noise-free, as the earlier tests), and the uniform one with noise 0.005.

    Returns
    -------
    list of dict
        Scenes; ``scene["family"]`` is ``"textured"``, ``"smooth"``, ``"occluder"`` or ``"synthetic"``.
    """
    out: List[dict] = []
    if james and james_available()[0]:
        for lt in lights:
            for nz in noises:
                s = james_scene(size, light=lt, noise=nz)
                s["family"] = "textured"
                out.append(s)
        if smooth:
            for lt in lights:
                s = james_scene(size, light=lt, noise=noises[0], albedo="smooth")
                s["family"] = "smooth"
                out.append(s)
        if glasses:
            s = james_scene(size, light="frontal", noise=noises[0], occluder="glasses")
            s["family"] = "occluder"
            out.append(s)
    if synthetic:
        for kw, nm in ((dict(n_blotches=0), "uniform_albedo"), (dict(n_blotches=3, blotch_radius=(0.15, 0.25)),
                                                                 "3_large_blotches"),
                       (dict(n_blotches=6), "6_small_blotches"), (dict(n_blotches=0, albedo_gradient=0.1),
                                                                  "albedo_gradient_0.1"),
                       (dict(n_blotches=0, noise=0.005), "uniform_noise_0.005")):
            s = synthetic_scene(synthetic_size, **kw)
            s["name"] = nm
            s["family"] = "synthetic"
            out.append(s)
    return out
