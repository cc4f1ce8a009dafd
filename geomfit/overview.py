"""Pictures of a reconstruction: shaded mesh renders, map images and the overview sheet.

The overview is what a person looks at first: the photo with its landmarks and the three stages
(coarse, medium, fine) rendered as grey clay under one light from the upper left, in the photo's
camera, cropped to the face, side by side with labels; a second row shows the fine stage's depth,
normal and albedo maps and the fine mesh blended over the photo.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["render_shaded", "depth_to_image", "normals_to_image", "albedo_to_image", "overview_image"]

_LIGHT = np.array([-0.45, 0.55, 1.0]) / np.linalg.norm([-0.45, 0.55, 1.0])
_CLAY = np.array([0.86, 0.80, 0.74])


def render_shaded(vertices, faces, camera, height: int, width: int, background=None):
    """Grey-clay Lambertian render of a mesh seen by a scaled-orthographic camera.

    Parameters
    ----------
    vertices : ndarray (N, 3), faces : ndarray (F, 3)
    camera : geomfit.camera.ScaledOrthographic
    height, width : int
    background : ndarray (H, W, 3), optional
        Shown where the mesh does not cover the pixel (default: dark grey).

    Returns
    -------
    image : ndarray (H, W, 3) float in [0, 1]
    mask : ndarray (H, W) bool
    """
    from .metrics import vertex_normals
    from .render import interpolate, rasterize

    v = np.asarray(vertices, dtype=np.float64)
    scr = np.asarray(camera.to_screen(v, height))
    ras = rasterize(scr, np.asarray(faces), height, width)
    R = np.asarray(camera.rotation, dtype=np.float64)
    n_cam = vertex_normals(v, faces) @ R.T  # camera frame: x right, y up, z to the viewer
    n = np.asarray(interpolate(ras, n_cam))
    ln = np.linalg.norm(n, axis=-1, keepdims=True)
    n = n / np.where(ln > 0, ln, 1.0)
    lam = np.clip(n @ _LIGHT, 0.0, 1.0)
    spec = np.clip((n * (_LIGHT + [0, 0, 1]) / np.linalg.norm(_LIGHT + [0, 0, 1])).sum(-1), 0, 1) ** 40
    shade = (0.22 + 0.78 * lam)[..., None] * _CLAY + 0.12 * spec[..., None]
    mask = np.asarray(ras.mask)
    bg = np.full((height, width, 3), 0.18) if background is None else np.asarray(background, dtype=np.float64)
    out = np.where(mask[..., None], np.clip(shade, 0, 1), bg)
    return out, mask


def depth_to_image(depth, mask=None) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Depth (H, W) -> uint16 image: 1..65535 over [min, max] of the valid depth, 0 = no surface.

    Returns the image and the (min, max) depth in pixels, so the PNG can be mapped back:
    ``d = min + (png - 1) / 65534 * (max - min)``.
    """
    d = np.asarray(depth, dtype=np.float64)
    m = np.isfinite(d) if mask is None else (np.asarray(mask, bool) & np.isfinite(d))
    if not m.any():
        return np.zeros(d.shape, np.uint16), (float("nan"), float("nan"))
    lo, hi = float(d[m].min()), float(d[m].max())
    span = hi - lo if hi > lo else 1.0
    out = np.zeros(d.shape, np.uint16)
    out[m] = np.round(1 + (d[m] - lo) / span * 65534).astype(np.uint16)
    return out, (lo, hi)


def normals_to_image(normals) -> np.ndarray:
    """Unit normals (H, W, 3), camera frame -> uint8 RGB ``(n + 1) / 2``, black where NaN."""
    n = np.asarray(normals, dtype=np.float64)
    ok = np.isfinite(n).all(-1)
    out = np.zeros(n.shape, np.uint8)
    out[ok] = np.round((np.clip(n[ok], -1, 1) + 1) * 127.5).astype(np.uint8)
    return out


def albedo_to_image(albedo, linear: bool = True) -> np.ndarray:
    """Albedo (H, W, 3) in [0, 1] -> uint8 sRGB (encoded from linear RGB unless ``linear=False``), black where NaN."""
    from .photo import linear_to_srgb

    a = np.asarray(albedo, dtype=np.float64)
    if linear:
        a = np.where(np.isfinite(a), linear_to_srgb(np.nan_to_num(a)), np.nan)
    ok = np.isfinite(a).all(-1)
    out = np.zeros(a.shape, np.uint8)
    out[ok] = np.round(np.clip(a[ok], 0, 1) * 255).astype(np.uint8)
    return out


