"""The whole pipeline: photo in, coarse / medium / fine 3D face out.

:func:`reconstruct` chains the stages of Jin et al., "High-fidelity 3D face reconstruction with
multi-scale details" (Pattern Recognition Letters 2021), with the coarse fit of Wang et al.,
"Low-frequency guided self-supervised learning for high-fidelity 3D face reconstruction in the wild"
(ICME 2020):

1. **landmarks** -- 68 iBUG points from a detector (:func:`geomfit.landmarks.detect_landmarks`),
   a ``.pts`` file or an array;
2. **coarse** -- the 3DMM fit to the landmarks by Levenberg-Marquardt
   (:func:`geomfit.fitting.fit_landmarks`, Wang et al. Eq. 1): identity, expression and a
   scaled-orthographic camera;
3. **medium** -- the landmark-driven Laplacian deformation of the coarse mesh
   (:func:`geomfit.laplacian.medium_stage`, Jin et al. Eqs. 2-3, made robust to landmark noise:
   docs/medium.md);
4. **fine** -- SH lighting, albedo and phased shape-from-shading on the depth map rendered from the
   medium mesh (:func:`geomfit.fine.fine_stage`, Jin et al. Eqs. 4-9);
5. **fine mesh** -- the refined depth is carried back onto the mesh: the medium mesh is subdivided
   (midpoint 1-to-4, original vertex indices kept) until its visible edges are about one pixel
   long, and every visible vertex is moved along the viewing direction by the depth change
   (refined minus medium depth) sampled bilinearly at its pixel.  Hidden vertices (back of the
   head, occluded sides) stay where the medium stage put them, so ``fine.obj`` is a complete head
   whose visible face carries the shape-from-shading detail.

Working size: the photo is downscaled (area filter) so that its longest side is at most
``max_side`` pixels (512 by default) before fitting; landmarks found on the full-size photo are
scaled with it.  Maps (depth, normals, albedo) are at the working size; meshes are in model units
(mm for the Surrey model), in model space (so they can be compared with scans directly).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from .landmarks import NoFaceError, check_landmarks, detect_landmarks, read_pts_checked
from .mesh import Mesh, displace_mesh  # noqa: F401  (defined in geomfit.mesh; kept importable from here)
from .mesh import subdivide_for_view
from .photo import load_photo, resize_longest, srgb_to_linear

__all__ = ["reconstruct", "Reconstruction", "Mesh", "displace_mesh", "fixed_landmark_rmse", "crop_box",
           "write_outputs", "save_reconstruction", "RESULT_FILES"]


@dataclass
class Reconstruction:
    """Everything :func:`reconstruct` produced.

    Attributes
    ----------
    image : ndarray (H, W, 3)
        The working-size photo, float RGB in [0, 1].
    landmarks : ndarray (68, 2)
        Landmarks in working-size pixels.
    landmarks_info : dict
        Detector, number of faces, chosen face (see :func:`geomfit.landmarks.detect_landmarks`).
    photo_size : tuple (H, W)
        Size of the original photo.
    working_scale : float
        Working size / original size (pixel coordinates of the photo times this = working pixels).
    coarse, medium, fine : Mesh
        The three meshes, model space.  ``fine`` has more vertices (subdivided); its first
        ``medium.n_vertices`` vertices correspond to the model's vertices.
    camera : geomfit.camera.ScaledOrthographic
        Model space -> working-image pixels.
    id_coeffs, exp_coeffs : ndarray
        Coarse-fit coefficients.
    depth, normals, albedo : ndarray
        Fine-stage maps at working size: refined depth (H, W) in pixels (larger = closer, NaN
        outside the face), unit normals (H, W, 3) (x right, y up, z to the viewer), albedo
        (H, W, 3) in linear RGB (the photo is decoded from sRGB before the fine stage).
    medium_depth : ndarray (H, W)
        Depth rendered from the medium mesh (the fine stage's starting point).
    mask : ndarray (H, W) bool
        Face pixels the fine stage worked on.
    sh : ndarray
        SH lighting coefficients (see :mod:`geomfit.sh` for the convention).
    specular : Any
        Fine-stage specular estimate.
    timings : dict
        Seconds per stage (``landmarks``, ``model``, ``coarse``, ``medium``, ``fine``, ``fine_mesh``,
        ``total``).
    diagnostics : dict
        ``landmark_rmse_px`` (RMS in original-photo pixels of the fixed-correspondence, non-contour
        landmarks after the coarse fit), coarse iterations / convergence / cost, fine-stage energy
        history, subdivision level, number of displaced vertices.
    stages : dict
        The raw results of each stage (``coarse``, ``medium``, ``fine``).
    """

    image: np.ndarray
    landmarks: np.ndarray
    landmarks_info: dict
    photo_size: tuple
    working_scale: float
    model: Any
    coarse: Mesh
    medium: Mesh
    fine: Mesh
    camera: Any
    id_coeffs: np.ndarray
    exp_coeffs: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    albedo: np.ndarray
    medium_depth: np.ndarray
    mask: np.ndarray
    sh: Any
    specular: Any
    timings: Dict[str, float] = field(default_factory=dict)
    diagnostics: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, Any] = field(default_factory=dict, repr=False)


def fixed_landmark_rmse(model, fit, landmarks) -> float:
    """RMS (pixels) of the fixed-correspondence, non-contour landmarks after a coarse fit.

    Uses the model's iBUG -> vertex mapping for iBUG numbers 18-68 (brows, nose, eyes, mouth: the
    49 inner landmarks for the Surrey model), comparing the projected vertices with the given
    landmarks; landmarks given as NaN are skipped.
    """
    nums = np.array(sorted(k for k in model.landmarks if int(k) >= 18), dtype=np.int64)
    if nums.size == 0:
        return float("nan")
    verts = np.array([model.landmarks[int(k)] for k in nums])
    proj = np.asarray(fit.projected)[verts]
    ref = np.asarray(landmarks, dtype=np.float64)[nums - 1]
    ok = np.isfinite(ref).all(1)
    return float(np.sqrt(np.mean(np.sum((proj[ok] - ref[ok]) ** 2, axis=1))))


def crop_box(mask, margin: int = 4):
    """Bounding box ``(r0, r1, c0, c1)`` of a mask, grown by ``margin`` and clipped to the image."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("the face mask is empty: the fitted mesh does not cover any pixel")
    h, w = mask.shape
    return (max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin),
            max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin))


