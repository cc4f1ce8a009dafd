"""Evaluation metrics: depth-image MAE, the MICC Florence mesh protocol, landmark NME.

* :func:`depth_mae` -- mean absolute error between depth images (Galteri et al., CVIU 2019, Eq. 4),
  over the pixels valid in either image.
* :func:`micc_errors` -- the MICC Florence protocol of Gecer et al. (Fast-GANFIT, TPAMI 2021, Sec. 5.3.1)
  and Jin et al. (Pattern Recognition Letters 2021, Sec. 4.2):
  crop both meshes to a 95 mm sphere around the nose tip, align the prediction to the ground truth
  with rigid ICP (:func:`rigid_icp`), then report point-to-plane and point-to-point RMSE in mm
  (and Gecer et al.'s average symmetric point-to-plane distance).
* :func:`landmark_nme` -- landmark error normalised by the inter-ocular distance (300-W).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np
from scipy.spatial import cKDTree

from . import ibug
from .camera import rodrigues

__all__ = [
    "depth_mae",
    "landmark_nme",
    "rigid_icp",
    "ICPResult",
    "kabsch",
    "crop_sphere",
    "vertex_normals",
    "point_normals",
    "surface_errors",
    "micc_errors",
]


# -- depth MAE ------------------------------------------------------------------------------------
def depth_mae(pred, gt, valid=None, per_image: bool = False, missing: float = 0.0):
    """Mean absolute error between depth images over the pixels valid in either image.

    Implements Eq. 4 of Galteri et al. (CVIU 2019)::

        MAE(y, G(x)) = 1/(K H W) sum_k sum_ij |G(x)^k_ij - y^k_ij|   for G(x)^k_ij != 0 or y^k_ij != 0

    The sum runs over pixels where *either* image has depth; geomfit normalises by the number of
    those pixels (not by K*H*W, which would make the value depend on how much background the
    images hold).  A pixel missing in one image (value ``missing``, or NaN) counts with that
    image's value taken as ``missing``, so a hole or an overhang is penalised.

    Parameters
    ----------
    pred, gt : array_like, shape (H, W) or (K, H, W)
        Estimated and ground-truth depth images in the same units (Galteri et al. use depths
        normalised to [0, 1]).  NaN and ``missing`` mark pixels without depth.
    valid : array_like of bool, optional
        Restrict the evaluation further to these pixels (same shape, or (H, W) for all images).
    per_image : bool
        Return one MAE per image (shape (K,)) instead of the pooled value.
    missing : float
        The background value (0 in Galteri et al.).

    Returns
    -------
    float or ndarray
        The MAE (NaN for an image with no valid pixel when ``per_image``).

    Raises
    ------
    ValueError
        Shape mismatch, or no pixel valid in either image (pooled).

    References
    ----------
    L. Galteri, C. Ferrari, G. Lisanti, S. Berretti, A. Del Bimbo, "Deep 3D morphable model refinement
    via progressive growing of conditional Generative Adversarial Networks", CVIU 185, 2019, Eq. 4;
    the same authors' "Coarse-to-fine 3D face reconstruction", CVPR Workshops 2019.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"depth_mae: pred has shape {p.shape}, gt has shape {g.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"depth_mae: depth images must be (H, W) or (K, H, W), got {p.shape}")
    if p.ndim == 2:
        p, g = p[None], g[None]
        single = True
    else:
        single = False
    hp = np.isfinite(p) & (p != missing)
    hg = np.isfinite(g) & (g != missing)
    pv = np.where(hp, p, missing)
    gv = np.where(hg, g, missing)
    use = hp | hg
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        if v.shape not in (p.shape, p.shape[1:]):
            raise ValueError(f"depth_mae: valid has shape {v.shape}, images have {p.shape[-2:]}")
        use &= np.broadcast_to(v, p.shape)
    err = np.where(use, np.abs(pv - gv), 0.0)
    if per_image:
        n = use.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = err.sum(axis=(1, 2)) / n
        return float(out[0]) if single else out
    n = int(use.sum())
    if n == 0:
        raise ValueError("depth_mae: no pixel has depth in either image")
    return float(err.sum() / n)


