"""Coarse stage: fit a 3D morphable model to 68 2D landmarks (Wang et al. 2020, Sec. 3.1, Eq. 1).

Reference: P. Wang, C. Lin, B. Xu, W. Che, Q. Wang, "Low-frequency guided self-supervised learning for
high-fidelity 3D face reconstruction in the wild", ICME 2020.

The energy minimised is Wang et al.'s Eq. (1) with squared norms::

    E(s, R, t, alpha, beta) = sum_k || L_k - P(l_k(alpha, beta | R)) ||^2 / d^2
                              + w_s ||alpha||^2 + w_e ||beta||^2

where ``P`` is the scaled orthographic (weak perspective) projection, ``l_k`` picks the model
vertex of landmark ``k`` (for the sliding jaw contour, the candidate chosen given the current
pose, Wang et al.'s ref. [26]) and ``d`` is the RMS radius of the image landmarks about their centroid,
so that ``w_s`` and ``w_e`` do not depend on image resolution.

Camera convention (the same as eos's): the model's y axis points up, image y points down::

    projected[:, 0] = s * (R v)_x + t_x
    projected[:, 1] = h - (s * (R v)_y + t_y)

``translation = (t_x, t_y)`` is therefore in pixels with a bottom-left origin; ``projected`` is
in ordinary pixel coordinates (top-left origin, y down), like the iBUG ``.pts`` files.

Implementations (the same algorithm and results): a compiled Numba kernel that runs the whole fit
of one image per call (``geomfit.kernels.fitting``; NumPy input, batches split over threads), its
Numba CUDA twin (one GPU thread per image; CuPy input), both registered as ``"landmark_fit"`` in
:data:`geomfit.backend.KERNELS`, and the vectorised array path below in which all images of a batch
advance together in NumPy or CuPy array operations (``fast=False``; the reference the kernels are
tested against).

Algorithm:

1. closed-form affine camera fit to the mean shape's fixed landmarks, projected to the nearest
   scaled orthographic camera (SVD);
2. ``n_alternations`` rounds of: choose contour vertices, linear solve for identity and expression
   given the pose, affine re-fit of the pose given the shape;
3. Levenberg-Marquardt on all parameters together (rotation as an incremental axis-angle on the
   current ``R``, log-scale, translation, coefficients) with analytic Jacobians; the jaw contour
   correspondences are re-chosen at every evaluated point, so the cost that LM accepts or rejects
   is the true (minimum over candidates) objective.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np

from . import backend, ibug
from .backend import asnumpy, get_array_module
from .camera import rodrigues, scaled_orthographic
from .model import MorphableModel

__all__ = ["LandmarkFit", "FitOptions", "fit_landmarks", "fit_landmarks_multi"]

N_LANDMARKS = ibug.N_LANDMARKS
# 1-based iBUG numbers, the keys of ``model.landmarks`` (eos's mapping files)
_JAW_RIGHT = tuple(ibug.number(i) for i in ibug.CONTOUR_RIGHT)  # iBUG 1-8: the subject's right contour
_JAW_LEFT = tuple(ibug.number(i) for i in ibug.CONTOUR_LEFT)  # iBUG 10-17: the left contour
_CONTOUR_IBUG = _JAW_RIGHT + _JAW_LEFT


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitOptions:
    """The tuning knobs of :func:`fit_landmarks` and :func:`fit_landmarks_multi` in one object.

    ``fit_landmarks(model, L, size, options=FitOptions(max_iter=20))`` is the same as
    ``fit_landmarks(model, L, size, max_iter=20)``; the fields and their defaults are the keyword
    arguments documented on :func:`fit_landmarks`. ``options.replace(w_id=0.0)`` gives a modified copy.

    Examples
    --------
    >>> FitOptions().replace(max_iter=10).max_iter
    10
    """

    w_id: float = 1e-3
    w_exp: float = 1e-3
    n_id: Optional[int] = None
    n_exp: Optional[int] = None
    n_alternations: int = 2
    max_iter: int = 50
    ftol: float = 1e-6
    xtol: float = 1e-8
    gtol: float = 1e-12
    w_init: float = 1e-3

    def replace(self, **changes) -> "FitOptions":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


_OPTION_FIELDS = frozenset(f.name for f in fields(FitOptions))


def _keywords_or_options(fn):
    """Refuse a call that passes ``options`` together with any of the knobs as keywords.

    The rule is "one or the other": every keyword the caller wrote counts, whatever its value. The
    wrapped function's defaults cannot tell ``max_iter=50`` (written) from ``max_iter`` left out, so
    the check looks at the keywords of the call itself, not at values."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("options") is not None:
            both = sorted(_OPTION_FIELDS.intersection(kwargs))
            if both:
                raise ValueError(f"{fn.__name__}: {', '.join(both)} given both as keywords and through options; "
                                 "use one")
        return fn(*args, **kwargs)

    return wrapper


def _resolve_options(options, given: dict, where: str) -> FitOptions:
    """``options``, or the keyword knobs ``given`` as FitOptions (a call with both is refused by
    :func:`_keywords_or_options` before it gets here)."""
    if options is None:
        return FitOptions(**given)
    if not isinstance(options, FitOptions):
        raise TypeError(f"{where}: options must be a FitOptions, got {type(options).__name__}")
    return options


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class LandmarkFit:
    """Result of :func:`fit_landmarks` / :func:`fit_landmarks_multi`.

    For a single image every array has the shapes below; a batch of B images adds a leading B axis
    to every field (``iterations``, ``converged``, ``scale``, ``rmse_px`` become (B,) arrays and
    ``cost_history`` a (B, T) array padded with NaN after an image stopped). For
    :func:`fit_landmarks_multi` ``id_coeffs`` is the shared (K,) vector and the per-photo fields
    have a leading photo axis; ``iterations``/``converged``/``cost_history`` describe the joint
    problem.

    Attributes
    ----------
    id_coeffs : ndarray, shape (K,)
        Identity coefficients in standard-deviation units.
    exp_coeffs : ndarray, shape (E,)
        Expression coefficients.
    rotation : ndarray, shape (3, 3)
        Rotation from model space to camera space (model y up).
    scale : float
        Pixels per model unit.
    translation : ndarray, shape (2,)
        ``(t_x, t_y)`` in pixels, bottom-left origin (see the module docstring).
    rmse_px : float
        RMS over the used landmarks (fixed and contour) of the 2D residual, in pixels.
    iterations : int
        Levenberg-Marquardt iterations taken (accepted and rejected steps).
    converged : bool
        True when a convergence test (relative cost decrease, step size, gradient, zero cost)
        was met before ``max_iter``; never True for a non-finite result.
    cost_history : ndarray
        Normalised cost (the energy above) at the start and after every LM iteration (of each
        phase, see Notes of :func:`fit_landmarks`; the start-up phase uses the start-up weights).
    landmark_vertices : ndarray of int, shape (68,)
        Model vertex used for each iBUG landmark (-1: not used, e.g. missing or unmapped).
    contour_vertices : ndarray of int, shape (16,)
        The chosen contour vertices for iBUG 1-8 and 10-17 (-1 where not used).
    image_size : ndarray, shape (2,)
        ``(h, w)``.
    vertices : ndarray, shape (N, 3)
        Fitted shape in model space (computed on first access).
    projected : ndarray, shape (N, 2)
        Every vertex in pixel coordinates, top-left origin, y down (computed on first access).
    """

    id_coeffs: Any
    exp_coeffs: Any
    rotation: Any
    scale: Any
    translation: Any
    rmse_px: Any
    iterations: Any
    converged: Any
    cost_history: Any
    landmark_vertices: Any
    contour_vertices: Any
    image_size: Any
    model: MorphableModel = field(repr=False, default=None)

    @cached_property
    def vertices(self):
        """Fitted shape(s) in model space, (N, 3) or (B, N, 3)."""
        xp = get_array_module(self.exp_coeffs, self.id_coeffs)
        idc, exc = self.id_coeffs, self.exp_coeffs
        if idc.ndim == 1 and exc.ndim == 2:  # multi-image: shared identity
            idc = xp.broadcast_to(idc, (exc.shape[0], idc.shape[0]))
        return self.model.shape(idc, exc)

    @cached_property
    def projected(self):
        """Every vertex projected to pixels (top-left origin, y down), (N, 2) or (B, N, 2)."""
        return project(self.vertices, self.rotation, self.scale, self.translation, self.image_size)

    @property
    def batched(self) -> bool:
        return np.ndim(asnumpy(self.scale)) > 0


