"""Synthetic faces with known shape for the medium stage (tests and benchmarks/bench_medium_robustness.py).

A face is drawn from the Surrey model (identity and expression coefficients sampled), optionally changed
by a smooth local offset the model cannot express, posed with a known scaled-orthographic camera and
"photographed" as 68 iBUG landmarks in a 256 px image:

* the 50 landmarks with a fixed model vertex are that vertex's projection;
* the jaw contour (iBUG 1-8 and 10-17) is placed as an annotator or a detector places it: on the
  face's silhouette in the image, equally spaced along the outline between point 1 (at the height of
  the cheek below the eye), point 9 (the chin) and point 17. On the side turned away these are points
  on the cheek, not the model's fixed jaw vertices.

Gaussian noise of a given standard deviation (pixels, per coordinate) is added to all 68.
"""
from __future__ import annotations

import numpy as np

from geomfit.camera import ScaledOrthographic, euler_to_matrix
from geomfit.render import rasterize

INNER = np.array([i for i in range(18, 69) if i not in (61, 65)])  # the 49 inner iBUG numbers


def sample_face(model, rng, id_scale=1.0, exp_max=0.5):
    """Vertices of a random face: identity ~ N(0, id_scale^2) (sd units), blendshapes ~ U(0, exp_max)."""
    a = rng.standard_normal(model.n_id) * id_scale
    e = rng.uniform(0.0, exp_max, model.n_exp)
    return np.asarray(model.shape(a, e), dtype=np.float64)


def local_offset(v, centre, radius, offset):
    """Smooth (Gaussian) offset of the vertices near ``centre``: not in a linear model's span."""
    w = np.exp(-((v - centre) ** 2).sum(1) / (2.0 * radius ** 2))
    return v + w[:, None] * np.asarray(offset, dtype=np.float64)[None]


def make_camera(yaw_deg, pitch_deg=0.0, scale=0.85, size=256, vertices=None):
    """Camera with the face centred in a ``size`` px image; ``scale`` pixels per mm (IOD about 78 px)."""
    R = np.asarray(euler_to_matrix(np.deg2rad(yaw_deg), np.deg2rad(pitch_deg), 0.0), dtype=np.float64)
    c = np.zeros(3) if vertices is None else 0.5 * (vertices.min(0) + vertices.max(0))
    rc = scale * (R @ c)
    t = np.array([size / 2 - rc[0], size / 2 - rc[1]])
    return ScaledOrthographic(scale, R, t)


def _outline(mask, centre, angles, step=0.25):
    """Farthest in-mask point along rays from ``centre`` (x, y) at ``angles`` (y down), (A, 2)."""
    H, W = mask.shape
    r = np.arange(0.0, float(np.hypot(H, W)), step)
    x = centre[0] + np.cos(angles)[:, None] * r[None]
    y = centre[1] + np.sin(angles)[:, None] * r[None]
    xi, yi = np.floor(x).astype(int), np.floor(y).astype(int)
    ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    inside = np.zeros_like(ok)
    inside[ok] = mask[yi[ok], xi[ok]]
    last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
    last[~inside.any(1)] = 0
    rr = r[last]
    return np.stack([centre[0] + np.cos(angles) * rr, centre[1] + np.sin(angles) * rr], 1)


def contour_landmarks(model, vertices, camera, size=256, supersample=4, anchor_y=20.0):
    """iBUG 1-17 on the silhouette (see the module docstring), (17, 2) pixels."""
    S = supersample
    scr = np.asarray(camera.to_screen(vertices, size)) * np.array([S, S, 1.0])
    mask = np.asarray(rasterize(scr, model.faces, size * S, size * S).vertex_index) >= 0
    proj = scr[:, :2]
    centre = proj[model.landmarks[28]]  # top of the nose bridge
    ends = []
    for side in ("right", "left"):  # iBUG 1 on the right contour, 17 on the left
        cand = np.asarray(model.contours[side])
        ends.append(cand[np.argmin(np.abs(model.mean[cand, 1] - anchor_y))])
    chin = model.landmarks[9]

    def ang(p):
        d = p - centre
        return np.arctan2(d[1], d[0])

    a1, a9, a17 = ang(proj[ends[0]]), ang(proj[chin]), ang(proj[ends[1]])
    # iBUG 1 lies to the image left (angle near pi, y down); go through the chin (near pi/2) to 17
    if a1 < 0:
        a1 += 2 * np.pi
    out = np.zeros((17, 2))
    for lo, hi, idx in ((a9, a1, np.arange(0, 9)[::-1]), (a17, a9, np.arange(8, 17)[::-1])):
        th = np.linspace(lo, hi, 1500)
        pts = _outline(mask, centre, th)
        seg = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
        want = np.linspace(0.0, seg[-1], 9)
        out[idx] = np.stack([np.interp(want, seg, pts[:, 0]), np.interp(want, seg, pts[:, 1])], 1)
    return out / S


def face_landmarks(model, vertices, camera, size=256):
    """The 68 noise-free landmarks (x, y) of a posed face, (68, 2)."""
    lm = np.zeros((68, 2))
    ids, vid = model.landmark_arrays()
    lm[ids - 1] = np.asarray(camera.project(vertices[vid], size))
    lm[:17] = contour_landmarks(model, vertices, camera, size)
    return lm


def similarity_align(src, dst):
    """Umeyama similarity transform of ``src`` onto ``dst`` (both (N, 3)); returns the moved ``src``."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    U, S, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt))
    D = np.diag([1.0, 1.0, d])
    R = U @ D @ Vt
    s = (S * np.diag(D)).sum() / (a ** 2).sum()
    return s * a @ R.T + md


def shape_errors(model, recon, truth, region=None):
    """Aligned 3D errors (mm): RMS at the 49 inner landmark vertices, over all vertices, over ``region``.

    The reconstruction is similarity-aligned to the truth over all vertices first.
    """
    al = similarity_align(recon, truth)
    d = np.linalg.norm(al - truth, axis=1)
    inner = np.array([model.landmarks[i] for i in INNER])
    out = {"inner": float(np.sqrt((d[inner] ** 2).mean())), "full": float(np.sqrt((d ** 2).mean()))}
    if region is not None:
        out["region"] = float(np.sqrt((d[region] ** 2).mean()))
    return out


def folded_triangles(v_ref, v_new, faces, max_angle_deg=60.0):
    """Number of triangles whose normal turned by more than ``max_angle_deg`` from ``v_ref`` to ``v_new``."""
    def n(v):
        t = v[faces]
        c = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)

    cos = (n(v_ref) * n(v_new)).sum(1)
    return int((cos < np.cos(np.deg2rad(max_angle_deg))).sum())