# -- landmarks ------------------------------------------------------------------------------------
def landmark_nme(pred, gt, normalization: Union[str, float] = "inter-ocular", per_image: bool = False):
    """Normalised mean error of 68 landmarks.

    Parameters
    ----------
    pred, gt : array_like, shape (68, 2) or (B, 68, 2)
        Predicted and reference landmarks (iBUG order).
    normalization : {"inter-ocular", "inter-pupil", "bbox"} or float
        ``"inter-ocular"``: distance between the outer eye corners (iBUG 37 and 46), the 300-W
        convention; ``"inter-pupil"``: between the eye centres (means of 37-42 and 43-48);
        ``"bbox"``: sqrt(width * height) of the reference box; a number: that distance.

    Returns
    -------
    float or ndarray
        Mean over points of the Euclidean error divided by the normalisation (a fraction; x100 for
        %), averaged over images unless ``per_image``.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.shape[-2:] not in ((68, 2), (68, 3)):
        raise ValueError(f"landmark_nme: expected matching (68, 2) or (B, 68, 2) arrays, got {p.shape} and {g.shape}")
    single = p.ndim == 2
    if single:
        p, g = p[None], g[None]
    if isinstance(normalization, str):
        if normalization == "inter-ocular":
            d = np.linalg.norm(g[:, ibug.OUTER_EYE_CORNERS[0]] - g[:, ibug.OUTER_EYE_CORNERS[1]], axis=-1)
        elif normalization == "inter-pupil":
            d = np.linalg.norm(g[:, ibug.RIGHT_EYE].mean(1) - g[:, ibug.LEFT_EYE].mean(1), axis=-1)
        elif normalization == "bbox":
            ext = g.max(1) - g.min(1)
            d = np.sqrt(ext[:, 0] * ext[:, 1])
        else:
            raise ValueError(f"landmark_nme: unknown normalization {normalization!r}")
    else:
        d = np.full(p.shape[0], float(normalization))
    if np.any(d <= 0):
        raise ValueError("landmark_nme: normalising distance is zero")
    e = np.linalg.norm(p - g, axis=-1).mean(1) / d
    if per_image:
        return float(e[0]) if single else e
    return float(e.mean())


# -- geometry helpers -----------------------------------------------------------------------------
def vertex_normals(vertices, faces) -> np.ndarray:
    """Area-weighted unit vertex normals of a triangle mesh (vectorised)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(ln > 0, ln, 1.0)