def project(vertices, rotation, scale, translation, image_size):
    """Scaled orthographic projection to pixel coordinates (top-left origin, y down).

    ``x = s (R v)_x + t_x``, ``y = h - (s (R v)_y + t_y)`` with the model's y axis up: the first two
    columns of :func:`geomfit.camera.scaled_orthographic`, with the height taken from ``image_size``.

    Parameters
    ----------
    vertices : ndarray, shape (..., N, 3)
    rotation : ndarray, shape (..., 3, 3)
    scale : float or ndarray, shape (...)
    translation : ndarray, shape (..., 2)
    image_size : ndarray, shape (..., 2)
        ``(h, w)``.

    Returns
    -------
    ndarray, shape (..., N, 2)
    """
    xp = get_array_module(vertices, rotation)
    h = xp.asarray(image_size, dtype=xp.asarray(rotation).dtype)[..., 0]
    return scaled_orthographic(vertices, rotation, scale, translation, h, depth=False)


# ------------------------------------------------------------------------------------------------
# Model preparation (cached per model, sizes and device)
# ------------------------------------------------------------------------------------------------
class _Prep:
    """Landmark rows of the model, arranged for the solver."""

    def __init__(self, model: MorphableModel, n_id: int, n_exp: int, xp):
        if not isinstance(model, MorphableModel):
            raise TypeError(f"model must be a geomfit MorphableModel, got {type(model).__name__}")
        if not model.landmarks:
            raise ValueError("model has no landmark mapping (model.landmarks is empty): cannot fit landmarks")
        keys, verts = model.landmark_arrays()
        if keys.min() < 1 or keys.max() > N_LANDMARKS:
            raise ValueError(f"model.landmarks keys must be iBUG numbers 1..68, got {keys.min()}..{keys.max()}")
        right = [int(v) for v in (model.contours or {}).get("right", [])]
        left = [int(v) for v in (model.contours or {}).get("left", [])]
        n = model.n_vertices
        for nm, c in (("right", right), ("left", left)):
            if any(not 0 <= v < n for v in c):
                raise ValueError(f"model.contours[{nm!r}] has vertex indices outside [0, {n})")
        fixed = set(int(k) for k in keys)
        jaw_r = [i for i in _JAW_RIGHT if i not in fixed] if right else []
        jaw_l = [i for i in _JAW_LEFT if i not in fixed] if left else []
        self.K, self.E = n_id, n_exp
        self.P = n_id + n_exp
        self.Mf, self.Mr, self.Ml = len(keys), len(jaw_r), len(jaw_l)
        self.M = self.Mf + self.Mr + self.Ml
        self.nr, self.nl = len(right), len(left)
        # order of residual landmarks: fixed, right jaw, left jaw (0-based iBUG indices)
        self.ibug0 = np.concatenate([keys - 1, np.array(jaw_r, dtype=np.int64) - 1,
                                     np.array(jaw_l, dtype=np.int64) - 1]).astype(np.int64)
        # vertex slots: fixed landmark vertices, right candidates, left candidates
        self.slot_vertex = np.concatenate([verts, np.array(right, dtype=np.int64),
                                           np.array(left, dtype=np.int64)]).astype(np.int64)
        sv = self.slot_vertex
        mean = np.asarray(asnumpy(model.mean), dtype=np.float64)[sv]
        idb = np.asarray(asnumpy(model.id_basis[:, :, :n_id]), dtype=np.float64)[sv]
        exb = np.asarray(asnumpy(model.exp_basis[:, :, :n_exp]), dtype=np.float64)[sv]
        basis = np.concatenate([mean[:, :, None], idb, exb], axis=2)  # (Nv, 3, 1+P)
        if not np.isfinite(basis).all():
            raise ValueError(f"MorphableModel({model.name}): mean or bases are not finite at the landmark vertices")
        Cf = basis[: self.Mf, :, 1:]
        G = np.einsum("kip,kjq->ijpq", Cf, Cf)  # (3, 3, P, P)
        self.xp = xp
        self.basis = xp.asarray(basis)
        self.basis_flat_T = xp.asarray(np.ascontiguousarray(basis.transpose(2, 0, 1).reshape(1 + self.P, -1)))
        self.Call_T = xp.asarray(np.ascontiguousarray(basis[:, :, 1:].transpose(1, 0, 2).reshape(3, -1)))
        self.G9 = xp.asarray(G.reshape(9, self.P * self.P))
        self.Gtr = xp.asarray(G[0, 0] + G[1, 1] + G[2, 2])
        self.mean_fixed = xp.asarray(mean[: self.Mf])
        # tables of the compiled CPU kernel (kernels/fitting.py), host memory
        self.k_mean = np.ascontiguousarray(mean)
        self.k_C = np.ascontiguousarray(basis[:, :, 1:])
        self.k_G = np.ascontiguousarray(G)
        # packed upper triangles (row-major) of G_00, G_11, G_22, G_01 + G_10, G_02 + G_20, G_12 + G_21
        iu = np.triu_indices(self.P)
        self.k_Gp = np.ascontiguousarray(np.stack([G[0, 0][iu], G[1, 1][iu], G[2, 2][iu], (G[0, 1] + G[1, 0])[iu],
                                                   (G[0, 2] + G[2, 0])[iu], (G[1, 2] + G[2, 1])[iu]]))


def _prep(model: MorphableModel, n_id, n_exp, xp) -> _Prep:
    if not isinstance(model, MorphableModel):
        raise TypeError(f"model must be a geomfit MorphableModel, got {type(model).__name__}")
    K, E = model.n_id, model.n_exp
    n_id = K if n_id is None else int(n_id)
    n_exp = E if n_exp is None else int(n_exp)
    if not 0 <= n_id <= K:
        raise ValueError(f"n_id={n_id} outside [0, {K}] (the model has {K} identity components)")
    if not 0 <= n_exp <= E:
        raise ValueError(f"n_exp={n_exp} outside [0, {E}] (the model has {E} expression components)")
    key = (n_id, n_exp, xp.__name__, id(model.mean), id(model.id_basis), id(model.exp_basis),
           tuple(sorted(model.landmarks.items())) if isinstance(model.landmarks, dict) else None,
           tuple((k, tuple(v)) for k, v in sorted((model.contours or {}).items())))
    cache = model.__dict__.setdefault("_geomfit_fit_cache", {})
    p = cache.get(key)
    if p is None:
        p = _Prep(model, n_id, n_exp, xp)
        cache.clear()
        cache[key] = p
    return p