def _resolve_landmarks(img_full, landmarks, detector, log):
    if landmarks is None:
        pts, info = detect_landmarks(img_full, detector)
        log(info["message"])
        return pts, info
    if isinstance(landmarks, (str, os.PathLike)):
        pts = read_pts_checked(landmarks, img_full.shape)
        return pts, {"detector": "pts", "file": str(landmarks), "n_faces": 1, "face_index": 0,
                     "message": f"landmarks from {landmarks}"}
    pts = check_landmarks(landmarks, img_full.shape)
    return pts, {"detector": "given", "n_faces": 1, "face_index": 0, "message": "landmarks given"}


def _complete_landmarks(pts, coarse, model):
    """Fill missing (NaN) landmarks with the coarse fit's projection of their vertex, for the region map."""
    miss = ~np.isfinite(pts).all(1)
    if not miss.any():
        return pts
    out = pts.copy()
    proj = np.asarray(coarse.projected)
    lv = np.asarray(getattr(coarse, "landmark_vertices", np.full(68, -1)))
    for i in np.flatnonzero(miss):
        vi = int(lv[i]) if lv[i] >= 0 else model.landmarks.get(int(i) + 1, -1)
        if vi >= 0:
            out[i] = proj[vi]
    return out if np.isfinite(out).all() else None


def _run_medium(model, coarse, landmarks, image_size, kwargs):
    """The medium stage on the given (finite) landmarks: ``method="robust"`` unless the options say
    otherwise (``medium_options={"method": "paper"}`` is Jin et al. 2021, Sec. 3.3 as written)."""
    from .laplacian import medium_stage

    ok = np.isfinite(landmarks).all(1)
    kw = dict(kwargs)
    kw.setdefault("landmark_ids", np.flatnonzero(ok) + 1)  # iBUG numbers of the given landmarks
    return medium_stage(coarse, landmarks[ok], image_size=image_size, model=model, **kw)