def point_normals(points, k: int = 12) -> np.ndarray:
    """Unit normals of a point cloud by PCA of the ``k`` nearest neighbours (sign: towards +z)."""
    x = np.asarray(points, dtype=np.float64)
    k = int(min(k, len(x)))
    _, idx = cKDTree(x).query(x, k=k)
    nb = x[idx] - x[idx].mean(1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", nb, nb)
    _, vecs = np.linalg.eigh(cov)
    n = vecs[:, :, 0]
    return n * np.where(n[:, 2:3] < 0, -1.0, 1.0)


def crop_sphere(points, center, radius: float = 95.0) -> np.ndarray:
    """Boolean mask of the points within ``radius`` of ``center`` (95 mm around the nose tip, as in
    Gecer et al. 2021 and Jin et al. 2021)."""
    x = np.asarray(points, dtype=np.float64)
    return np.linalg.norm(x - np.asarray(center, dtype=np.float64), axis=1) <= radius


def kabsch(src, dst, weights=None, scale: bool = False):
    """Least-squares rigid (or similarity) transform with ``dst ~ s R src + t`` (Kabsch/Umeyama).

    Returns
    -------
    R : ndarray (3, 3), t : ndarray (3,), s : float
    """
    a = np.asarray(src, dtype=np.float64)
    b = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    ca, cb = w @ a, w @ b
    a0, b0 = a - ca, b - cb
    h = (a0 * w[:, None]).T @ b0
    u, sv, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    dm = np.diag([1.0, 1.0, d])
    r = vt.T @ dm @ u.T
    s = float((sv * np.diag(dm)).sum() / (w @ (a0 ** 2).sum(1))) if scale else 1.0
    t = cb - s * r @ ca
    return r, t, s


@dataclass
class ICPResult:
    """Rigid ICP outcome: ``aligned = scale * source @ rotation.T + translation``."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: float
    aligned: np.ndarray
    rms_history: List[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


def rigid_icp(source, target, target_normals=None, method: str = "point_to_plane", max_iter: int = 60,
              tol: float = 1e-7, init=None, max_distance: Optional[float] = None, scale: bool = False
              ) -> ICPResult:
    """Rigid iterative closest point alignment of ``source`` onto ``target``.

    Each iteration matches every source point to its nearest target point (``cKDTree``) and solves
    for the motion in closed form: point-to-point by Kabsch/Umeyama; point-to-plane by the
    linearised small-rotation least squares (a 6x6 system, Chen and Medioni's objective
    ``sum ((R p + t - q) . n_q)^2``), re-projected onto SO(3) with Rodrigues' formula.

    Parameters
    ----------
    source, target : array_like, shape (N, 3) and (M, 3)
    target_normals : array_like, shape (M, 3), optional
        Needed for ``"point_to_plane"`` (estimated by :func:`point_normals` if absent).
    method : {"point_to_plane", "point_to_point"}
    max_iter : int
    tol : float
        Stop when the relative change of the RMS matching distance is below this.
    init : tuple (R, t), optional
        Initial transform (default: identity rotation, centroids matched).
    max_distance : float, optional
        Ignore matches farther than this (partial overlap).
    scale : bool
        Also estimate a uniform scale (point-to-point step only).

    Returns
    -------
    ICPResult

    References
    ----------
    Besl and McKay 1992 (the ICP of Gecer et al. 2021, their ref. [3]); Chen and Medioni 1992 (point-to-plane).
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    for nm, a in (("source", src), ("target", dst)):
        if a.ndim != 2 or a.shape[1] != 3 or len(a) < 3:
            raise ValueError(f"rigid_icp: {nm} must have shape (N>=3, 3), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"rigid_icp: {nm} contains NaN or infinite values")
    if method not in ("point_to_plane", "point_to_point"):
        raise ValueError(f"rigid_icp: unknown method {method!r}")
    nrm = None
    if method == "point_to_plane":
        nrm = point_normals(dst) if target_normals is None else np.asarray(target_normals, dtype=np.float64)
        if nrm.shape != dst.shape:
            raise ValueError(f"rigid_icp: target_normals must have shape {dst.shape}, got {nrm.shape}")
    tree = cKDTree(dst)
    if init is None:
        R, t = np.eye(3), dst.mean(0) - src.mean(0)
    else:
        R, t = np.asarray(init[0], dtype=np.float64), np.asarray(init[1], dtype=np.float64)
    s = 1.0
    hist: List[float] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        cur = s * src @ R.T + t
        d, j = tree.query(cur)
        keep = np.ones(len(cur), bool) if max_distance is None else d <= max_distance
        if keep.sum() < 6:
            raise ValueError("rigid_icp: fewer than 6 matches within max_distance")
        rms = float(np.sqrt(np.mean(d[keep] ** 2)))
        hist.append(rms)
        if len(hist) > 1 and abs(hist[-2] - hist[-1]) <= tol * max(hist[-2], 1e-12):
            converged = True
            break
        p, q = cur[keep], dst[j[keep]]
        if method == "point_to_point":
            dR, dt, ds = kabsch(p, q, scale=scale)
            R, t, s = dR @ R, ds * dR @ t + dt, s * ds
        else:
            n = nrm[j[keep]]
            c = p.mean(0)
            pc = p - c
            J = np.hstack([np.cross(pc, n), n])
            r = np.einsum("ij,ij->i", p - q, n)
            x = np.linalg.lstsq(J, -r, rcond=None)[0]
            dR = rodrigues(x[:3])
            # p'' = dR (p - c) + c + dt
            R, t = dR @ R, dR @ (t - c) + c + x[3:]
    aligned = s * src @ R.T + t
    return ICPResult(R, t, s, aligned, hist, it, converged)


def surface_errors(points, target, target_normals=None, max_distance: Optional[float] = None):
    """Per-point distances from ``points`` to the nearest ``target`` point: (point-to-point, point-to-plane)."""
    tgt = np.asarray(target, dtype=np.float64)
    nrm = point_normals(tgt) if target_normals is None else np.asarray(target_normals, dtype=np.float64)
    d, j = cKDTree(tgt).query(np.asarray(points, dtype=np.float64))
    plane = np.abs(np.einsum("ij,ij->i", np.asarray(points) - tgt[j], nrm[j]))
    if max_distance is not None:
        keep = d <= max_distance
        d, plane = d[keep], plane[keep]
    return d, plane


def _normals(v, f):
    return vertex_normals(v, f) if f is not None and len(f) else point_normals(v)


def micc_errors(pred_vertices, gt_vertices, pred_faces=None, gt_faces=None, pred_nose=None, gt_nose=None,
                radius: float = 95.0, icp: str = "point_to_plane", max_iter: int = 60, init=None) -> dict:
    """MICC Florence evaluation of a reconstruction against a ground-truth scan (Gecer et al. 2021; Jin et al. 2021).

    Protocol: crop both meshes to ``radius`` (95 mm) around their nose tips; align the cropped
    prediction to the cropped ground truth by rigid ICP (starting from the nose tips put
    together, or ``init``); then measure, for every aligned predicted point, the distance to the
    nearest ground-truth point (point-to-point) and to that point's tangent plane
    (point-to-plane), and the same from the ground truth to the prediction.

    Parameters
    ----------
    pred_vertices, gt_vertices : array_like, shape (N, 3) and (M, 3)
        In millimetres (the SFM and BFM models are in mm; scale other units first).
    pred_faces, gt_faces : array_like, shape (F, 3), optional
        Triangles for vertex normals; point clouds get PCA normals.
    pred_nose, gt_nose : array_like (3,) or int, optional
        Nose tip as a point or a vertex index (for a geomfit mesh: ``model.landmarks[31]``, iBUG
        31 being the nose tip).  Default: the vertex with the largest z (face looking along +z).
    radius : float
        Crop radius in mm.
    icp : {"point_to_plane", "point_to_point"}
    init : tuple (R, t), optional
        Initial alignment instead of the nose-tip translation.

    Returns
    -------
    dict
        ``rmse_point_to_plane`` and ``rmse_point_to_point`` (prediction -> ground truth, mm),
        ``mean_point_to_plane_symmetric`` (Gecer et al.'s average symmetric point-to-plane distance, mm),
        ``n_pred``, ``n_gt`` (points after cropping), ``rotation``, ``translation``,
        ``icp_iterations``, ``icp_converged``.

    References
    ----------
    B. Gecer, S. Ploumpis, I. Kotsia, S. Zafeiriou, "Fast-GANFIT", arXiv 2105.07474, 2021, Sec. 5.3.1;
    Y. Jin, Q. Li, D. Jiang, R. Tong, "High-fidelity 3D face reconstruction with multi-scale details", Pattern
    Recognition Letters 2021, Sec. 4.2 and Table 1.
    """
    pv = np.asarray(pred_vertices, dtype=np.float64)
    gv = np.asarray(gt_vertices, dtype=np.float64)

    def tip(v, nose):
        if nose is None:
            return v[np.argmax(v[:, 2])]
        a = np.asarray(nose)
        return v[int(a)] if a.ndim == 0 else a.astype(np.float64)

    for nm, v in (("pred_vertices", pv), ("gt_vertices", gv)):
        if v.ndim != 2 or v.shape[1] != 3 or len(v) < 10:
            raise ValueError(f"micc_errors: {nm} must have shape (N>=10, 3), got {v.shape}")
        ext = float(np.ptp(v, axis=0).max())
        if ext < radius / 20:
            raise ValueError(f"micc_errors: {nm} spans only {ext:.3g} units; are the meshes in millimetres?")
    pt, gtip = tip(pv, pred_nose), tip(gv, gt_nose)
    mp = crop_sphere(pv, pt, radius)
    mg = crop_sphere(gv, gtip, radius)
    if mp.sum() < 10 or mg.sum() < 10:
        raise ValueError(f"micc_errors: fewer than 10 points within {radius} mm of the nose tip "
                         "(are the meshes in millimetres?)")
    pn_all = _normals(pv, pred_faces)
    gn_all = _normals(gv, gt_faces)
    P, G, PN, GN = pv[mp], gv[mg], pn_all[mp], gn_all[mg]
    if init is None:
        init = (np.eye(3), gtip - pt)
    res = rigid_icp(P, G, target_normals=GN, method=icp, max_iter=max_iter, init=init)
    A = res.aligned
    d_pp, d_pl = surface_errors(A, G, GN)
    AN = PN @ res.rotation.T
    _, d_pl_back = surface_errors(G, A, AN)
    return {
        "rmse_point_to_plane": float(np.sqrt(np.mean(d_pl ** 2))),
        "rmse_point_to_point": float(np.sqrt(np.mean(d_pp ** 2))),
        "mean_point_to_plane_symmetric": float(0.5 * (d_pl.mean() + d_pl_back.mean())),
        "n_pred": int(mp.sum()),
        "n_gt": int(mg.sum()),
        "rotation": res.rotation,
        "translation": res.translation,
        "icp_iterations": res.iterations,
        "icp_converged": res.converged,
    }
