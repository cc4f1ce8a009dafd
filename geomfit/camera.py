"""Scaled-orthographic camera and rotation helpers.

Conventions (see docs/rendering.md)
-----------------------------------
Model space is right-handed with y up and the viewer on the +z side (the camera looks along -z).
A :class:`ScaledOrthographic` camera maps a model point ``v`` to

* image column ``u = s * (R v)_x + t_x``
* image row ``r = H - (s * (R v)_y + t_y)`` (``H`` = image height in pixels)
* depth ``d = s * (R v)_z``: pixel units, larger = closer to the viewer.

Pixel coordinates are continuous with the origin at the top-left corner of the image and y
pointing down: pixel (row i, column j) covers ``[j, j+1) x [i, i+1)`` and its centre is
``(j + 0.5, i + 0.5)``. This is the convention of the landmark ``.pts`` files and of eos's
scaled-orthographic fit (which projects and then flips ``y -> H - y``).

Angles are radians. ``euler_to_matrix(yaw, pitch, roll) = R_y(yaw) @ R_x(pitch) @ R_z(roll)``
(intrinsic Y-X'-Z'' rotations, glm's ``eulerAngleYXZ``): yaw turns the head left/right about the
vertical axis, pitch nods about the horizontal axis, roll tilts in the image plane.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .backend import get_array_module

__all__ = ["ScaledOrthographic", "scaled_orthographic", "euler_to_matrix", "matrix_to_euler", "rodrigues",
           "matrix_to_rodrigues"]


def scaled_orthographic(vertices, rotation, scale, translation, image_height, depth: bool = True):
    """Scaled orthographic projection to screen coordinates: geomfit's one definition.

    ``u = s (R v)_x + t_x``, ``row = h - (s (R v)_y + t_y)``, ``depth = s (R v)_z`` (see the module
    docstring); :class:`ScaledOrthographic` and :func:`geomfit.fitting.project` use it.

    Parameters
    ----------
    vertices : array (..., N, 3)
    rotation : array (..., 3, 3)
    scale : float or array (...)
    translation : array (..., 2)
        ``(t_x, t_y)`` in pixels, y up (measured from the bottom edge).
    image_height : float or array (...)
        ``h`` of the y flip.
    depth : bool
        Also return the depth column.

    Returns
    -------
    array (..., N, 3) ``(u, row, depth)``, or (..., N, 2) ``(u, row)`` when ``depth=False``.

    Examples
    --------
    >>> import numpy as np
    >>> scaled_orthographic(np.array([[1.0, 2.0, 3.0]]), np.eye(3), 2.0, np.array([10.0, 5.0]), 100)
    array([[12., 91.,  6.]])
    """
    xp = get_array_module(vertices, rotation)
    R = xp.asarray(rotation)
    s = xp.asarray(scale, dtype=R.dtype)
    t = xp.asarray(translation, dtype=R.dtype)
    h = xp.asarray(image_height, dtype=R.dtype)
    rows = R if depth else R[..., :2, :]
    q = s[..., None, None] * xp.matmul(vertices, xp.swapaxes(rows, -1, -2))  # (..., N, 3 or 2)
    q0 = q[..., 0] + t[..., None, 0]
    q1 = h[..., None] - (q[..., 1] + t[..., None, 1])
    return xp.stack([q0, q1, q[..., 2]] if depth else [q0, q1], axis=-1)


def _finite(xp, a, name):
    if a.size and not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"{name} contains NaN or infinite values")


@dataclass
class ScaledOrthographic:
    """Scaled-orthographic (weak-perspective) camera ``x_px = s * (R v)_xy + t`` with y flipped.

    Parameters
    ----------
    scale : float or array (B,)
        Pixels per model unit, > 0.
    rotation : array (3, 3) or (B, 3, 3)
        Rotation matrices (orthonormal, determinant +1).
    translation : array (2,) or (B, 2)
        ``(t_x, t_y)`` in pixels, in the y-up frame before the flip (so ``t_y`` is measured from
        the bottom edge of the image).

    Notes
    -----
    Batched parameters (leading dimension B) project one mesh in B poses or a batch of B meshes
    (vertices (B, N, 3)) in matching poses. See the module docstring for the exact formulas.

    Raises
    ------
    ValueError
        Wrong shapes, mismatched batch sizes, non-positive or non-finite scale, non-rotation
        matrices.
    """

    scale: Any
    rotation: Any
    translation: Any

    def __post_init__(self):
        xp = get_array_module(self.scale, self.rotation, self.translation)
        s = xp.asarray(self.scale, dtype=xp.float64)
        R = xp.asarray(self.rotation, dtype=xp.float64)
        t = xp.asarray(self.translation, dtype=xp.float64)
        if R.ndim not in (2, 3) or R.shape[-2:] != (3, 3):
            raise ValueError(f"rotation must have shape (3, 3) or (B, 3, 3), got {tuple(R.shape)}")
        if t.ndim not in (1, 2) or t.shape[-1] != 2:
            raise ValueError(f"translation must have shape (2,) or (B, 2), got {tuple(t.shape)}")
        if s.ndim > 1:
            raise ValueError(f"scale must be a scalar or have shape (B,), got {tuple(s.shape)}")
        for a, name in ((s, "scale"), (R, "rotation"), (t, "translation")):
            _finite(xp, a, name)
        if bool(xp.any(s <= 0)):
            raise ValueError("scale must be positive")
        batch = {a.shape[0] for a, nd in ((s, 1), (R, 3), (t, 2)) if a.ndim == nd}
        if len(batch) > 1:
            raise ValueError(f"camera parameters have mismatched batch sizes {sorted(batch)}")
        err = xp.abs(xp.matmul(R, xp.swapaxes(R, -1, -2)) - xp.eye(3)).max()
        if float(err) > 1e-6 or bool(xp.any(xp.linalg.det(R) < 0)):
            raise ValueError("rotation must be orthonormal with determinant +1 "
                             f"(|R R^T - I| = {float(err):.2e})")
        self.batch_size: Optional[int] = batch.pop() if batch else None
        self.scale, self.rotation, self.translation = s, R, t
        self._xp = xp

    # -- helpers ---------------------------------------------------------------------------------
    def _params(self):
        """Scale (..., 1, 1), rotation (..., 3, 3), translation (..., 1, 2) broadcastable over N."""
        s, R, t = self.scale, self.rotation, self.translation
        xp = self._xp
        B = self.batch_size
        if B is not None:
            s = xp.broadcast_to(s, (B,))
            R = xp.broadcast_to(R, (B, 3, 3))
            t = xp.broadcast_to(t, (B, 2))
        return s[..., None, None], R, t[..., None, :]

    def _check_vertices(self, vertices, name="vertices"):
        xp = self._xp
        v = xp.asarray(vertices, dtype=xp.float64)
        if v.ndim not in (2, 3) or v.shape[-1] != 3:
            raise ValueError(f"{name} must have shape (N, 3) or (B, N, 3), got {tuple(v.shape)}")
        if v.ndim == 3 and self.batch_size is not None and v.shape[0] != self.batch_size:
            raise ValueError(f"{name} has batch size {v.shape[0]} but the camera has {self.batch_size}")
        _finite(xp, v, name)
        return v

    def rotate(self, vertices):
        """``R v`` for vertices (N, 3) or (B, N, 3); returns (..., N, 3)."""
        v = self._check_vertices(vertices)
        _, R, _ = self._params()
        return self._xp.einsum("...ij,...nj->...ni", R, v)

    # -- public ---------------------------------------------------------------------------------
    def to_screen(self, vertices, image_height):
        """Screen coordinates ``(u, row, depth)`` (..., N, 3), the input of :func:`geomfit.rasterize`.

        Parameters
        ----------
        vertices : array (N, 3) or (B, N, 3)
        image_height : int or float
            ``H`` in ``row = H - (s (R v)_y + t_y)``.
        """
        v = self._check_vertices(vertices)
        s, R, t = self._params()
        return scaled_orthographic(v, R, s[..., 0, 0], t[..., 0, :], float(image_height))

    def project(self, vertices, image_height):
        """Pixel coordinates (..., N, 2): ``(u, row)``, origin top-left, y down (.pts convention)."""
        return self.to_screen(vertices, image_height)[..., :2]

    def depth(self, vertices):
        """Depth ``s (R v)_z`` (..., N) in pixel units; larger = closer to the viewer."""
        s, _, _ = self._params()
        return self.rotate(vertices)[..., 2] * s[..., 0]

    def unproject(self, points, depth, image_height):
        """Model-space points from pixel coordinates and depth (inverse of :meth:`to_screen`).

        Parameters
        ----------
        points : array (..., N, 2)
            ``(u, row)`` pixel coordinates.
        depth : array (..., N)
            Depth in pixel units (as returned by :meth:`depth`).
        image_height : int or float

        Returns
        -------
        array (..., N, 3)
        """
        xp = self._xp
        p = xp.asarray(points, dtype=xp.float64)
        d = xp.asarray(depth, dtype=xp.float64)
        if p.shape[-1] != 2 or p.shape[:-1] != d.shape:
            raise ValueError(f"points (..., N, 2) and depth (..., N) disagree: {tuple(p.shape)} vs {tuple(d.shape)}")
        _finite(xp, p, "points")
        _finite(xp, d, "depth")
        s, R, t = self._params()
        H = float(image_height)
        q = xp.stack([p[..., 0] - t[..., 0], H - p[..., 1] - t[..., 1], d], axis=-1) / s
        return xp.einsum("...ji,...nj->...ni", R, q)  # R^T q


# ------------------------------------------------------------------------------------------------
# rotations
# ------------------------------------------------------------------------------------------------

def euler_to_matrix(yaw, pitch, roll):
    """Rotation matrices ``R_y(yaw) @ R_x(pitch) @ R_z(roll)`` (radians; arrays broadcast).

    Returns
    -------
    array (..., 3, 3) on the device of the inputs.
    """
    xp = get_array_module(yaw, pitch, roll)
    y, p, r = xp.broadcast_arrays(*(xp.asarray(a, dtype=xp.float64) for a in (yaw, pitch, roll)))
    cy, sy, cp, sp_, cr, sr = xp.cos(y), xp.sin(y), xp.cos(p), xp.sin(p), xp.cos(r), xp.sin(r)
    R = xp.stack([
        cy * cr + sy * sp_ * sr, -cy * sr + sy * sp_ * cr, sy * cp,
        cp * sr, cp * cr, -sp_,
        -sy * cr + cy * sp_ * sr, sy * sr + cy * sp_ * cr, cy * cp,
    ], axis=-1)
    return R.reshape(y.shape + (3, 3))


def matrix_to_euler(R) -> Tuple[Any, Any, Any]:
    """Inverse of :func:`euler_to_matrix`: ``(yaw, pitch, roll)`` with pitch in [-pi/2, pi/2].

    At gimbal lock (``|pitch| = pi/2``) roll is set to 0 and yaw absorbs the rotation.
    """
    xp = get_array_module(R)
    R = xp.asarray(R, dtype=xp.float64)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {tuple(R.shape)}")
    pitch = xp.arcsin(xp.clip(-R[..., 1, 2], -1.0, 1.0))
    lock = xp.hypot(R[..., 1, 0], R[..., 1, 1]) < 1e-12
    yaw = xp.where(lock, xp.arctan2(-R[..., 2, 0], R[..., 0, 0]), xp.arctan2(R[..., 0, 2], R[..., 2, 2]))
    roll = xp.where(lock, 0.0, xp.arctan2(R[..., 1, 0], R[..., 1, 1]))
    return yaw, pitch, roll


def _rodrigues_coefficients(th2):
    """``(sin t / t, (1 - cos t) / t^2)`` for ``t^2 = th2``, by Taylor series below ``t = 1e-6``.

    The scalar form of :func:`rodrigues`; the compiled kernels (``geomfit.kernels.fitting``) compile
    this function for the CPU and as a CUDA device function.
    """
    th = math.sqrt(th2)
    if th < 1e-6:
        return 1.0 - th2 / 6.0, 0.5 - th2 / 24.0
    return math.sin(th) / th, (1.0 - math.cos(th)) / (th * th)


def rodrigues(axis_angle):
    """Rotation matrices from axis-angle vectors (direction = axis, norm = angle in radians).

    ``R = I + a K + b K^2`` with ``K`` the cross-product matrix of the vector ``w``,
    ``a = sin(t) / t`` and ``b = (1 - cos t) / t^2`` for ``t = |w|`` (Rodrigues' formula; Taylor
    series below ``t = 1e-6``, so it is smooth and exact at 0). geomfit's one definition: the
    landmark fit, rigid ICP and the compiled kernels use it (see :func:`_rodrigues_coefficients`).

    Parameters
    ----------
    axis_angle : array (..., 3)

    Returns
    -------
    array (..., 3, 3)

    Examples
    --------
    >>> import numpy as np
    >>> np.round(rodrigues(np.array([0.0, 0.0, np.pi / 2])), 12) + 0.0
    array([[ 0., -1.,  0.],
           [ 1.,  0.,  0.],
           [ 0.,  0.,  1.]])
    """
    xp = get_array_module(axis_angle)
    w = xp.asarray(axis_angle, dtype=xp.float64)
    if w.shape[-1:] != (3,):
        raise ValueError(f"axis_angle must have shape (..., 3), got {tuple(w.shape)}")
    th2 = (w * w).sum(-1)
    th = xp.sqrt(th2)
    small = th < 1e-6
    ts = xp.where(small, 1.0, th)
    a = xp.where(small, 1.0 - th2 / 6.0, xp.sin(ts) / ts)
    b = xp.where(small, 0.5 - th2 / 24.0, (1.0 - xp.cos(ts)) / (ts * ts))
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    zero = xp.zeros_like(x)
    K = xp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(w.shape[:-1] + (3, 3))
    I = xp.broadcast_to(xp.eye(3), K.shape)
    return I + a[..., None, None] * K + b[..., None, None] * (K @ K)


def matrix_to_rodrigues(R):
    """Axis-angle vectors (..., 3) of rotation matrices (..., 3, 3), angle in [0, pi]."""
    xp = get_array_module(R)
    R = xp.asarray(R, dtype=xp.float64)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {tuple(R.shape)}")
    cos = xp.clip((xp.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    th = xp.arccos(cos)
    v = xp.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = xp.sin(th)
    small = sin < 1e-6
    out = v * xp.where(small, 0.5, th / (2.0 * xp.where(small, 1.0, sin)))[..., None]
    # near pi: axis from the symmetric part  R = -I + 2 a a^T
    near_pi = small & (cos < 0)
    if bool(xp.any(near_pi)):
        S = (R + xp.eye(3)) / 2.0
        d = xp.stack([S[..., 0, 0], S[..., 1, 1], S[..., 2, 2]], -1)
        k = xp.argmax(d, axis=-1)
        col = xp.take_along_axis(S, k[..., None, None].repeat(3, -1), axis=-2)[..., 0, :]
        axis = col / xp.linalg.norm(col, axis=-1, keepdims=True)
        sgn = xp.where((axis * v).sum(-1) < 0, -1.0, 1.0)  # v ~ 2 sin(t) axis keeps the sign
        axis = axis * sgn[..., None]
        out = xp.where(near_pi[..., None], axis * th[..., None], out)
    return out