# ------------------------------------------------------------------------------------------------
# Small batched helpers
# ------------------------------------------------------------------------------------------------
def _solve(A, b, xp):
    """Batched ``solve(A, b)`` that never raises: systems with non-finite entries give NaN, exactly
    singular ones fall back to the pseudo-inverse."""
    fa = xp.isfinite(A).all(axis=(-2, -1))
    fb = xp.isfinite(b).all(axis=tuple(range(fa.ndim, b.ndim)))
    bad = ~(fa & fb)
    if bool(bad.any()):
        eye = xp.eye(A.shape[-1])
        A = xp.where(bad[..., None, None], eye, A)
        b = xp.where(bad.reshape(bad.shape + (1,) * (b.ndim - bad.ndim)), 0.0, b)
    try:
        x = xp.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        x = xp.linalg.pinv(A) @ b
    if bool(bad.any()):
        x = xp.where(bad.reshape(bad.shape + (1,) * (x.ndim - bad.ndim)), xp.nan, x)
    return x


def _ortho_from_affine(A, xp):
    """Nearest scaled-orthographic camera to an affine 2x4 camera given as (B, 4, 2)."""
    M = xp.swapaxes(A[:, :3, :], 1, 2)  # (B, 2, 3)
    M = xp.where(xp.isfinite(M), M, 0.0)  # a broken start fails later as "not converged", not here
    U, S, Vh = xp.linalg.svd(M, full_matrices=False)
    R2 = U @ Vh  # (B, 2, 3) orthonormal rows
    r3 = xp.cross(R2[:, 0], R2[:, 1])
    R = xp.concatenate([R2, r3[:, None, :]], axis=1)
    s = S.mean(1)
    return R, s, S


def _affine_pose(X, L, w, xp):
    """Weighted least-squares affine camera from 3D points X (B|1, M, 3) to 2D L (B, M, 2)."""
    B = L.shape[0]
    Xh = xp.concatenate([xp.broadcast_to(X, (B,) + X.shape[-2:]), xp.ones((B, X.shape[-2], 1))], axis=2)
    Xw = Xh * w[:, :, None]
    N = xp.swapaxes(Xw, 1, 2) @ Xh + 1e-12 * xp.eye(4)
    A = _solve(N, xp.swapaxes(Xw, 1, 2) @ L, xp)
    R, s, S = _ortho_from_affine(A, xp)
    # translation re-solved for the scaled orthographic camera
    u = xp.broadcast_to(X, (B,) + X.shape[-2:]) @ xp.swapaxes(R[:, :2], 1, 2)
    t = ((L - s[:, None, None] * u) * w[:, :, None]).sum(1) / w.sum(1)[:, None]
    return R, s, t, S


# ------------------------------------------------------------------------------------------------
# Residuals, contour choice, normal equations
# ------------------------------------------------------------------------------------------------
def _evaluate(p: _Prep, L, w, R, s, t, coef, reg):
    """Cost, weighted residuals (B, M, 2), rotated landmark vertices (B, M, 3), slots (B, M)."""
    xp = p.xp
    B = L.shape[0]
    c1 = xp.concatenate([xp.ones((B, 1)), coef], axis=1)
    V = (c1 @ p.basis_flat_T).reshape(B, -1, 3)  # (B, Nv, 3)
    U = V @ xp.swapaxes(R, 1, 2)
    q = s[:, None, None] * U[:, :, :2] + t[:, None, :]
    Mf, Mr, Ml = p.Mf, p.Mr, p.Ml
    parts = [xp.broadcast_to(xp.arange(Mf), (B, Mf))]
    if Mr:
        qc = q[:, Mf: Mf + p.nr]
        d2 = ((L[:, Mf: Mf + Mr, None, :] - qc[:, None, :, :]) ** 2).sum(-1)
        parts.append(xp.argmin(d2, axis=2) + Mf)
    if Ml:
        qc = q[:, Mf + p.nr:]
        d2 = ((L[:, Mf + Mr:, None, :] - qc[:, None, :, :]) ** 2).sum(-1)
        parts.append(xp.argmin(d2, axis=2) + Mf + p.nr)
    sel = xp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    qs = xp.take_along_axis(q, sel[:, :, None], axis=1)
    Us = xp.take_along_axis(U, sel[:, :, None], axis=1)
    r = (qs - L) * w[:, :, None]
    cost = (r * r).sum((1, 2)) + (coef * coef) @ reg
    return cost, r, Us, sel


def _jacobian(p: _Prep, R, s, Us, sel, w):
    """Weighted Jacobian blocks in coordinate-major layout: pose (B, 2, M, 6) and coefficients
    (B, 2, M, P) (row (c, k) is image coordinate c of landmark k), plus the unweighted, unscaled
    coefficient rows of the fixed landmarks (B, 2, Mf, P)."""
    xp = p.xp
    B = R.shape[0]
    Mf, P, M = p.Mf, p.P, p.M
    # every slot's basis rows rotated by R in one BLAS call: (B*2, 3) @ (3, Nv*P)
    A = (R[:, :2, :].reshape(B * 2, 3) @ p.Call_T).reshape(B, 2, -1, P)
    Jf = A[:, :, :Mf]
    if M > Mf:
        Jc = A[xp.arange(B)[:, None, None], xp.arange(2)[None, :, None], sel[:, None, Mf:]]
        Js = xp.concatenate([Jf, Jc], axis=2)
    else:
        Js = Jf
    Js = Js * (s[:, None] * w)[:, None, :, None]
    su = Us * (s[:, None, None] * w[:, :, None])  # (B, M, 3)
    Jp = xp.zeros((B, 2, M, 6))
    Jp[:, 0, :, 1] = su[..., 2]
    Jp[:, 0, :, 2] = -su[..., 1]
    Jp[:, 0, :, 3] = su[..., 0]
    Jp[:, 0, :, 4] = w
    Jp[:, 1, :, 0] = -su[..., 2]
    Jp[:, 1, :, 2] = su[..., 0]
    Jp[:, 1, :, 3] = su[..., 1]
    Jp[:, 1, :, 5] = w
    return Jp, Js, Jf