def _depth_colormap(depth) -> np.ndarray:
    """Depth -> RGB float with a perceptual colour map over the 2nd-98th percentile (black = none)."""
    import cv2

    d = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(d)
    out = np.zeros(d.shape + (3,))
    if not ok.any():
        return out
    lo, hi = np.percentile(d[ok], [2, 98])
    t = np.clip((d - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    cm = cv2.applyColorMap(np.round(np.nan_to_num(t) * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    out[ok] = cm[ok] / 255.0
    return out


def _label(panel: np.ndarray, text: str, bar: int = 34) -> np.ndarray:
    import cv2

    h, w = panel.shape[:2]
    out = np.full((h + bar, w, 3), 255, np.uint8)
    out[bar:] = panel
    scale = 0.62
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    while tw > w - 8 and scale > 0.3:
        scale -= 0.04
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    cv2.putText(out, text, ((w - tw) // 2, (bar + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 2,
                cv2.LINE_AA)
    return out


def _to_u8(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    return np.round(np.clip(np.nan_to_num(a), 0, 1) * 255).astype(np.uint8)


def overview_image(recon, panel_height: int = 360, margin: float = 0.12, title: Optional[str] = None) -> np.ndarray:
    """The overview sheet of a :class:`geomfit.pipeline.Reconstruction` as uint8 RGB.

    Row 1: photo with landmarks | coarse | medium | fine (shaded, in the photo's camera).
    Row 2: fine depth | fine normals | albedo | fine mesh blended over the photo.
    """
    import cv2

    from .camera import ScaledOrthographic

    img = recon.image
    H, W = img.shape[:2]
    cam = recon.camera
    # face box from a working-size render of the coarse and medium meshes
    box_mask = np.zeros((H, W), bool)
    for mesh in (recon.coarse, recon.medium):
        box_mask |= render_shaded(mesh.vertices, mesh.faces, cam, H, W)[1]
    rows, cols = np.flatnonzero(box_mask.any(1)), np.flatnonzero(box_mask.any(0))
    if rows.size:
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    else:
        r0, r1, c0, c1 = 0, H, 0, W
    mh, mw = int(margin * (r1 - r0)), int(margin * (c1 - c0))
    r0, r1, c0, c1 = max(0, r0 - mh), min(H, r1 + mh), max(0, c0 - mw), min(W, c1 + mw)
    s = panel_height / (r1 - r0)
    pw = max(1, int(round((c1 - c0) * s)))

    def crop(a):
        a = _to_u8(a)[r0:r1, c0:c1]
        return cv2.resize(a, (pw, panel_height), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)

    # the meshes are rendered directly at panel resolution: the same camera, zoomed onto the box
    t = np.asarray(cam.translation, dtype=np.float64)
    zoom = ScaledOrthographic(float(np.asarray(cam.scale)) * s, np.asarray(cam.rotation),
                              [s * (t[0] - c0), s * (t[1] + r0 - H) + panel_height])
    renders, masks = [], []
    for mesh in (recon.coarse, recon.medium, recon.fine):
        r, m = render_shaded(mesh.vertices, mesh.faces, zoom, panel_height, pw)
        renders.append(r)
        masks.append(m)

    photo = crop(img).copy()
    rad = max(2, int(round(panel_height / 150)))
    for x, y in recon.landmarks[np.isfinite(recon.landmarks).all(1)]:
        cv2.circle(photo, (int(round((x - c0) * s)), int(round((y - r0) * s))), rad, (40, 230, 40), -1, cv2.LINE_AA)
    fine_n = recon.diagnostics.get("fine_mesh", {})
    nv = recon.fine.n_vertices
    row1 = [
        _label(photo, "Photo + 68 landmarks"),
        _label(_to_u8(renders[0]), f"Coarse: 3DMM fit ({recon.coarse.n_vertices} v)"),
        _label(_to_u8(renders[1]), "Medium: Laplacian deform."),
        _label(_to_u8(renders[2]), f"Fine: shading detail ({nv} v)" if fine_n else "Fine (= medium)"),
    ]
    dvis = _depth_colormap(recon.depth)
    big = crop(img).astype(np.float64) / 255.0
    m = masks[2]
    blend = big.copy()
    blend[m] = 0.45 * big[m] + 0.55 * renders[2][m]
    row2 = [
        _label(crop(dvis), "Fine depth (yellow = near)"),
        _label(crop(normals_to_image(recon.normals)), "Fine normals"),
        _label(crop(albedo_to_image(recon.albedo)),
               "Albedo" if np.isfinite(recon.albedo).any() else "Albedo (fine stage off)"),
        _label(_to_u8(blend), "Fine mesh over photo"),
    ]
    gap = 6

    def hcat(panels):
        parts = []
        for i, p in enumerate(panels):
            if i:
                parts.append(np.full((p.shape[0], gap, 3), 255, np.uint8))
            parts.append(p)
        return np.concatenate(parts, axis=1)

    a, b = hcat(row1), hcat(row2)
    sheet = np.concatenate([a, np.full((gap, a.shape[1], 3), 255, np.uint8), b], axis=0)
    if title:
        bar = np.full((40, sheet.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, title, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
        sheet = np.concatenate([bar, sheet], axis=0)
    return sheet
