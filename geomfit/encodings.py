"""Three-channel image encodings of a posed mesh (Galteri et al., CVPR Workshops 2019 and CVIU 2019).

* DAE (Galteri et al., "Coarse-to-fine 3D face reconstruction", CVPR Workshops 2019, Sec. 3.1): depth,
  azimuth and elevation of the surface normal.
* DCE (Galteri et al., "Deep 3D morphable model refinement via progressive growing of
  conditional Generative Adversarial Networks", CVIU 2019, Sec. 3.2): depth, mean curvature and elevation.

Both papers project the per-vertex values onto the image plane with an orthographic projection
and "rescale the values in the range [0, 255]". They do not give the exact ranges; geomfit uses
(and documents) these fixed, reproducible mappings:

* depth ``d`` (pixel units, larger = closer): ``255 (d - lo) / (hi - lo)`` with ``(lo, hi)`` =
  ``depth_range`` or, by default, the min/max over the rendered pixels (a constant depth maps
  to 127.5);
* elevation = polar angle of the view-space normal from the viewing axis,
  ``theta = arccos(n_z)`` in [0, pi] -> ``255 theta / pi`` (a normal facing the camera is 0);
* azimuth ``phi = atan2(n_y, n_x)`` in [-pi, pi] -> ``255 (phi + pi) / (2 pi)``;
* mean curvature ``H`` (inverse model units, :func:`geomfit.mesh.mean_curvature`, positive on
  convex parts with outward normals): ``255 (H - lo) / (hi - lo)`` clipped, with ``(lo, hi)`` =
  ``curvature_range`` or, by default, ``+-`` the 99th percentile of ``|H|`` over the rendered pixels.

View-space normals are ``R n`` (x right, y up, z towards the viewer) of the area-weighted vertex
normals, interpolated over the triangle and renormalised per pixel. Pass fixed ``depth_range``
and ``curvature_range`` to encode pairs of meshes (coarse 3DMM and ground truth) consistently, as
the papers require. Background pixels are ``background`` (default 0). Training code maps
``[0, 255]`` to ``[-1, 1]`` itself (Galteri et al. 2019, Sec. 4).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .backend import asnumpy, get_array_module
from .mesh import mean_curvature, vertex_normals
from .render import interpolate, rasterize

__all__ = ["encode_dae", "encode_dce"]


def _size(size) -> Tuple[int, int]:
    if np.ndim(size) == 0:
        size = (size, size)
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _scale(x, mask, rng, xp):
    lo, hi = rng
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise ValueError(f"range must be finite with lo <= hi, got {rng!r}")
    if hi == lo:
        return xp.where(mask, 127.5, 0.0)
    return xp.clip(255.0 * (x - lo) / (hi - lo), 0.0, 255.0)


def _common(vertices, faces, camera, size):
    if getattr(camera, "batch_size", None) is not None:
        raise ValueError("camera must be unbatched (encode one pose at a time)")
    H, W = _size(size)
    xp = get_array_module(vertices)
    ras = rasterize(camera.to_screen(vertices, H), faces, H, W)
    if not bool(ras.mask.any()):
        raise ValueError("the mesh does not cover any pixel of the image (check the camera)")
    n_view = camera.rotate(vertex_normals(vertices, faces))
    n = interpolate(ras, n_view)
    n = n / xp.maximum(xp.linalg.norm(n, axis=-1, keepdims=True), 1e-300)
    return ras, n, xp


def _depth_channel(ras, depth_range, xp):
    d = ras.depth
    m = ras.mask
    if depth_range is None:
        depth_range = (float(d[m].min()), float(d[m].max()))
    return d, _scale(xp.where(m, d, 0.0), m, depth_range, xp)


def _finish(raw_channels, scaled_channels, mask, raw, background, return_mask, xp):
    if raw:
        img = xp.stack(raw_channels, -1)
        img[~mask] = np.nan
    else:
        img = xp.stack(scaled_channels, -1)
        img[~mask] = background
    return (img, mask) if return_mask else img


def encode_dae(vertices, faces, camera, size, *, depth_range: Optional[Tuple[float, float]] = None,
               raw: bool = False, background: float = 0.0, return_mask: bool = False):
    """Depth / azimuth / elevation image of a posed mesh (Galteri et al., CVPR Workshops 2019).

    Parameters
    ----------
    vertices : array (N, 3)
        Model-space vertices (faces counter-clockwise seen from outside).
    faces : int array (F, 3)
    camera : geomfit.camera.ScaledOrthographic
        Unbatched camera; defines the projection ``P`` of the papers.
    size : int or (int, int)
        Output ``(height, width)``.
    depth_range : (float, float), optional
        Depth (pixel units) mapped to 0 and 255; default min/max over the rendered pixels.
    raw : bool
        Return the unscaled channels instead: depth (pixel units), azimuth and elevation
        (radians), NaN in the background.
    background : float
        Value of pixels not covered by the mesh (scaled output).
    return_mask : bool
        Also return the (H, W) coverage mask.

    Returns
    -------
    image : array (H, W, 3)
        Channels (depth, azimuth, elevation) in [0, 255] (see the module docstring for the exact
        mappings); ``(image, mask)`` with ``return_mask``.

    Raises
    ------
    ValueError
        Bad size, batched camera, mesh outside the image, invalid ranges.

    References
    ----------
    Galteri, Ferrari, Lisanti, Berretti, Del Bimbo, "Coarse-to-fine 3D face reconstruction"
    (CVPR Workshops 2019), Sec. 3.1.
    """
    ras, n, xp = _common(vertices, faces, camera, size)
    m = ras.mask
    d, ds = _depth_channel(ras, depth_range, xp)
    theta = xp.arccos(xp.clip(n[..., 2], -1.0, 1.0))
    phi = xp.arctan2(n[..., 1], n[..., 0])
    az = _scale(xp.where(m, phi, 0.0), m, (-np.pi, np.pi), xp)
    el = _scale(xp.where(m, theta, 0.0), m, (0.0, np.pi), xp)
    return _finish([d, phi, theta], [ds, az, el], m, raw, background, return_mask, xp)


def encode_dce(vertices, faces, camera, size, *, depth_range: Optional[Tuple[float, float]] = None,
               curvature_range: Optional[Tuple[float, float]] = None, raw: bool = False,
               background: float = 0.0, return_mask: bool = False):
    """Depth / mean-curvature / elevation image of a posed mesh (Galteri et al., CVIU 2019).

    Parameters
    ----------
    vertices, faces, camera, size, depth_range, raw, background, return_mask :
        As in :func:`encode_dae`.
    curvature_range : (float, float), optional
        Mean curvature (inverse model units) mapped to 0 and 255, values outside clipped;
        default ``+-`` the 99th percentile of ``|H|`` over the rendered pixels.

    Returns
    -------
    image : array (H, W, 3)
        Channels (depth, curvature, elevation) in [0, 255]; with ``raw`` the depth (pixel
        units), mean curvature (inverse model units) and elevation (radians).

    References
    ----------
    Galteri, Ferrari, Lisanti, Berretti, Del Bimbo, "Deep 3D morphable model refinement via
    progressive growing of conditional Generative Adversarial Networks", CVIU 2019,
    Sec. 3.2. The paper estimates curvature after Cohen-Steiner & Morvan (2003); geomfit uses the
    cotangent-Laplacian mean curvature (Meyer et al. 2003).
    """
    ras, n, xp = _common(vertices, faces, camera, size)
    m = ras.mask
    d, ds = _depth_channel(ras, depth_range, xp)
    Hv = mean_curvature(vertices, faces)
    h = interpolate(ras, xp.asarray(Hv))
    if curvature_range is None:
        c = float(np.percentile(np.abs(asnumpy(h[m])), 99))
        curvature_range = (-c, c)
    cs = _scale(xp.where(m, h, 0.0), m, curvature_range, xp)
    theta = xp.arccos(xp.clip(n[..., 2], -1.0, 1.0))
    el = _scale(xp.where(m, theta, 0.0), m, (0.0, np.pi), xp)
    return _finish([d, h, theta], [ds, cs, el], m, raw, background, return_mask, xp)