def _normal_equations(p: _Prep, R, s, coef, r, Us, sel, w, reg, fast=True):
    """Gauss-Newton system H (B, 6+P, 6+P) and gradient g (B, 6+P) (cost = ||r||^2 + coef^T diag(reg) coef,
    H = J^T J + diag(0, reg), g = J^T r + diag(0, reg) coef)."""
    xp = p.xp
    B = R.shape[0]
    M, Mf, P = p.M, p.Mf, p.P
    Jp, Js, Jf = _jacobian(p, R, s, Us, sel, w)
    Jp2 = Jp.reshape(B, 2 * M, 6)
    Js2 = Js.reshape(B, 2 * M, P)
    rf = xp.swapaxes(r, 1, 2).reshape(B, 2 * M, 1)
    JpT = xp.swapaxes(Jp2, 1, 2)
    Hpp = JpT @ Jp2
    Hps = JpT @ Js2
    gp = (JpT @ rf)[:, :, 0]
    gs = (xp.swapaxes(Js2, 1, 2) @ rf)[:, :, 0] + coef * reg
    if fast:
        # fixed landmarks: sum_k C_k^T R^T Pi^T Pi R C_k = sum_ij (I - r3 r3^T)_ij G_ij (precomputed G)
        r3 = R[:, 2, :]
        rr = (r3[:, :, None] * r3[:, None, :]).reshape(B, 9)
        Hss = (p.Gtr[None] - (rr @ p.G9).reshape(B, P, P)) * (s * s)[:, None, None]
        miss = w[:, :Mf] == 0
        nmiss = int(miss.sum(1).max()) if Mf else 0
        if nmiss:
            order = xp.argsort(~miss, axis=1, kind="stable")[:, :nmiss]  # missing ones first
            valid = xp.take_along_axis(miss, order, axis=1)
            Jm = xp.take_along_axis(Jf, order[:, None, :, None], axis=2)
            Jm = (Jm * (s[:, None] * valid)[:, None, :, None]).reshape(B, 2 * nmiss, P)
            Hss = Hss - xp.swapaxes(Jm, 1, 2) @ Jm
        if M > Mf:
            Jc = Js[:, :, Mf:].reshape(B, 2 * (M - Mf), P)
            Hss = Hss + xp.swapaxes(Jc, 1, 2) @ Jc
    else:
        Hss = xp.swapaxes(Js2, 1, 2) @ Js2
    idx = xp.arange(P)
    Hss[:, idx, idx] += reg
    H = xp.empty((B, 6 + P, 6 + P))
    H[:, :6, :6] = Hpp
    H[:, :6, 6:] = Hps
    H[:, 6:, :6] = xp.swapaxes(Hps, 1, 2)
    H[:, 6:, 6:] = Hss
    g = xp.concatenate([gp, gs], 1)
    return H, g


def _apply_step(R, s, t, coef, d, xp):
    Rn = rodrigues(d[:, :3]) @ R
    sn = s * xp.exp(d[:, 3])
    tn = t + d[:, 4:6]
    cn = coef + d[:, 6:]
    return Rn, sn, tn, cn


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------
def _prepare_landmarks(landmarks, image_size, visible, xp, p: _Prep):
    lm = xp.asarray(landmarks)
    if lm.dtype.kind not in "fiu":
        raise TypeError(f"landmarks must be a numeric array, got dtype {lm.dtype}")
    lm = lm.astype(xp.float64)
    single = lm.ndim == 2
    if single:
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[2] != 2:
        raise ValueError(f"landmarks must have shape (68, 2) or (B, 68, 2), got {tuple(landmarks.shape)}")
    if lm.shape[1] != N_LANDMARKS:
        raise ValueError(f"expected {N_LANDMARKS} iBUG landmarks, got {lm.shape[1]}")
    B = lm.shape[0]
    if B == 0:
        raise ValueError("empty batch of landmarks")
    if xp.isinf(lm).any():
        raise ValueError("landmarks contain inf")
    vis = ~xp.isnan(lm).any(axis=2)
    if visible is not None:
        v = xp.asarray(visible)
        if v.shape not in ((N_LANDMARKS,), (B, N_LANDMARKS)) or (single and v.shape != (N_LANDMARKS,)):
            raise ValueError(f"visible must have shape {(N_LANDMARKS,) if single else (B, N_LANDMARKS)}, got {v.shape}")
        vis = vis & v.astype(bool)
    hw = xp.asarray(image_size, dtype=xp.float64)
    if hw.shape == (2,):
        hw = xp.broadcast_to(hw, (B, 2))
    if hw.shape != (B, 2):
        raise ValueError(f"image_size must be (h, w) or shape ({B}, 2), got shape {hw.shape}")
    if not bool(xp.all(hw > 0)) or not bool(xp.all(xp.isfinite(hw))):
        raise ValueError("image_size must be positive (h, w)")
    # landmarks in model-ordered residual layout
    Lr = lm[:, p.ibug0, :]
    w = vis[:, p.ibug0].astype(xp.float64)
    nfix = w[:, : p.Mf].sum(1)
    bad = asnumpy(nfix < 4)
    if bad.any():
        which = np.nonzero(bad)[0][:10].tolist()
        raise ValueError(f"fewer than 4 visible landmarks with fixed model vertices in image(s) {which}: "
                         f"cannot fit (all NaN or masked?)")
    Lz = xp.where(w[:, :, None] > 0, Lr, 0.0)
    # the landmarks must lie in the image
    h, wd = hw[:, 0], hw[:, 1]
    outside = ((Lz[..., 0] < 0) | (Lz[..., 0] > wd[:, None]) | (Lz[..., 1] < 0) | (Lz[..., 1] > h[:, None])) & (w > 0)
    bad = asnumpy(outside.any(1))
    if bad.any():
        which = np.nonzero(bad)[0][:10].tolist()
        raise ValueError(f"landmarks outside the image of size (h, w) in image(s) {which}: check image_size "
                         f"(h, w) order and that landmarks are pixel coordinates")
    # to model orientation (y up) and normalised units
    Ly = xp.stack([Lz[..., 0], h[:, None] - Lz[..., 1]], axis=-1)
    nw = w.sum(1)
    c = (Ly * w[:, :, None]).sum(1) / nw[:, None]
    D = (Ly - c[:, None, :]) * w[:, :, None]
    # 2x2 covariance [[a, b], [b, e]] in closed form: trace, determinant, largest eigenvalue
    a = (D[..., 0] * D[..., 0]).sum(1) / nw
    b = (D[..., 0] * D[..., 1]).sum(1) / nw
    e = (D[..., 1] * D[..., 1]).sum(1) / nw
    tr = a + e
    ev_max = 0.5 * tr + xp.sqrt(0.25 * (a - e) ** 2 + b * b)
    # smallest eigenvalue <= 1e-6 * largest  <=>  det <= 1e-6 * largest^2
    bad = asnumpy((ev_max <= 0) | (a * e - b * b <= 1e-6 * ev_max * ev_max))
    if bad.any():
        which = np.nonzero(bad)[0][:10].tolist()
        raise ValueError(f"landmarks are collinear (or coincide) in image(s) {which}: cannot fit a pose")
    d = xp.sqrt(tr)
    Ln = (Ly - c[:, None, :]) / d[:, None, None] * w[:, :, None]
    return single, Ln, w, c, d, hw


