"""UV texture maps: a photo resampled into the model's texture space through a 3DMM fit.

Wang, Lin, Xu, Che and Wang, "Low-frequency guided self-supervised learning for high-fidelity 3D
face reconstruction in the wild", ICME 2020, Sec. 3.1: after the landmark fit (their Eq. 1) "we extract
the corresponding texture map, denoted as I_t(UV)"; the texture map, its visibility and the vertex
normals in UV space are what B-Net, FAN and DRN (:mod:`geomfit.learned.detail`) train on.

How a texture is made (:func:`uv_texture`):

1. the model mesh is rasterised *in UV space*: vertex ``i`` sits at ``(u_i S, (1 - v_i) S)`` (texture
   coordinates with v up, as in OBJ, so row 0 is the top of the map), which gives every texel a
   triangle and barycentric coordinates;
2. the texel's 3D point (the same barycentric combination of the fitted vertices) is projected
   through the fit's scaled orthographic camera, and the photo is sampled there bilinearly;
3. the fitted mesh is also rasterised in the image (z-buffer); a texel is *visible* when its
   triangle faces the camera, its image point lies inside the image on a covered pixel, and the
   z-buffer at that pixel is not in front of the texel's own triangle (evaluated at the pixel
   centre) by more than ``depth_tolerance`` pixels. Occluded and back-facing texels are invisible
   and filled with ``fill``.

:func:`uv_render` goes the other way (a texture map rendered through a fit into the image), so a
texture can be checked by a round trip. Everything is array code against
:func:`geomfit.backend.get_array_module` plus :func:`geomfit.render.rasterize` (Numba on CPU, CUDA on
GPU): CuPy inputs stay on the GPU. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .backend import get_array_module, to_device
from .photo import as_float_image

__all__ = ["UVTexture", "uv_texture", "uv_render", "uv_raster", "sample_bilinear"]


@dataclass
class UVTexture:
    """Result of :func:`uv_texture` (arrays on the device of the input).

    Attributes
    ----------
    texture : float array (S, S, 3)
        The photo resampled into texture space (the photo's value range, float), ``fill`` where
        not visible.
    visible : bool array (S, S)
        Texels whose surface point is seen in the photo (front-facing, not occluded, inside).
    mask : bool array (S, S)
        Texels covered by the model's UV layout (visible or not).
    points : float array (S, S, 3)
        The texel's surface point in camera space (model units: ``R v``; x right, y up, z toward the
        camera), 0 outside ``mask``.
    normals : float array (S, S, 3)
        Unit surface normal (interpolated vertex normals) in the same camera frame, 0 outside.
    dpdu, dpdv : float array (S, S, 3)
        Surface tangents per unit texture coordinate (camera frame, model units): the derivative of the
        texel's 3D point along u and along v (constant over each triangle), 0 outside.
    image_xy : float array (S, S, 2)
        Where the texel lands in the photo (pixels: x = column, y = row, top-left origin).
    triangle_id : int array (S, S)
        Model triangle of each texel, -1 outside.
    """

    texture: Any
    visible: Any
    mask: Any
    points: Any
    normals: Any
    image_xy: Any
    triangle_id: Any
    dpdu: Any = None
    dpdv: Any = None

    @property
    def size(self) -> int:
        return int(self.texture.shape[0])


def _fit_parts(fit, faces, texcoords, xp):
    """Vertices, rotation, projected pixels, faces and texture coordinates from a fit (checked)."""
    for name in ("vertices", "rotation", "projected"):
        if not hasattr(fit, name):
            raise TypeError(f"uv_texture: fit must have 'vertices', 'rotation' and 'projected' (a LandmarkFit); "
                            f"{type(fit).__name__} has no {name!r}")
    model = getattr(fit, "model", None)
    if faces is None:
        faces = getattr(model, "faces", None)
    if texcoords is None:
        texcoords = getattr(model, "texcoords", None)
    if faces is None:
        raise ValueError("uv_texture: no faces: pass faces= or a fit whose .model has faces")
    if texcoords is None:
        raise ValueError("uv_texture: the model has no texture coordinates; pass texcoords= (N, 2), "
                         "u right and v up in [0, 1] as in OBJ files")
    v = xp.asarray(fit.vertices, dtype=xp.float64)
    R = xp.asarray(fit.rotation, dtype=xp.float64)
    p = xp.asarray(fit.projected, dtype=xp.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"uv_texture: fit.vertices must have shape (N, 3) (one image, not a batch), got {tuple(v.shape)}")
    n = v.shape[0]
    if R.shape != (3, 3):
        raise ValueError(f"uv_texture: fit.rotation must have shape (3, 3), got {tuple(R.shape)}")
    if p.shape != (n, 2):
        raise ValueError(f"uv_texture: fit.projected must have shape ({n}, 2), got {tuple(p.shape)}")
    f = xp.asarray(faces)
    tc = xp.asarray(texcoords, dtype=xp.float64)
    if f.ndim != 2 or f.shape[1] != 3 or f.dtype.kind not in "iu":
        raise ValueError(f"uv_texture: faces must be an integer array (F, 3), got {tuple(f.shape)} {f.dtype}")
    if f.size and (int(f.min()) < 0 or int(f.max()) >= n):
        raise ValueError(f"uv_texture: faces index vertices outside [0, {n})")
    if tc.shape != (n, 2):
        raise ValueError(f"uv_texture: texcoords must have shape ({n}, 2), got {tuple(tc.shape)}")
    for name, a in (("fit.vertices", v), ("fit.rotation", R), ("fit.projected", p), ("texcoords", tc)):
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"uv_texture: {name} contains NaN or infinite values")
    return v, R, p, f.astype(xp.int64), tc


def _depth_scale(fit, v, R, p, xp):
    """Pixels per model unit: ``fit.scale`` when present, else fitted from projected vs rotated."""
    s = getattr(fit, "scale", None)
    if s is not None and np.ndim(s) == 0:
        return float(s)
    q = v @ R[:2].T
    q = q - q.mean(0)
    pc = p - p.mean(0)
    pc = xp.stack([pc[:, 0], -pc[:, 1]], axis=1)  # image y is down
    return float((q * pc).sum() / max(float((q * q).sum()), 1e-30))


def uv_raster(texcoords, faces, size):
    """Rasterise a mesh's texture layout: texel -> triangle id and barycentrics.

    Parameters
    ----------
    texcoords : array (N, 2)
        ``(u, v)`` in [0, 1], v up (OBJ convention).
    faces : int array (F, 3)
    size : int
        Map size S; texel ``(r, c)`` has its centre at ``u = (c + 0.5) / S``, ``v = 1 - (r + 0.5) / S``.

    Returns
    -------
    geomfit.render.Raster
        On the device of ``texcoords``.
    """
    from .render import rasterize

    xp = get_array_module(texcoords, faces)
    tc = xp.asarray(texcoords, dtype=xp.float64)
    uvp = xp.stack([tc[:, 0] * size, (1.0 - tc[:, 1]) * size, xp.zeros(tc.shape[0])], axis=1)
    return rasterize(uvp, faces, size, size)


def sample_bilinear(image, x, y):
    """Bilinear lookup of ``image`` (H, W, C) at continuous pixel coordinates.

    Pixel ``(i, j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``; coordinates are clamped to the
    image (edge values extend). NumPy or CuPy. Returns ``(..., C)`` for ``x``, ``y`` of shape ``(...)``.
    """
    xp = get_array_module(image, x)
    h, w = image.shape[:2]
    fx = xp.clip(x - 0.5, 0, w - 1)
    fy = xp.clip(y - 0.5, 0, h - 1)
    x0 = xp.floor(fx).astype(xp.int64)
    y0 = xp.floor(fy).astype(xp.int64)
    x1 = xp.minimum(x0 + 1, w - 1)
    y1 = xp.minimum(y0 + 1, h - 1)
    ax = (fx - x0)[..., None]
    ay = (fy - y0)[..., None]
    return ((1 - ax) * (1 - ay) * image[y0, x0] + ax * (1 - ay) * image[y0, x1]
            + (1 - ax) * ay * image[y1, x0] + ax * ay * image[y1, x1])


def _as_image(image, xp):
    a = as_float_image(to_device(image, xp) if hasattr(image, "dtype") else image, "uv_texture: image")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] not in (1, 3, 4):
        raise ValueError(f"uv_texture: image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(a.shape)}")
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[2] == 1:
        a = xp.repeat(a, 3, axis=2)
    return xp.asarray(a)


def uv_texture(image, fit, size: int = 256, *, faces=None, texcoords=None, depth_tolerance: float = 1.0,
               fill: float = 0.0) -> UVTexture:
    """Resample a photo into the model's texture (UV) space through a 3DMM fit.

    Wang et al., "Low-frequency guided self-supervised learning for high-fidelity 3D face
    reconstruction in the wild", ICME 2020, Sec. 3.1: the texture map ``I_t(UV)`` extracted after the
    landmark fit of their Eq. (1).

    Parameters
    ----------
    image : array (H, W), (H, W, 3) or (H, W, 4)
        The photo the fit was made on (uint8/uint16 are scaled to [0, 1]; floats are used as given).
        NumPy or CuPy.
    fit : LandmarkFit or object
        Anything with ``vertices`` (N, 3) in model space, ``rotation`` (3, 3) model -> camera,
        ``projected`` (N, 2) pixel coordinates (top-left origin, y down) and, unless ``faces`` and
        ``texcoords`` are given, a ``model`` with ``faces`` and ``texcoords``. ``scale`` (pixels per
        model unit) is used for depths when present, else estimated from ``projected``.
    size : int
        Map size S (the paper uses 256).
    faces : int array (F, 3), optional
    texcoords : array (N, 2), optional
        Per-vertex ``(u, v)`` with v up (OBJ convention); row ``r`` of the map is ``(1 - v) S``.
    depth_tolerance : float
        Occlusion test slack in pixels of depth.
    fill : float
        Value of invisible texels.

    Returns
    -------
    UVTexture
        ``texture`` (S, S, 3), ``visible`` (S, S) bool, and the texel geometry (``mask``, ``points``,
        ``normals``, ``image_xy``, ``triangle_id``).

    Raises
    ------
    TypeError, ValueError
        A fit without the needed fields, a model without texture coordinates, bad shapes, NaNs, a
        non-positive size.
    """
    from .render import rasterize

    if int(size) != size or size < 2:
        raise ValueError(f"uv_texture: size must be an integer >= 2, got {size!r}")
    size = int(size)
    xp = get_array_module(image, getattr(fit, "rotation", None))
    img = _as_image(image, xp)
    H, W = img.shape[:2]
    v, R, p, f, tc = _fit_parts(fit, faces, texcoords, xp)
    s = _depth_scale(fit, v, R, p, xp)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"uv_texture: the fit's scale must be positive, got {s}")

    cam = v @ R.T                                   # camera space, model units
    scr = xp.concatenate([p, s * cam[:, 2:3]], axis=1)  # x, y (pixels), depth (pixels, larger = closer)
    img_ras = rasterize(scr, f, H, W)
    zbuf = img_ras.depth

    uvr = uv_raster(tc, f, size)
    m = uvr.mask
    tid = uvr.triangle_id
    bary = uvr.barycentric[m]                       # (M, 3)
    tri = f[tid[m]]                                 # (M, 3)
    pts = xp.einsum("mk,mkc->mc", bary, scr[tri])   # texel point on screen (x, y, depth)

    # per-face camera-space normal: front-facing when it points toward the camera (+z)
    e1 = cam[f[:, 1]] - cam[f[:, 0]]
    e2 = cam[f[:, 2]] - cam[f[:, 0]]
    fz = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    front = (fz > 0)[tid[m]]

    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    col = xp.clip(xp.floor(x), 0, W - 1).astype(xp.int64)
    row = xp.clip(xp.floor(y), 0, H - 1).astype(xp.int64)
    zb = zbuf[row, col]
    # the texel's own triangle plane evaluated at that pixel centre (exact for orthographic depth)
    a, b, c = scr[tri[:, 0]], scr[tri[:, 1]], scr[tri[:, 2]]
    px, py = col + 0.5, row + 0.5
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    safe = xp.abs(det) > 1e-12
    det = xp.where(safe, det, 1.0)
    l1 = ((px - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (py - a[:, 1])) / det
    l2 = ((b[:, 0] - a[:, 0]) * (py - a[:, 1]) - (px - a[:, 0]) * (b[:, 1] - a[:, 1])) / det
    zplane = xp.where(safe, a[:, 2] + l1 * (b[:, 2] - a[:, 2]) + l2 * (c[:, 2] - a[:, 2]), z)
    covered = xp.isfinite(zb)
    unoccluded = covered & (xp.where(covered, zb, -xp.inf) <= xp.maximum(zplane, z) + depth_tolerance)
    vis = front & inside & unoccluded

    colours = sample_bilinear(img, x, y)
    tex = xp.full((size, size, 3), fill, dtype=xp.float64)
    tex_m = xp.where(vis[:, None], colours, fill)
    tex[m] = tex_m
    visible = xp.zeros((size, size), dtype=bool)
    visible[m] = vis

    from .mesh import vertex_normals

    vn = vertex_normals(cam, f)
    nrm = xp.einsum("mk,mkc->mc", bary, vn[tri])
    nrm = nrm / xp.maximum(xp.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    points = xp.zeros((size, size, 3))
    points[m] = xp.einsum("mk,mkc->mc", bary, cam[tri])
    normals = xp.zeros((size, size, 3))
    normals[m] = nrm
    ixy = xp.zeros((size, size, 2))
    ixy[m] = pts[:, :2]
    # per-triangle Jacobian dP/d(u, v): [P1 - P0, P2 - P0] = J [uv1 - uv0, uv2 - uv0]
    E = xp.stack([cam[f[:, 1]] - cam[f[:, 0]], cam[f[:, 2]] - cam[f[:, 0]]], axis=2)      # (F, 3, 2)
    T = xp.stack([tc[f[:, 1]] - tc[f[:, 0]], tc[f[:, 2]] - tc[f[:, 0]]], axis=2)          # (F, 2, 2)
    detT = T[:, 0, 0] * T[:, 1, 1] - T[:, 0, 1] * T[:, 1, 0]
    okT = xp.abs(detT) > 1e-14
    detT = xp.where(okT, detT, 1.0)
    Tinv = xp.stack([xp.stack([T[:, 1, 1], -T[:, 0, 1]], 1), xp.stack([-T[:, 1, 0], T[:, 0, 0]], 1)], 1) / detT[:, None, None]
    J = xp.einsum("fij,fjk->fik", E, Tinv) * okT[:, None, None]                           # (F, 3, 2)
    dpdu = xp.zeros((size, size, 3))
    dpdv = xp.zeros((size, size, 3))
    dpdu[m] = J[tid[m], :, 0]
    dpdv[m] = J[tid[m], :, 1]
    return UVTexture(texture=tex, visible=visible, mask=m, points=points, normals=normals, image_xy=ixy,
                     triangle_id=tid, dpdu=dpdu, dpdv=dpdv)


def uv_render(texture, fit, image_shape, *, faces=None, texcoords=None, valid=None):
    """Render a texture map through a fit into the image: the inverse of :func:`uv_texture`.

    Every image pixel covered by the fitted mesh (nearest surface, z-buffer) takes the texture
    bilinearly at its interpolated texture coordinate.

    Parameters
    ----------
    texture : array (S, S, C)
    fit : LandmarkFit or object
        As for :func:`uv_texture`.
    image_shape : tuple (H, W)
    faces, texcoords : optional
        As for :func:`uv_texture`.
    valid : bool array (S, S), optional
        Texels that carry data (e.g. ``UVTexture.visible``); a pixel is reported valid only when
        all four texels of its bilinear footprint are.

    Returns
    -------
    image : array (H, W, C)
        0 outside the mesh.
    mask : bool array (H, W)
        Pixels covered by the mesh (and with a fully valid footprint when ``valid`` is given).
    """
    from .render import interpolate, rasterize

    xp = get_array_module(texture)
    tex = xp.asarray(texture, dtype=xp.float64)
    if tex.ndim == 2:
        tex = tex[..., None]
    if tex.ndim != 3 or tex.shape[0] != tex.shape[1]:
        raise ValueError(f"uv_render: texture must have shape (S, S, C), got {tuple(tex.shape)}")
    H, W = (int(image_shape[0]), int(image_shape[1]))
    v, R, p, f, tc = _fit_parts(fit, faces, texcoords, xp)
    s = _depth_scale(fit, v, R, p, xp)
    cam = v @ R.T
    scr = xp.concatenate([p, s * cam[:, 2:3]], axis=1)
    ras = rasterize(scr, f, H, W)
    S = tex.shape[0]
    uvp = xp.stack([tc[:, 0] * S, (1.0 - tc[:, 1]) * S], axis=1)
    q = interpolate(ras, uvp)                       # (H, W, 2) texel coordinates
    m = ras.mask
    out = xp.zeros((H, W, tex.shape[2]))
    out[m] = sample_bilinear(tex, q[m][:, 0], q[m][:, 1])
    mask = m.copy()
    if valid is not None:
        val = xp.asarray(valid).astype(xp.float64)
        if val.shape != tex.shape[:2]:
            raise ValueError(f"uv_render: valid must have shape {tex.shape[:2]}, got {tuple(val.shape)}")
        # all four bilinear taps valid <=> the minimum over the footprint is 1
        qx, qy = q[m][:, 0], q[m][:, 1]
        fx = xp.clip(qx - 0.5, 0, S - 1)
        fy = xp.clip(qy - 0.5, 0, S - 1)
        x0, y0 = xp.floor(fx).astype(xp.int64), xp.floor(fy).astype(xp.int64)
        x1, y1 = xp.minimum(x0 + 1, S - 1), xp.minimum(y0 + 1, S - 1)
        ok = (val[y0, x0] * val[y0, x1] * val[y1, x0] * val[y1, x1]) > 0.5
        mask[m] = ok
    return out, mask