def _fold_counts(model, v_coarse, v_medium, faces, v_fine=None, f_fine=None, v_sub=None, f_sub=None):
    """Folded triangles (normal turned > 60 degrees) per stage, each against the stage before it:
    coarse vs the model's mean shape, medium vs coarse, fine vs the medium mesh subdivided the same way
    (``v_sub``, ``f_sub``: the subdivision the fine mesh was displaced from)."""
    from .laplacian import folded_triangles

    out = {"coarse": folded_triangles(np.asarray(model.mean, dtype=np.float64), v_coarse, faces),
           "medium": folded_triangles(v_coarse, v_medium, faces)}
    if v_fine is not None and v_sub is not None:
        vs = np.asarray(v_sub)
        if vs.shape == v_fine.shape and np.array_equal(np.asarray(f_sub), f_fine):
            out["fine"] = folded_triangles(vs, v_fine, f_fine)
    out["max_angle_deg"] = 60.0
    return out


def reconstruct(image, model="sfm", landmarks=None, *, detector: str = "auto", max_side: Optional[int] = 512,
                fine: bool = True, coarse_options: Optional[dict] = None, medium_options: Optional[dict] = None,
                fine_options: Optional[dict] = None, target_edge_px: float = 1.0, max_subdivisions: int = 2,
                feather_px: float = 3.0, progress: Optional[Callable[[str], None]] = None,
                refiner=None, subdivision: str = "loop",
                coarse: str = "landmarks", photometric_options: Optional[dict] = None) -> Reconstruction:
    """Reconstruct a detailed 3D face from one photo: coarse -> medium -> fine.

    Parameters
    ----------
    image : ndarray or path
        The photo: (H, W), (H, W, 3) or (H, W, 4) array (uint8, uint16 or float in [0, 1]), a file
        path, or ``"skimage:astronaut"``-style sample names.
    model : str, path or MorphableModel
        ``"sfm"`` (Surrey model, see :func:`geomfit.data.resolve_model`), a model file, or a model.
    landmarks : ndarray (68, 2), path to a .pts file, or None
        In the photo's pixel coordinates (top-left origin, y down).  None: detect with
        ``detector``.
    detector : {"auto", "dlib", "fan"}
        Used when ``landmarks`` is None.
    max_side : int or None
        Working size: the photo is downscaled so its longest side is at most this (None: full size).
    fine : bool
        Run the fine stage (False: the fine mesh equals the medium mesh, maps are from the medium
        depth).
    coarse_options, medium_options, fine_options : dict, optional
        Keyword arguments for :func:`geomfit.fitting.fit_landmarks` and
        :func:`geomfit.laplacian.medium_stage`; ``fine_options`` is a :class:`geomfit.fine.FineOptions`
        or a dict of its fields (default: the robust method; ``{"method": "paper"}`` for the paper's).
    target_edge_px, max_subdivisions :
        Fine-mesh resampling, see :func:`displace_mesh`.
    subdivision : {"loop", "phong", False}
        How the medium mesh is refined for the fine mesh and the medium depth map
        (:func:`geomfit.mesh.subdivide_for_view`): Loop subdivision (default), Phong tessellation, or
        flat midpoints.
    feather_px : float
        The depth change carried onto the mesh fades linearly to 0 over this many pixels towards
        the face silhouette (0: no fading).
    progress : callable, optional
        Called with a short line of text at each step.
    refiner : None, "default", path or geomfit.learned.Refiner
        Apply the learned depth refiner (Galteri et al., CVIU 2019; needs torch) to the medium
        depth, alone or before the fine stage; ``diagnostics["refiner"]`` records which.
    coarse : {"landmarks", "photometric"}
        ``"photometric"`` refines the landmark fit by analysis-by-synthesis through the
        differentiable renderer (:func:`geomfit.learned.fit_photometric`, Gecer et al.,
        Fast-GANFIT, TPAMI 2021; needs torch) before the medium stage.
    photometric_options : dict, optional
        Keyword arguments for :func:`geomfit.learned.fit_photometric`.

    Returns
    -------
    Reconstruction

    Raises
    ------
    ValueError
        Unreadable image or landmark file, landmarks outside the image, no face found.
    geomfit.data.ModelNotFoundError
        ``model="sfm"`` not installed (the message says to run ``geomfit download-model sfm``).

    References
    ----------
    Y. Jin, Q. Li, D. Jiang, R. Tong, "High-fidelity 3D face reconstruction with multi-scale details",
    Pattern Recognition Letters 2021, Secs. 3.2-3.4.
    P. Wang, C. Lin, B. Xu, W. Che, Q. Wang, "Low-frequency guided self-supervised learning for
    high-fidelity 3D face reconstruction in the wild", ICME 2020, Sec. 3.1, Eq. 1.
    """
    from .data import resolve_model

    coarse_kind = coarse
    if coarse_kind not in ("landmarks", "photometric"):
        raise ValueError(f"coarse must be 'landmarks' or 'photometric', got {coarse_kind!r}")
    log = progress or (lambda s: None)
    t_all = time.perf_counter()
    timings: Dict[str, float] = {}
    diag: Dict[str, Any] = {}

    img_full = load_photo(image)
    t = time.perf_counter()
    try:
        pts_full, info = _resolve_landmarks(img_full, landmarks, detector, log)
    except NoFaceError as e:  # name the photo, not "image" (the detector saw an array)
        if isinstance(image, (str, os.PathLike)) and os.fspath(image) not in str(e):
            raise NoFaceError(str(e).replace("no face found in image", f"no face found in {os.fspath(image)}", 1)) \
                from None
        raise
    timings["landmarks"] = time.perf_counter() - t

    img, ws = resize_longest(img_full, max_side)
    pts = pts_full * ws
    H, W = img.shape[:2]
    out = ~((pts[:, 0] >= 0) & (pts[:, 0] <= W) & (pts[:, 1] >= 0) & (pts[:, 1] <= H)) & np.isfinite(pts).all(1)
    if out.any():
        # a face cut by the image border: those landmarks are left out of the fits
        pts = pts.copy()
        pts[out] = np.nan
        log(f"{int(out.sum())} landmark(s) outside the image are ignored")
    diag["landmarks_outside_image"] = np.flatnonzero(out).tolist()
    log(f"working size {W}x{H} (scale {ws:.3f})")

    t = time.perf_counter()
    mdl = resolve_model(model)
    timings["model"] = time.perf_counter() - t

    from .camera import ScaledOrthographic
    from .fitting import fit_landmarks
    from .render import depth_normals, render_depth

    log("coarse: fitting the morphable model to the landmarks")
    t = time.perf_counter()
    coarse_fit = fit_landmarks(mdl, pts, image_size=(H, W), **(coarse_options or {}))
    if coarse_kind == "photometric":
        import dataclasses

        from .learned import fit_photometric

        log("coarse: photometric refinement (differentiable rendering)")
        pf = fit_photometric(mdl, srgb_to_linear(img), pts, landmark_fit=coarse_fit, **(photometric_options or {}))
        coarse_fit = dataclasses.replace(coarse_fit, id_coeffs=pf.id_coeffs, exp_coeffs=pf.exp_coeffs,
                                         rotation=pf.rotation, scale=pf.scale, translation=pf.translation)
        diag["photometric_error"] = pf.photometric_error
    coarse = coarse_fit
    timings["coarse"] = time.perf_counter() - t
    if not np.isfinite(np.asarray(coarse.rmse_px)):
        raise RuntimeError("coarse fit failed: non-finite landmark residual")
    cam = ScaledOrthographic(float(np.asarray(coarse.scale)), np.asarray(coarse.rotation),
                             np.asarray(coarse.translation))
    v_coarse = np.asarray(coarse.vertices)
    faces = np.asarray(mdl.faces, dtype=np.int64)
    rmse_work = fixed_landmark_rmse(mdl, coarse, pts)
    diag.update(
        landmark_rmse_px=rmse_work / ws,
        landmark_rmse_working_px=rmse_work,
        coarse_rmse_px=float(np.asarray(coarse.rmse_px)),
        coarse_iterations=int(np.asarray(coarse.iterations)),
        coarse_converged=bool(np.asarray(coarse.converged)),
        coarse_cost_history=np.asarray(coarse.cost_history, dtype=float).tolist(),
    )
    log(f"coarse: landmark RMS {diag['landmark_rmse_px']:.2f} px (inner landmarks)")

    log("medium: Laplacian deformation towards the landmarks")
    t = time.perf_counter()
    med = _run_medium(mdl, coarse, pts, (H, W), medium_options or {})
    v_medium = np.asarray(med.vertices, dtype=np.float64)
    timings["medium"] = time.perf_counter() - t
    diag["medium"] = {"method": med.method, "noise_px": float(med.noise_px), "handles": int(len(med.handle_indices)),
                      "moved_handles": int((np.abs(np.asarray(med.displacement_px)) > 0).any(1).sum())}

    # the medium depth is rendered from the mesh subdivided exactly as displace_mesh will subdivide it
    # (Phong tessellation): a coarse mesh's flat facets would otherwise show as a fine, even bumpiness
    # in the depth, the normals and the fine mesh
    sub = subdivide_for_view(v_medium, faces, cam, H, target_edge_px, max_subdivisions, smooth=subdivision)
    v_sub, f_sub, _ = sub
    d_med = np.asarray(render_depth(v_sub, f_sub, cam, H, W))
    mask = np.isfinite(d_med)
    if mask.sum() < 16:
        raise RuntimeError("the fitted face covers fewer than 16 pixels at the working size")
    d_start = d_med
    if refiner is not None:
        t = time.perf_counter()
        d_start, diag["refiner"] = _apply_refiner(refiner, d_med, mask, img, fine, log)
        timings["refiner"] = time.perf_counter() - t
    fine_res = None
    t = time.perf_counter()
    if fine:
        from .fine import fine_stage

        log("fine: lighting, albedo and shape-from-shading")
        r0, r1, c0, c1 = crop_box(mask)
        sub_img = srgb_to_linear(img[r0:r1, c0:c1])
        sub_d = d_start[r0:r1, c0:c1]
        sub_m = mask[r0:r1, c0:c1]
        sub_pts = _complete_landmarks(pts, coarse, mdl)
        sub_pts = None if sub_pts is None else sub_pts - [c0, r0]
        fine_res = fine_stage(sub_img, np.where(sub_m, sub_d, 0.0), sub_m, landmarks=sub_pts,
                              options=fine_options)
        depth = np.full((H, W), np.nan)
        normals = np.full((H, W, 3), np.nan)
        albedo = np.full((H, W, 3), np.nan)
        rd = np.asarray(fine_res.depth, dtype=np.float64)
        depth[r0:r1, c0:c1] = np.where(sub_m, rd, np.nan)
        normals[r0:r1, c0:c1] = np.where(sub_m[..., None], np.asarray(fine_res.normals), np.nan)
        albedo[r0:r1, c0:c1] = np.where(sub_m[..., None], np.asarray(fine_res.albedo), np.nan)
        sh, spec = fine_res.sh, getattr(fine_res, "specular", None)
        diag["fine_energy"] = _jsonable(getattr(fine_res, "energy", None))
        diag["fine_timings"] = _jsonable(getattr(fine_res, "timings", None))
        conf = getattr(fine_res, "confidence", None)
        if conf is not None:  # robust method: where the image was trusted to say something about the shape
            c = np.asarray(conf)[sub_m]
            diag["fine_supported_fraction"] = float((c > 0.5).mean()) if c.size else 0.0
    else:
        depth, normals = d_start.copy(), np.asarray(depth_normals(d_start))
        albedo, sh, spec = np.full((H, W, 3), np.nan), None, None
    timings["fine"] = time.perf_counter() - t

    t = time.perf_counter()
    if fine or refiner is not None:
        delta = np.where(mask, depth - d_med, 0.0)
        if feather_px > 0:
            # fade the change out towards the silhouette, where depth from shading is least reliable
            import cv2

            dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
            delta = delta * np.clip(dist / feather_px, 0.0, 1.0)
        v_fine, f_fine, dinfo = displace_mesh(v_medium, faces, cam, delta, H, target_edge_px=target_edge_px,
                                              max_subdivisions=max_subdivisions, smooth=subdivision, subdivided=sub)
        diag.update(fine_mesh=dinfo)
        diag["fine_depth_change_px"] = {
            "mean_abs": float(np.abs(delta[mask]).mean()), "max_abs": float(np.abs(delta[mask]).max())}
    else:
        v_fine, f_fine = v_medium.copy(), faces
    timings["fine_mesh"] = time.perf_counter() - t
    diag["folded_triangles"] = _fold_counts(mdl, v_coarse, v_medium, faces, v_fine if fine else None,
                                            f_fine if fine else None, v_sub, f_sub)
    log(f"folded triangles (normal turned > 60 deg): medium {diag['folded_triangles']['medium']}"
        + (f", fine {diag['folded_triangles'].get('fine')}" if fine else ""))
    timings["total"] = time.perf_counter() - t_all
    log(f"done in {timings['total']:.1f} s")

    return Reconstruction(
        image=img, landmarks=pts, landmarks_info=info, photo_size=tuple(img_full.shape[:2]), working_scale=ws, model=mdl,
        coarse=Mesh(v_coarse, faces), medium=Mesh(v_medium, faces), fine=Mesh(v_fine, f_fine),
        camera=cam, id_coeffs=np.asarray(coarse.id_coeffs), exp_coeffs=np.asarray(coarse.exp_coeffs),
        depth=depth, normals=normals, albedo=albedo, medium_depth=d_med, mask=mask, sh=sh, specular=spec,
        timings=timings, diagnostics=diag, stages={"coarse": coarse, "medium": med, "fine": fine_res},
    )