def _check_reg(w_id, w_exp):
    for nm, v in (("w_id", w_id), ("w_exp", w_exp)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{nm} must be a finite non-negative number, got {v}")


# ------------------------------------------------------------------------------------------------
# Initialisation: affine pose, then alternate linear shape solves and pose re-fits
# ------------------------------------------------------------------------------------------------
def _initialise(p: _Prep, Ln, w, reg, n_alternations, xp):
    B = Ln.shape[0]
    Mf = p.Mf
    R, s, t, S = _affine_pose(p.mean_fixed[None], Ln[:, :Mf], w[:, :Mf], xp)
    coef = xp.zeros((B, p.P))
    # the contour correspondences need a good pose and shape: the alternation uses only the
    # fixed landmarks; the jaw contour joins in Levenberg-Marquardt
    w = w * xp.asarray((np.arange(p.M) < Mf).astype(np.float64))
    for _ in range(n_alternations):
        if p.P:
            cost, r, Us, sel = _evaluate(p, Ln, w, R, s, t, coef, reg)
            H, g = _normal_equations(p, R, s, coef, r, Us, sel, w, reg)
            Hs, gs = H[:, 6:, 6:], g[:, 6:]
            Hs = Hs + 1e-10 * xp.eye(p.P)
            coef = coef - _solve(Hs, gs[:, :, None], xp)[:, :, 0]
        cost, r, Us, sel = _evaluate(p, Ln, w, R, s, t, coef, reg)
        c1 = xp.concatenate([xp.ones((B, 1)), coef], axis=1)
        X = (c1 @ p.basis_flat_T).reshape(B, -1, 3)
        Xs = xp.take_along_axis(X, sel[:, :, None], axis=1)
        R, s, t, S = _affine_pose(Xs, Ln, w, xp)
    return R, s, t, coef


# ------------------------------------------------------------------------------------------------
# Levenberg-Marquardt, independent problems
# ------------------------------------------------------------------------------------------------
def _lm_batch(p: _Prep, Ln, w, R, s, t, coef, reg, max_iter, ftol, xtol, gtol, lam0, fast, xp):
    B = Ln.shape[0]
    cost, r, Us, sel = _evaluate(p, Ln, w, R, s, t, coef, reg)
    H, g = _normal_equations(p, R, s, coef, r, Us, sel, w, reg, fast)
    lam = xp.full(B, lam0)
    nu = xp.full(B, 2.0)
    done = xp.zeros(B, dtype=bool)
    conv = xp.zeros(B, dtype=bool)
    iters = xp.zeros(B, dtype=xp.int64)
    hist = [cost.copy()]
    npar = 6 + p.P
    ar = xp.arange(npar)
    # tiny-cost test: exact fits stop once the residual reaches round-off
    tiny = 1e-26
    stop0 = (xp.abs(g).max(1) <= gtol) | (cost <= tiny)
    conv |= stop0 & xp.isfinite(cost)
    done |= stop0 | ~xp.isfinite(cost)
    for _ in range(max_iter):
        act = xp.nonzero(~done)[0]
        if act.size == 0:
            break
        was_done = done.copy()
        Ha, ga, la = H[act], g[act], lam[act]
        Dg = xp.maximum(Ha[:, ar, ar], 1e-12)
        A = Ha.copy()
        A[:, ar, ar] += la[:, None] * Dg
        d = -_solve(A, ga[:, :, None], xp)[:, :, 0]
        Ra, sa, ta, ca = R[act], s[act], t[act], coef[act]
        Rn, sn, tn, cn = _apply_step(Ra, sa, ta, ca, d, xp)
        La, wa = Ln[act], w[act]
        cn_cost, rn, Un, seln = _evaluate(p, La, wa, Rn, sn, tn, cn, reg)
        Fa = cost[act]
        pred = (d[:, None, :] @ Ha @ d[:, :, None])[:, 0, 0] + 2 * la * (d * d * Dg).sum(1)
        fin = xp.isfinite(cn_cost)
        acc = fin & (cn_cost < Fa)
        rho = xp.where(pred > 0, (Fa - cn_cost) / xp.where(pred > 0, pred, 1.0), 0.0)
        iters[act] += 1
        # damping (Nielsen's rule)
        fac = xp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        la_new = xp.where(acc, la * fac, la * nu[act])
        nu_new = xp.where(acc, 2.0, nu[act] * 2.0)
        lam[act] = la_new
        nu[act] = nu_new
        # convergence tests on accepted steps
        theta = xp.concatenate([xp.log(sa)[:, None], ta, ca], 1)
        dn = xp.sqrt((d * d).sum(1))
        small_step = dn <= xtol * (xtol + xp.sqrt((theta * theta).sum(1)))
        rel_dec = (Fa - cn_cost) <= ftol * Fa
        c_ok = acc & (rel_dec | small_step | (cn_cost <= tiny))
        # a rejected, vanishing step also ends the search: nothing left to gain at this precision
        c_rej = ~acc & fin & small_step
        giveup = la_new > 1e16
        aidx = act[acc]
        if aidx.size:
            ka = xp.nonzero(acc)[0]
            R[aidx], s[aidx], t[aidx], coef[aidx] = Rn[ka], sn[ka], tn[ka], cn[ka]
            cost[aidx] = cn_cost[ka]
            Hn, gn = _normal_equations(p, Rn[ka], sn[ka], cn[ka], rn[ka], Un[ka], seln[ka], wa[ka], reg, fast)
            H[aidx], g[aidx] = Hn, gn
            c_ok[ka] |= xp.abs(gn).max(1) <= gtol
        newly = c_ok | c_rej
        conv[act] |= newly
        done[act] |= newly | giveup
        hist.append(xp.where(was_done, xp.nan, cost))
    conv &= xp.isfinite(cost)
    hist = xp.stack(hist, axis=1)
    return R, s, t, coef, cost, conv, iters, hist


# ------------------------------------------------------------------------------------------------
# Compiled CPU path (kernels/fitting.py): one image per thread, same algorithm
# ------------------------------------------------------------------------------------------------
_KERNELS = []


def _kernels():
    """The Numba kernel module, or None where Numba cannot be imported."""
    if not _KERNELS:
        try:
            from .kernels import fitting as kf
        except ImportError:  # pragma: no cover - numba is a dependency
            kf = None
        _KERNELS.append(kf)
    return _KERNELS[0]


_EXECUTOR = {}


def _n_threads():
    """Threads for a batch: Numba's setting (NUMBA_NUM_THREADS / numba.set_num_threads)."""
    try:
        import numba

        return max(1, int(numba.get_num_threads()))
    except Exception:  # pragma: no cover
        return 1


def _executor(n):
    ex = _EXECUTOR.get(n)
    if ex is None:
        from concurrent.futures import ThreadPoolExecutor

        ex = _EXECUTOR[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="geomfit-fit")
    return ex


def _trim_hist(h, it):
    T = int(it.max()) + 1 if it.size else 1
    return h[:, :T]


def _fit_kernel(p: _Prep, Ln, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, two_phase):
    kf = _kernels()
    B, M = w.shape
    P = p.P
    Ln = np.ascontiguousarray(Ln, dtype=np.float64)
    w = np.ascontiguousarray(w, dtype=np.float64)
    R = np.empty((B, 3, 3))
    t = np.empty((B, 2))
    coef = np.empty((B, P))
    hist0 = np.full((B, max_iter + 1), np.nan)
    hist1 = np.full((B, max_iter + 1), np.nan)
    sel = np.empty((B, M), dtype=np.int64)
    s = np.empty(B)
    cost = np.empty(B)
    conv = np.empty(B, dtype=np.bool_)
    it0 = np.zeros(B, dtype=np.int64)
    it1 = np.zeros(B, dtype=np.int64)
    rss = np.empty(B)
    # small batches stay on the calling thread: waking the thread pool costs more than it gains
    reg = np.ascontiguousarray(reg, dtype=np.float64)
    reg_init = np.ascontiguousarray(reg_init, dtype=np.float64)

    def run(a, b):  # images a..b-1; the kernel releases the GIL
        kf.fit_batch(p.k_mean, p.k_C, p.k_Gp, p.Mf, p.Mr, p.Ml, p.nr, p.nl, Ln[a:b], w[a:b], reg, reg_init, n_alt,
                     max_iter, ftol, xtol, gtol, 1e-3, two_phase, R[a:b], t[a:b], coef[a:b], hist0[a:b],
                     hist1[a:b], sel[a:b], s[a:b], cost[a:b], conv[a:b], it0[a:b], it1[a:b], rss[a:b])

    nthr = _n_threads() if B >= 16 else 1
    with np.errstate(all="ignore"):
        if nthr == 1:  # small batches stay on the calling thread
            run(0, B)
        else:  # contiguous chunks, a few per thread: a thread that gets less CPU takes fewer chunks
            nchunk = max(nthr, min(4 * nthr, B // 32))
            edges = np.linspace(0, B, nchunk + 1).astype(int)
            list(_executor(nthr).map(run, edges[:-1], edges[1:]))
    hist = _trim_hist(hist1, it1)
    if two_phase:
        hist = np.concatenate([_trim_hist(hist0, it0), hist], axis=1)
    return R, s, t, coef, cost, conv, it0 + it1, hist, rss, sel


def _fit_cuda(p: _Prep, Ln, w, reg, reg_init, n_alt, max_iter, ftol, xtol, gtol, two_phase):
    """The CUDA twin of :func:`_fit_kernel` (one GPU thread per image); results on the device of ``Ln``."""
    from .kernels import fitting as kf

    xp = get_array_module(Ln)
    outs = kf.fit_batch_cuda(p.k_mean, p.k_C, p.k_G, p.Mf, p.Mr, p.Ml, p.nr, p.nl, Ln, w, asnumpy(reg),
                             asnumpy(reg_init), n_alt, max_iter, ftol, xtol, gtol, 1e-3, two_phase)
    R, t, coef, hist0, hist1, sel, s, cost, conv, it0, it1, rss = outs
    hist = _trim_hist(hist1, it1)
    if two_phase:
        hist = xp.concatenate([_trim_hist(hist0, it0), hist], axis=1)
    return R, s, t, coef, cost, conv.astype(bool), it0 + it1, hist, rss, sel


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _finish(p, model, R, s, t, coef, cost, conv, iters, hist, Ln, w, c, d, hw, single, xp, multi_id=None,
            final=None):
    B = Ln.shape[0]
    # residual in pixels with the final correspondences
    if final is None:
        _, r, _, sel = _evaluate(p, Ln, w, R, s, t, coef, xp.zeros(p.P))
        rss = (r * r).sum((1, 2))
    else:
        rss, sel = final
    nused = w.sum(1)
    rmse = xp.sqrt(rss / nused) * d
    slot_v = xp.asarray(p.slot_vertex)
    lv = xp.full((B, N_LANDMARKS), -1, dtype=xp.int64)
    vsel = xp.where(w > 0, slot_v[sel], -1)
    lv[:, xp.asarray(p.ibug0)] = vsel
    cidx = xp.asarray(np.array(_CONTOUR_IBUG) - 1)
    cv = lv[:, cidx]
    scale = s * d
    trans = t * d[:, None] + c
    idc = coef[:, : p.K] if multi_id is None else multi_id
    exc = coef[:, p.K:]
    if single:
        hist1 = hist[0]
        hist1 = hist1[~xp.isnan(hist1)]
        return LandmarkFit(idc[0], exc[0], R[0], float(scale[0]), trans[0], float(rmse[0]), int(iters[0]),
                           bool(conv[0]), hist1, lv[0], cv[0], hw[0], model)
    return LandmarkFit(idc, exc, R, scale, trans, rmse, iters, conv, hist, lv, cv, hw, model)


@_keywords_or_options
def fit_landmarks(model: MorphableModel, landmarks, image_size, *, visible=None, w_id: float = 1e-3,
                  w_exp: float = 1e-3, n_id: Optional[int] = None, n_exp: Optional[int] = None,
                  n_alternations: int = 2, max_iter: int = 50, ftol: float = 1e-6, xtol: float = 1e-8,
                  gtol: float = 1e-12, w_init: float = 1e-3, fast: bool = True,
                  engine: str = "auto", options: Optional[FitOptions] = None) -> LandmarkFit:
    """Fit pose, identity and expression of a morphable model to 2D landmarks (Wang et al. 2020, Eq. 1).

    Parameters
    ----------
    model : MorphableModel
        With ``landmarks`` (iBUG number -> vertex) and, for the sliding jaw contour,
        ``contours = {"right": [...], "left": [...]}`` candidate vertices.
    landmarks : ndarray, shape (68, 2) or (B, 68, 2)
        iBUG-68 landmarks in pixels (top-left origin, y down). NaN rows are ignored. A batch is
        solved vectorised: all problems advance together. NumPy or CuPy input.
    image_size : (h, w) or ndarray of shape (B, 2)
        Image height and width in pixels (the y flip uses ``h``).
    visible : ndarray of bool, shape (68,) or (B, 68), optional
        Extra visibility mask; False landmarks are ignored.
    w_id, w_exp : float
        Regulariser weights ``w_s``, ``w_e`` of Eq. 1. The data term is normalised by the RMS
        radius ``d`` of the landmarks, so a weight ``w`` corresponds to landmark noise of about
        ``sqrt(w) * d`` pixels under a Gaussian prior. 0 turns regularisation off.
    n_id, n_exp : int, optional
        Number of identity / expression components to fit (default: all).
    n_alternations : int
        Rounds of (linear shape solve, pose re-fit) before Levenberg-Marquardt.
    max_iter : int
        Cap on Levenberg-Marquardt iterations.
    ftol, xtol, gtol : float
        Convergence: relative cost decrease of an accepted step ``<= ftol``, or step norm
        ``<= xtol * (xtol + ||theta||)``, or gradient max-norm ``<= gtol``.
    w_init : float
        Minimum regulariser weight during the initial alternation (keeps the start point
        plausible when ``w_id``/``w_exp`` are small or 0).
    fast : bool
        Use the compiled kernel of the input's target (see Notes). False runs the vectorised array
        path and forms ``J^T J`` directly (the reference; same results).
    options : FitOptions, optional
        All the tuning knobs above (``w_id`` ... ``w_init``) in one object, instead of keywords: a call
        that also writes any of those keywords (even with its default value) raises ``ValueError``.
    engine : {'auto', 'numba', 'xp', 'cuda'}
        Deprecated (a ``DeprecationWarning``; removed in the next release): ``'auto'`` is the only
        non-deprecated value. ``'numba'`` is the CPU kernel, ``'cuda'`` the CUDA kernel (as inside
        ``geomfit.backend.force('cuda')``), ``'xp'`` the vectorised array path.

    Returns
    -------
    LandmarkFit
        Fields as documented on :class:`LandmarkFit`; leading batch axis for batch input.

    Raises
    ------
    ValueError
        Wrong landmark shape/count, fewer than 4 visible fixed landmarks (e.g. all NaN), collinear
        landmarks, landmarks outside ``image_size``, a model without landmark mapping, bad options.
    TypeError
        Non-numeric landmarks or a model that is not a :class:`MorphableModel`.

    Notes
    -----
    Implementations (the same algorithm and results): NumPy input runs a compiled Numba kernel
    that fits one image per call (``geomfit.kernels.fitting``; batches of 16 or more are split into
    contiguous chunks over ``numba.get_num_threads()`` threads); CuPy input runs its Numba CUDA
    twin (one GPU thread per image); both are registered as ``"landmark_fit"`` in
    :data:`geomfit.backend.KERNELS`. ``fast=False`` runs the vectorised array path, in which all
    images of a batch advance together in NumPy or CuPy operations.

    Sliding contour: each of iBUG 1-8 (10-17) is matched to the right (left) contour candidate
    whose projection is nearest, re-chosen at every evaluation of the cost, following the
    rotation-dependent correspondences of Wang et al. 2020 (their ref. [26]).

    References
    ----------
    P. Wang, C. Lin, B. Xu, W. Che, Q. Wang, "Low-frequency guided self-supervised learning for
    high-fidelity 3D face reconstruction in the wild", ICME 2020,
    Sec. 3.1, Eq. (1).
    """
    if engine != "auto":
        warnings.warn("fit_landmarks(engine=...) is deprecated: NumPy input runs the CPU kernel, CuPy input the "
                      "CUDA kernel; use geomfit.backend.force('cuda') to run the CUDA kernel on NumPy input",
                      DeprecationWarning, stacklevel=2)
    if engine not in ("auto", "numba", "xp", "cuda"):
        raise ValueError(f"engine must be 'auto', 'numba', 'xp' or 'cuda', got {engine!r}")
    if engine == "numba" and backend.target(landmarks) == "cuda":
        raise ValueError("engine='numba' needs NumPy input (CuPy arrays use the 'xp' or 'cuda' path)")
    o = _resolve_options(options, dict(w_id=w_id, w_exp=w_exp, n_id=n_id, n_exp=n_exp, n_alternations=n_alternations,
                                       max_iter=max_iter, ftol=ftol, xtol=xtol, gtol=gtol, w_init=w_init),
                         "fit_landmarks")
    kw = {f.name: getattr(o, f.name) for f in fields(FitOptions)}
    kw.update(visible=visible, fast=fast)
    if engine == "xp" or not fast or _kernels() is None:
        return _fit_landmarks(model, landmarks, image_size, path="array", **kw)
    with backend.force(engine.replace("numba", "cpu")) if engine in ("numba", "cuda") else contextlib.nullcontext():
        return _fit_landmarks(model, landmarks, image_size, path="kernel", **kw)


def _fit_landmarks(model, landmarks, image_size, *, path, visible, w_id, w_exp, n_id, n_exp, n_alternations,
                   max_iter, ftol, xtol, gtol, w_init, fast):
    """:func:`fit_landmarks` with ``path="kernel"`` (the registered ``"landmark_fit"`` kernel of the
    target) or ``path="array"`` (the vectorised NumPy/CuPy array path, the reference)."""
    xp = get_array_module(landmarks)
    _check_reg(w_id, w_exp)
    if int(max_iter) < 0 or int(n_alternations) < 0:
        raise ValueError("max_iter and n_alternations must be >= 0")
    p = _prep(model, n_id, n_exp, xp)
    single, Ln, w, c, d, hw = _prepare_landmarks(landmarks, image_size, visible, xp, p)
    reg = xp.concatenate([xp.full(p.K, float(w_id)), xp.full(p.E, float(w_exp))])
    # the initial alternation is regularised at least by w_init: a start point, not the answer
    reg_init = xp.maximum(reg, float(w_init))
    if path == "kernel":
        fit = backend.kernel("landmark_fit", Ln)
        out = fit(p, Ln, w, reg, reg_init, int(n_alternations), int(max_iter), float(ftol), float(xtol),
                  float(gtol), bool(xp.any(reg_init != reg)))
        R, s, t, coef, cost, conv, iters, hist, rss, sel = out
        return _finish(p, model, R, s, t, coef, cost, conv, iters, hist, Ln, w, c, d, hw, single, xp,
                       final=(rss, sel))
    R, s, t, coef = _initialise(p, Ln, w, reg_init, int(n_alternations), xp)
    if bool(xp.any(reg_init != reg)):
        # continuation: converge loosely under the start-up regulariser first, so that the jaw
        # contour correspondences are settled by a plausible shape before the prior is relaxed
        R, s, t, coef, _, _, it0, hist0 = _lm_batch(p, Ln, w, R, s, t, coef, reg_init, int(max_iter),
                                                    max(ftol, 1e-4), xtol, gtol, 1e-3, fast, xp)
    R, s, t, coef, cost, conv, iters, hist = _lm_batch(p, Ln, w, R, s, t, coef, reg, int(max_iter), ftol, xtol,
                                                       gtol, 1e-3, fast, xp)
    if bool(xp.any(reg_init != reg)):
        iters = iters + it0
        hist = xp.concatenate([hist0, hist], axis=1)
    return _finish(p, model, R, s, t, coef, cost, conv, iters, hist, Ln, w, c, d, hw, single, xp)


# ------------------------------------------------------------------------------------------------
# Several photos of one person: shared identity, per-photo pose and expression
# ------------------------------------------------------------------------------------------------
def _lm_multi(p: _Prep, Ln, w, R, s, t, coef, w_id, reg_exp, max_iter, ftol, xtol, gtol, lam0, xp):
    """One LM on [alpha (shared), (pose_i, beta_i) for every photo i]; Schur complement on the
    per-photo blocks (block-arrow normal equations)."""
    n = Ln.shape[0]
    K, P = p.K, p.P
    reg_img = xp.concatenate([xp.zeros(K), reg_exp])  # the identity prior is counted once, below
    ia = np.arange(6, 6 + K)
    ib = np.concatenate([np.arange(6), np.arange(6 + K, 6 + P)])
    nb = ib.size

    def total(cost_i, alpha):
        return cost_i.sum() + w_id * (alpha * alpha).sum()

    cost_i, r, Us, sel = _evaluate(p, Ln, w, R, s, t, coef, reg_img)
    F = total(cost_i, coef[0, :K])
    H, g = _normal_equations(p, R, s, coef, r, Us, sel, w, reg_img)
    lam, nu = lam0, 2.0
    hist = [float(F)]
    conv = False
    it = 0
    eyeK = xp.eye(K)
    for it in range(1, max_iter + 1):
        alpha = coef[0, :K]
        Haa = H[:, ia][:, :, ia].sum(0) + w_id * eyeK
        ga = g[:, ia].sum(0) + w_id * alpha
        Hbb = H[:, ib][:, :, ib]
        Hba = H[:, ib][:, :, ia]
        gb = g[:, ib]
        Da = xp.maximum(xp.diagonal(Haa), 1e-12)
        Db = xp.maximum(xp.diagonal(Hbb, axis1=1, axis2=2), 1e-12)
        Haa_d = Haa + lam * xp.diag(Da)
        Hbb_d = Hbb + lam * (Db[:, :, None] * xp.eye(nb))
        Y = _solve(Hbb_d, xp.concatenate([Hba, gb[:, :, None]], axis=2), xp)  # (n, nb, K+1)
        S = Haa_d - (xp.swapaxes(Hba, 1, 2) @ Y[:, :, :K]).sum(0)
        rhs = -ga + (xp.swapaxes(Hba, 1, 2) @ Y[:, :, K:]).sum(0)[:, 0]
        da = _solve(S, rhs[:, None], xp)[:, 0] if K else xp.zeros(0)
        db = -Y[:, :, K] - Y[:, :, :K] @ da
        d = xp.zeros((n, 6 + P))
        d[:, ib] = db
        d[:, ia] = da[None, :]
        Rn, sn, tn, cn = _apply_step(R, s, t, coef, d, xp)
        cost_n, rn, Un, seln = _evaluate(p, Ln, w, Rn, sn, tn, cn, reg_img)
        Fn = total(cost_n, cn[0, :K])
        dHd = (d[:, None, :] @ H @ d[:, :, None]).sum() + w_id * (da * da).sum()
        dDd = (da * da * Da).sum() + (db * db * Db).sum()
        pred = float(dHd + 2 * lam * dDd)
        Ff, Fnf = float(F), float(Fn)
        acc = np.isfinite(Fnf) and Fnf < Ff
        rho = (Ff - Fnf) / pred if pred > 0 else 0.0
        theta = xp.concatenate([alpha, xp.log(s), t.ravel(), coef[:, K:].ravel()])
        small_step = float(xp.sqrt((d[:, ib] ** 2).sum() + (da * da).sum())) <= xtol * (
            xtol + float(xp.sqrt((theta * theta).sum())))
        if acc:
            lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            nu = 2.0
            R, s, t, coef, F = Rn, sn, tn, cn, Fn
            H, g = _normal_equations(p, R, s, coef, rn, Un, seln, w, reg_img)
            hist.append(Fnf)
            gfull = xp.concatenate([g[:, ia].sum(0) + w_id * coef[0, :K], g[:, ib].ravel()])
            if (Ff - Fnf) <= ftol * Ff or small_step or Fnf <= 1e-26 or float(xp.abs(gfull).max()) <= gtol:
                conv = True
                break
        else:
            lam *= nu
            nu *= 2.0
            hist.append(Ff)
            if np.isfinite(Fnf) and small_step:
                conv = True
                break
            if lam > 1e16:
                break
    conv = conv and bool(xp.isfinite(F))
    return R, s, t, coef, F, conv, it, xp.asarray(hist)


@_keywords_or_options
def fit_landmarks_multi(model: MorphableModel, landmarks: Sequence, image_sizes, *, visible=None,
                        w_id: float = 1e-3, w_exp: float = 1e-3, n_id: Optional[int] = None,
                        n_exp: Optional[int] = None, n_alternations: int = 2, max_iter: int = 50,
                        ftol: float = 1e-6, xtol: float = 1e-8, gtol: float = 1e-12,
                        w_init: float = 1e-3, options: Optional[FitOptions] = None) -> LandmarkFit:
    """Fit one identity to several photos of a person, with per-photo pose and expression.

    Minimises the sum over photos of Wang et al.'s Eq. (1) data and expression terms plus one shared
    identity prior ``w_id ||alpha||^2``, by one Levenberg-Marquardt on the joint parameter vector.
    Its normal equations have block-arrow structure (photos couple only through ``alpha``): each
    step eliminates the per-photo (pose, expression) blocks by a Schur complement and solves a
    K x K system for the identity update.

    Parameters
    ----------
    model : MorphableModel
    landmarks : sequence of ndarray, each (68, 2), or ndarray (n, 68, 2)
        Pixel coordinates (top-left origin, y down); NaN rows ignored.
    image_sizes : (h, w) or sequence of (h, w)
        One size for all photos or one per photo.
    visible : ndarray of bool, shape (n, 68), optional
    w_id, w_exp, n_id, n_exp, n_alternations, max_iter, ftol, xtol, gtol, w_init, options
        As in :func:`fit_landmarks`. Start: per-photo initialisation as in :func:`fit_landmarks`,
        identity averaged over photos.

    Returns
    -------
    LandmarkFit
        ``id_coeffs`` (K,) shared; ``exp_coeffs`` (n, E), ``rotation`` (n, 3, 3), ``scale`` (n,),
        ``translation`` (n, 2), ``rmse_px`` (n,), ``vertices`` (n, N, 3), ``projected`` (n, N, 2),
        ``landmark_vertices`` (n, 68); ``iterations`` (int), ``converged`` (bool) and
        ``cost_history`` (1-D) for the joint problem.

    Raises
    ------
    ValueError
        As :func:`fit_landmarks`, and for an empty list of photos.

    References
    ----------
    P. Wang, C. Lin, B. Xu, W. Che, Q. Wang, "Low-frequency guided self-supervised learning for
    high-fidelity 3D face reconstruction in the wild", ICME 2020,
    Sec. 3.1, Eq. (1), extended to shared identity.
    """
    o = _resolve_options(options, dict(w_id=w_id, w_exp=w_exp, n_id=n_id, n_exp=n_exp, n_alternations=n_alternations,
                                       max_iter=max_iter, ftol=ftol, xtol=xtol, gtol=gtol, w_init=w_init),
                         "fit_landmarks_multi")
    w_id, w_exp, n_id, n_exp, n_alternations = o.w_id, o.w_exp, o.n_id, o.n_exp, o.n_alternations
    max_iter, ftol, xtol, gtol, w_init = o.max_iter, o.ftol, o.xtol, o.gtol, o.w_init
    if isinstance(landmarks, (list, tuple)):
        if len(landmarks) == 0:
            raise ValueError("fit_landmarks_multi: no photos given")
        xp = get_array_module(*landmarks)
        shapes = {tuple(np.shape(a)) for a in landmarks}
        if len(shapes) != 1:
            raise ValueError(f"fit_landmarks_multi: every photo needs (68, 2) landmarks, got shapes {sorted(shapes)}")
        lm = xp.stack([xp.asarray(a) for a in landmarks])
    else:
        xp = get_array_module(landmarks)
        lm = xp.asarray(landmarks)
    if lm.ndim != 3:
        raise ValueError(f"fit_landmarks_multi: landmarks must be a list of (68, 2) arrays or (n, 68, 2), got {lm.shape}")
    _check_reg(w_id, w_exp)
    p = _prep(model, n_id, n_exp, xp)
    _, Ln, w, c, d, hw = _prepare_landmarks(lm, image_sizes, visible, xp, p)
    n = Ln.shape[0]
    reg = xp.concatenate([xp.full(p.K, float(w_id)), xp.full(p.E, float(w_exp))])
    reg_init = xp.maximum(reg, float(w_init))
    R, s, t, coef = _initialise(p, Ln, w, reg_init, int(n_alternations), xp)
    coef[:, : p.K] = coef[:, : p.K].mean(0)
    hists, it_total = [], 0
    phases = [(max(float(w_id), float(w_init)), xp.maximum(reg[p.K:], float(w_init)), max(ftol, 1e-4))] \
        if bool(xp.any(reg_init != reg)) else []
    phases.append((float(w_id), reg[p.K:], ftol))
    for wi, re, ft in phases:
        R, s, t, coef, F, conv, it, hist = _lm_multi(p, Ln, w, R, s, t, coef, wi, re, int(max_iter), ft, xtol,
                                                     gtol, 1e-3, xp)
        hists.append(hist)
        it_total += it
    iters = xp.full(n, it_total)
    res = _finish(p, model, R, s, t, coef, xp.full(n, F), xp.full(n, conv), iters, xp.zeros((n, 1)),
                  Ln, w, c, d, hw, False, xp, multi_id=coef[0, : p.K])
    res.iterations = int(it_total)
    res.converged = bool(conv)
    res.cost_history = xp.concatenate(hists)
    return res