def _apply_refiner(refiner, d_med, mask, img, fine, log):
    """Run the learned refiner on the medium depth; returns (refined depth, report dict)."""
    if isinstance(refiner, (str, os.PathLike)):
        from .learned.refiner import Refiner

        name = str(refiner)
        refiner = Refiner.load(refiner)
    else:
        name = type(refiner).__name__
    log(f"refiner: {name} ({getattr(refiner, 'config', '?')})")
    lin = srgb_to_linear(img)
    d = np.asarray(refiner.refine(np.where(mask, d_med, np.nan), mask, lin), dtype=np.float64)
    change = np.abs(d - d_med)[mask]
    return np.where(mask, d, np.nan), {
        "refiner": name, "config": getattr(refiner, "config", None), "resolution": getattr(refiner, "resolution", None),
        "applied": "after the medium stage, before the fine stage" if fine else "after the medium stage (alone)",
        "mean_abs_change_px": float(change.mean()), "max_abs_change_px": float(change.max()),
        "safeguard": getattr(refiner, "last_safeguard", None)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


# -- output files ---------------------------------------------------------------------------------
#: The files of a result folder, in the order they are written; ``report.json`` comes last.
RESULT_FILES = ("coarse.obj", "medium.obj", "fine.obj", "depth.png", "normal.png", "albedo.png", "maps.npz",
                "overview.png", "report.json")


def _import_trimesh():
    """Import trimesh with SIGINT/SIGTERM held back: its optional imports catch ``BaseException``
    and would swallow a Ctrl-C that arrives meanwhile (it is then raised right after)."""
    from .atomic import signals_deferred

    with signals_deferred():
        import trimesh  # noqa: F401


def build_report(rec: Reconstruction, *, image=None, model_argument=None, parameters=None, files=()) -> dict:
    """The content of ``report.json`` for a reconstruction (see docs/pipeline.md)."""
    cam = rec.camera
    version = __import__("geomfit").__version__
    return {
        "geomfit_version": version,
        "image": None if image is None else str(image),
        "image_size": [int(rec.photo_size[1]), int(rec.photo_size[0])],
        "working_size": [int(rec.image.shape[1]), int(rec.image.shape[0])],
        "working_scale": rec.working_scale,
        "model": {"name": getattr(rec.model, "name", str(model_argument)), "argument": str(model_argument),
                  "n_vertices": rec.model.n_vertices, "n_id": rec.model.n_id, "n_exp": rec.model.n_exp},
        "landmarks": {k: v for k, v in rec.landmarks_info.items()},
        "parameters": dict(parameters or {}),
        "timings_s": rec.timings,
        "landmark_rmse_px": rec.diagnostics.get("landmark_rmse_px"),
        "diagnostics": rec.diagnostics,
        "camera": {"scale": float(np.asarray(cam.scale)), "rotation": np.asarray(cam.rotation),
                   "translation": np.asarray(cam.translation),
                   "convention": "u = s (R v)_x + t_x, row = H - (s (R v)_y + t_y), working-size pixels"},
        "coefficients": {"id": rec.id_coeffs, "exp": rec.exp_coeffs},
        "lighting_sh": None if rec.sh is None else np.asarray(rec.sh),
        "meshes": {n: {"vertices": getattr(rec, n).n_vertices, "faces": int(getattr(rec, n).faces.shape[0])}
                   for n in ("coarse", "medium", "fine")},
        "files": list(files),
    }


def write_outputs(rec: Reconstruction, folder, *, ply: bool = False, image=None, model_argument=None,
                  parameters=None, final=None) -> list:
    """Write a reconstruction's files into ``folder`` (which must exist); ``report.json`` last.

    Normally ``folder`` is the staging folder of a :class:`geomfit.atomic.ResultDir` (as in
    :func:`save_reconstruction` and the ``geomfit`` command), so that the result appears as a whole.
    An ``OSError`` (disk full, permissions) is re-raised naming the file as it will be called
    in the result folder ``final`` (default: ``folder``).

    Parameters
    ----------
    rec : Reconstruction
    folder : path
        Where to write.
    ply : bool
        Also write ``.ply`` meshes.
    image, model_argument, parameters :
        Recorded in ``report.json``.
    final : path, optional
        The result folder's name to use in error messages.

    Returns
    -------
    list of str
        The names written.
    """
    import pathlib

    from . import atomic
    from .overview import albedo_to_image, depth_to_image, normals_to_image, overview_image

    _import_trimesh()
    folder = pathlib.Path(folder)
    names = [f"{n}{e}" for n in ("coarse", "medium", "fine") for e in ([".obj"] + ([".ply"] if ply else []))]
    names += ["depth.png", "normal.png", "albedo.png", "maps.npz", "overview.png"]
    files = []
    dimg, (lo, hi) = depth_to_image(rec.depth)

    def one(name):
        target = folder / name
        stem, ext = name.rsplit(".", 1)
        if stem in ("coarse", "medium", "fine"):
            with atomic.signals_deferred():  # trimesh's exporters catch BaseException in places
                getattr(rec, stem).save(target)
        elif name == "depth.png":
            atomic.write_image(target, dimg)
        elif name == "normal.png":
            atomic.write_image(target, normals_to_image(rec.normals))
        elif name == "albedo.png":
            atomic.write_image(target, albedo_to_image(rec.albedo))
        elif name == "maps.npz":
            with atomic.atomic_open(target, "wb") as f:
                np.savez_compressed(f, depth=rec.depth, normals=rec.normals, albedo=rec.albedo,
                                    medium_depth=rec.medium_depth, mask=rec.mask, landmarks=rec.landmarks)
        elif name == "overview.png":
            title = (f"geomfit: {pathlib.Path(str(image)).name if image is not None else ''}  |  landmark RMS "
                     f"{rec.diagnostics['landmark_rmse_px']:.2f} px  |  {rec.timings['total']:.1f} s")
            atomic.write_image(target, overview_image(rec, title=title))
        elif name == "report.json":
            report = build_report(rec, image=image, model_argument=model_argument, parameters=parameters,
                                  files=files + ["report.json"])
            report["depth_png"] = {"min_px": lo, "max_px": hi,
                                   "decode": "depth = min_px + (png - 1) / 65534 * (max_px - min_px); png 0 = no surface"}
            atomic.write_json(target, report)

    for name in names + ["report.json"]:
        try:
            one(name)
        except OSError as e:
            where = pathlib.Path(final if final is not None else folder) / name
            raise OSError(e.errno, f"cannot write {where}: {e.strerror or e}") from e
        files.append(name)
        atomic.test_hook(f"write:{len(files)}")
    return files


def save_reconstruction(rec: Reconstruction, outdir, *, force: bool = False, ply: bool = False, image=None,
                        model_argument=None, parameters=None):
    """Write a reconstruction's result folder as a whole (old set or new set, never a mix).

    The folder is claimed (:class:`geomfit.atomic.ResultDir`: writable, not in use by another
    process, empty or ``force``), the files are written into a hidden sibling folder and swapped in
    when all are written.

    Returns
    -------
    pathlib.Path
        The result folder.
    """
    from .atomic import ResultDir, test_hook

    with ResultDir(outdir, force=force) as rd:
        write_outputs(rec, rd.staging, ply=ply, image=image, model_argument=model_argument,
                      parameters=parameters, final=rd.path)
        test_hook("commit")
        return rd.commit()
