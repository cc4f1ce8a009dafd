"""Medium stage: landmark-driven sparse Laplacian deformation (seed 004, section 3.3).

The coarse 3DMM mesh is fine-tuned so that landmark vertices move to 3D targets while every vertex
keeps its Laplacian coordinate (seed 004 Eq. 2 and 3, with squared norms)::

    E(V') = sum_i ||L(v'_i) - L(v_i)||^2 + sum_j w_j ||v'_{h_j} - mu_j||^2

Setting the gradient to zero gives the normal equations ``(L^T L + W) V' = L^T L V + W mu`` with
``W`` the diagonal matrix holding ``w_j`` at the handle rows ``h_j``. The matrix does not depend on
the targets, so :class:`LaplacianDeformer` assembles and factors it once (sparse Cholesky through
:func:`geomfit.backend.factorize_spd`) and every :meth:`~LaplacianDeformer.deform` is one
triangular solve with all coordinate columns (and all batch items) at once. Changing a few handle
weights is a rank-k update of the factor, not a refactorisation.

:func:`medium_stage` adds the paper's correspondence step: landmarks in the image are tied to mesh
vertices through the rasterised vertex-index map, their targets are the landmark's image position at
the vertex's own depth (``mu = (x, y, z')``), mapped back to model space by the inverse of the
scaled-orthographic camera.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from . import ibug
from .camera import ScaledOrthographic
from .mesh import cotangent_laplacian, uniform_laplacian
from .backend import asnumpy, factorize_spd, get_array_module, is_cupy, sparse_module, to_device

__all__ = [
    "LaplacianDeformer",
    "laplacian_deform",
    "ibug_region_weights",
    "landmark_weights",
    "MediumResult",
    "medium_stage",
    "IBUG_REGIONS",
    "DEFAULT_REGION_WEIGHTS",
]

# iBUG 68-point regions as 1-based numbers (the keys of ``model.landmarks``), from geomfit.ibug.
IBUG_REGIONS: Dict[str, range] = {name: range(r.start + 1, r.stop + 1) for name, r in ibug.REGIONS.items()}
#: Seed 004 section 4.1: 0.6 for eyes and nose, 0.1 for brows and mouth. The jaw/contour weight is
#: geomfit's choice (the paper gives "lower weights for the boundary" without a number): 0.05,
#: because the ``mu = (x, y, z')`` approximation is worst at the silhouette.
DEFAULT_REGION_WEIGHTS: Dict[str, float] = {"jaw": 0.05, "brows": 0.1, "nose": 0.6, "eyes": 0.6, "mouth": 0.1}


def ibug_region_weights(eyes: float = 0.6, nose: float = 0.6, brows: float = 0.1, mouth: float = 0.1,
                        jaw: float = 0.05) -> Dict[int, float]:
    """Handle weight per iBUG 68-point landmark number (1-based), by face region.

    Parameters
    ----------
    eyes, nose, brows, mouth : float
        Region weights; defaults from seed 004 section 4.1 (0.6 eyes and nose, 0.1 brows and mouth).
    jaw : float
        Weight of the jaw contour (iBUG 1-17). The paper only says boundary landmarks get lower
        weights; geomfit uses 0.05.

    Returns
    -------
    dict of int -> float
        ``{1: jaw, ..., 17: jaw, 18: brows, ..., 68: mouth}``.

    Raises
    ------
    ValueError
        If a weight is not finite and positive.
    """
    w = {"jaw": jaw, "brows": brows, "nose": nose, "eyes": eyes, "mouth": mouth}
    for k, val in w.items():
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"ibug_region_weights: {k} weight must be finite and > 0, got {val!r}")
    return {i: float(w[name]) for name, rng in IBUG_REGIONS.items() for i in rng}


def landmark_weights(ibug_numbers, default: float = 0.1, **region_weights) -> np.ndarray:
    """Array of handle weights for a sequence of iBUG numbers (1-based); others get ``default``.

    ``region_weights`` are passed to :func:`ibug_region_weights`.
    """
    table = ibug_region_weights(**region_weights)
    nums = np.asarray(ibug_numbers).reshape(-1)
    return np.array([table.get(int(i), default) for i in nums], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# input checks and assembly
# ----------------------------------------------------------------------------------------------

def _check_mesh(vertices, faces):
    v = np.asarray(asnumpy(vertices))
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] == 0:
        raise ValueError(f"vertices must have shape (N, 3) with N > 0, got {v.shape}")
    if not np.issubdtype(v.dtype, np.number):
        raise TypeError(f"vertices must be numeric, got dtype {v.dtype}")
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("vertices contain NaN or infinite values")
    f = np.asarray(asnumpy(faces))
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise ValueError(f"faces must have shape (F, 3) with F > 0, got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        if np.issubdtype(f.dtype, np.floating) and np.all(f == np.round(f)):
            f = f.astype(np.int64)
        else:
            raise TypeError(f"faces must be integer vertex indices, got dtype {f.dtype}")
    f = f.astype(np.int64)
    n = v.shape[0]
    if f.min() < 0 or f.max() >= n:
        raise ValueError(f"faces reference vertices outside [0, {n}): min {f.min()}, max {f.max()}")
    bad = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
    if bad.any():
        raise ValueError(f"faces contain {int(bad.sum())} degenerate triangle(s) with a repeated vertex "
                         f"(first: face {int(np.flatnonzero(bad)[0])})")
    used = np.zeros(n, dtype=bool)
    used[f.ravel()] = True
    if not used.all():
        un = np.flatnonzero(~used)
        raise ValueError(f"{un.size} vertices are not referenced by any face (first: {un[:5].tolist()}): "
                         "their Laplacian row is empty and the system is singular; remove them first")
    return v, f


def _check_handles(handle_indices, n):
    h = np.asarray(asnumpy(handle_indices))
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"handle_indices must be a non-empty 1-D array, got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.integer):
        raise TypeError(f"handle_indices must be integers, got dtype {h.dtype}")
    h = h.astype(np.int64)
    if h.min() < 0 or h.max() >= n:
        raise ValueError(f"handle_indices out of range [0, {n}): min {h.min()}, max {h.max()}")
    u, c = np.unique(h, return_counts=True)
    if (c > 1).any():
        raise ValueError(f"handle_indices contain repeated vertices: {u[c > 1][:10].tolist()}")
    return h


def _check_weights(w, m, name="handle_weights"):
    w = np.asarray(asnumpy(w), dtype=np.float64)
    if w.ndim == 0:
        w = np.full(m, float(w))
    if w.shape != (m,):
        raise ValueError(f"{name} must be a scalar or have shape ({m},), got {w.shape}")
    if not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"{name} must be finite and > 0 (got min {np.nanmin(w) if w.size else 'n/a'}, "
                         f"{int((~np.isfinite(w)).sum())} non-finite)")
    return w


def _laplacian(v, f, kind):
    """Row-normalised Laplacian ``I - diag(1/sum w) W`` (seed 004 Eq. 2) as CSR."""
    n = v.shape[0]
    if kind == "uniform":
        return sp.csr_matrix(uniform_laplacian(f, n))
    if kind == "cotangent":
        C = sp.csr_matrix(cotangent_laplacian(v, f))  # libigl convention: off-diagonal cot weights
        if not np.all(np.isfinite(C.data)):
            raise ValueError("cotangent weights are not finite (zero-area triangles?)")
        s = -C.diagonal()  # sum of the off-diagonal weights per row
        if np.any(s <= 1e-12 * max(1.0, np.abs(s).max())):
            bad = np.flatnonzero(s <= 1e-12 * max(1.0, np.abs(s).max()))
            raise ValueError(f"cotangent weights sum to <= 0 at {bad.size} vertices (first {bad[:5].tolist()}): "
                             "degenerate triangles; use weights='uniform' or clean the mesh")
        return sp.csr_matrix(sp.diags(1.0 / s) @ (-C))
    raise ValueError(f"weights must be 'uniform' or 'cotangent', got {kind!r}")


def _check_components(f, n, h):
    """Every connected component needs a handle, else L^T L + W is singular there."""
    i = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    j = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    G = sp.csr_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n))
    ncomp, labels = connected_components(G, directed=False)
    if ncomp > 1:
        has = np.zeros(ncomp, dtype=bool)
        has[labels[h]] = True
        if not has.all():
            miss = np.flatnonzero(~has)
            raise ValueError(f"the mesh has {ncomp} connected components and {miss.size} of them contain no "
                             f"handle (e.g. component with vertex {int(np.flatnonzero(labels == miss[0])[0])}): "
                             "their position is undetermined (singular system); add a handle per component "
                             "or remove the piece")
    return ncomp


# ----------------------------------------------------------------------------------------------
# the deformer
# ----------------------------------------------------------------------------------------------

class LaplacianDeformer:
    """Factor-once / solve-many Laplacian mesh deformation with soft handle constraints.

    Minimises seed 004 Eq. (3) with squared norms::

        E(V') = sum_i ||L v'_i - L v_i||^2 + sum_j w_j ||v'_{h_j} - mu_j||^2

    whose normal equations are ``A V' = L^T L V + W mu`` with ``A = L^T L + W``.

    Parameters
    ----------
    vertices : array (N, 3)
        Rest geometry ``V`` (the coarse mesh). A CuPy array selects the GPU path (the system is
        assembled on the host, then factored/solved on the device through
        :func:`geomfit.backend.factorize_spd`: cholespy, else Jacobi-preconditioned CG with warm start).
    faces : int array (F, 3)
    handle_indices : int array (M,)
        Distinct vertex indices of the handles (landmark vertices).
    handle_weights : float or array (M,), default 0.6
        ``w_j > 0`` (seed 004 section 4.1 uses 0.6 for eyes and nose, 0.1 for brows and mouth; see
        :func:`ibug_region_weights`).
    weights : {"uniform", "cotangent"}
        Laplacian weights ``omega_ij``: ``1/N_i`` as in the paper's Eq. (2), or cotangent weights
        normalised to sum to one per vertex.
    method : str, optional
        Forwarded to :func:`~geomfit.backend.factorize_spd` (``"cholmod"``, ``"superlu"``, ``"cholespy"``,
        ``"cg"``).
    ordering : {None, "amd", "metis", "nesdis", "colamd"}, optional
        CHOLMOD fill-reducing ordering (of the non-handle vertices when ``handles_last``), forwarded
        to :func:`~geomfit.backend.factorize_spd`; ``None`` is CHOLMOD's default (AMD).
    handles_last : bool, default False
        Eliminate the handle vertices last (``factorize_spd(..., last=handle_indices)``), for many
        :meth:`deform` calls on one deformer. The right-hand side of :meth:`deform` is zero outside the
        handle rows, so its forward solve then only touches the dense trailing ``M x M`` block of the
        factor and each :meth:`deform` costs one CHOLMOD backward solve instead of a forward and a
        backward one. The price is a slower set-up (more fill, and the trailing block is copied out):
        on the 51,840-vertex benchmark with 1,000 handles about 0.2-0.4 s more set-up for about 5-6 ms
        less per deform (``benchmarks/results/laplacian.json``), so it pays after a few dozen deforms.
        ``False`` (default) factors ``A`` with CHOLMOD's ordering and solves the full right-hand side.

    Attributes
    ----------
    L : scipy.sparse.csr_matrix (N, N)
        The Laplacian (rows ``I - omega``).
    A : sparse matrix (N, N)
        The current system matrix ``L^T L + W``.
    factor : geomfit.backend.SPDFactor
    handle_indices, handle_weights : ndarray (M,)

    Raises
    ------
    ValueError
        Wrong shapes; faces out of range or with a repeated vertex; vertices no face references;
        handle indices out of range or repeated; non-positive or non-finite weights; a connected
        component without a handle (singular system).
    TypeError
        Non-integer faces or handle indices.

    Notes
    -----
    :meth:`deform` solves for the displacement ``D = V' - V``: since ``A V = L^T L V + W V_h``, the
    normal equations become ``A D = W (mu - V_h)``, whose right-hand side is non-zero only at the
    handle rows. Targets equal to the rest positions therefore return ``V`` exactly.

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details" (seed 004), section
    3.3, Eq. (2)-(3) and section 4.1 (weights); Sorkine et al., "Laplacian surface editing", SGP 2004.
    """

    def __init__(self, vertices, faces, handle_indices, handle_weights=0.6, weights: str = "uniform",
                 method: Optional[str] = None, ordering: Optional[str] = None, handles_last: bool = False):
        xp = get_array_module(vertices)
        self.xp = xp
        v, f = _check_mesh(vertices, faces)
        n = v.shape[0]
        h = _check_handles(handle_indices, n)
        w = _check_weights(handle_weights, h.size)
        if weights not in ("uniform", "cotangent"):
            raise ValueError(f"weights must be 'uniform' or 'cotangent', got {weights!r}")
        _check_components(f, n, h)
        self.kind = weights
        self.faces = f
        self.n = n
        self.handle_indices = h
        self.handle_weights = w
        self._v_host = v
        L = _laplacian(v, f, weights)
        self.L = L
        LtL = (L.T @ L).tocsc()
        A = (LtL + sp.csc_matrix((w, (h, h)), shape=(n, n))).tocsc()
        A.sort_indices()
        if xp is not np:
            A = sparse_module(xp).csr_matrix(A)
        try:
            self.factor = factorize_spd(A, method=method, ordering=ordering,
                                        last=h if handles_last else None)
        except np.linalg.LinAlgError as e:
            raise ValueError(f"LaplacianDeformer: the system L^T L + W is not positive definite ({e}); "
                             "check for degenerate mesh pieces") from e
        self.vertices = to_device(v, xp)
        self._rest_h = v[h]

    @property
    def A(self):
        return self.factor.A

    @property
    def n_handles(self) -> int:
        return int(self.handle_indices.size)

    # -- solve --------------------------------------------------------------------------------------
    def deform(self, targets):
        """Deformed vertices for handle targets.

        Parameters
        ----------
        targets : array (M, 3) or (B, M, 3)
            Target positions ``mu_j`` of the handles (same order as ``handle_indices``).

        Returns
        -------
        array (N, 3) or (B, N, 3)
            On the deformer's device. A batch is solved with one call (3B right-hand sides).

        Raises
        ------
        ValueError
            Wrong shape or non-finite targets.
        """
        xp = self.xp
        mu = targets
        if xp is np and is_cupy(mu):
            mu = asnumpy(mu)
        mu = xp.asarray(mu, dtype=xp.float64)
        m = self.n_handles
        if mu.ndim == 2:
            if mu.shape != (m, 3):
                raise ValueError(f"targets must have shape ({m}, 3) or (B, {m}, 3), got {tuple(mu.shape)}")
            batch = None
            mu = mu[None]
        elif mu.ndim == 3:
            if mu.shape[1:] != (m, 3) or mu.shape[0] == 0:
                raise ValueError(f"targets must have shape ({m}, 3) or (B, {m}, 3), got {tuple(mu.shape)}")
            batch = mu.shape[0]
        else:
            raise ValueError(f"targets must have shape ({m}, 3) or (B, {m}, 3), got {tuple(mu.shape)}")
        if not bool(xp.all(xp.isfinite(mu))):
            raise ValueError("targets contain NaN or infinite values")
        B = mu.shape[0]
        rest_h = to_device(self._rest_h, xp)
        w = to_device(self.handle_weights, xp)
        # rhs of A D = W (mu - V_h), columns ordered (batch, coordinate)
        r_h = (w[None, :, None] * (mu - rest_h[None])).transpose(1, 0, 2).reshape(m, 3 * B)
        if self.factor.last is not None:  # factored with the handles last: half a solve
            d = self.factor.solve_last(r_h)
        else:
            rhs = xp.zeros((self.n, 3 * B), dtype=xp.float64)
            rhs[to_device(self.handle_indices, xp)] = r_h
            d = self.factor.solve(rhs)
        out = self.vertices[None] + d.reshape(self.n, B, 3).transpose(1, 0, 2)
        return out[0] if batch is None else out

    __call__ = deform

    # -- weights ------------------------------------------------------------------------------------
    def set_weights(self, indices, new_weights) -> "LaplacianDeformer":
        """Change the weights of a few handles by a low-rank update of the factor.

        Parameters
        ----------
        indices : int array (k,)
            Positions in ``handle_indices`` (0 <= i < M), not vertex numbers.
        new_weights : float or array (k,)
            New weights, finite and > 0.

        Returns
        -------
        self

        Notes
        -----
        ``A`` changes by ``sum_j dw_j e_{h_j} e_{h_j}^T``: increases are one rank-k update
        ``A + C C^T`` with ``C = sqrt(dw) e_h``, decreases one downdate (``subtract=True``), both by
        :meth:`geomfit.backend.SPDFactor.update` (CHOLMOD's ``updown``; other back-ends refactor).

        Raises
        ------
        ValueError
            Indices out of range or repeated; weights not finite and positive.
        """
        idx = np.asarray(asnumpy(indices))
        if idx.ndim == 0:
            idx = idx[None]
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D integer array of handle positions, got {idx!r}")
        m = self.n_handles
        if idx.min() < 0 or idx.max() >= m:
            raise ValueError(f"handle positions out of range [0, {m}): {idx.min()}..{idx.max()}")
        if np.unique(idx).size != idx.size:
            raise ValueError("indices contain repeated handle positions")
        nw = _check_weights(new_weights, idx.size, name="new_weights")
        dw = nw - self.handle_weights[idx]
        rows = self.handle_indices[idx]
        xp = self.xp
        for mask, subtract in ((dw > 0, False), (dw < 0, True)):
            if not mask.any():
                continue
            k = int(mask.sum())
            C = sp.csc_matrix((np.sqrt(np.abs(dw[mask])), (rows[mask], np.arange(k))), shape=(self.n, k))
            if xp is not np:
                C = sparse_module(xp).csr_matrix(C)
            self.factor.update(C, subtract=subtract)
        self.handle_weights = self.handle_weights.copy()
        self.handle_weights[idx] = nw
        return self

    def energy(self, deformed, targets) -> float:
        """Value of Eq. (3) (squared norms) at ``deformed`` (N, 3) for ``targets`` (M, 3)."""
        V = asnumpy(deformed)
        mu = asnumpy(targets)
        lap = self.L @ (V - self._v_host)
        fit = V[self.handle_indices] - mu
        return float((lap ** 2).sum() + (self.handle_weights[:, None] * fit ** 2).sum())


def laplacian_deform(vertices, faces, handle_indices, targets, weights=0.6, laplacian_weights: str = "uniform"):
    """One-shot Laplacian deformation (see :class:`LaplacianDeformer`).

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    handle_indices : int array (M,)
    targets : array (M, 3) or (B, M, 3)
    weights : float or array (M,)
        Handle weights ``w_j`` of seed 004 Eq. (3).
    laplacian_weights : {"uniform", "cotangent"}

    Returns
    -------
    array (N, 3) or (B, N, 3)
    """
    return LaplacianDeformer(vertices, faces, handle_indices, weights, weights=laplacian_weights).deform(targets)


# ----------------------------------------------------------------------------------------------
# the paper's correspondence step + deformation
# ----------------------------------------------------------------------------------------------

@dataclass
class MediumResult:
    """Result of :func:`medium_stage`.

    Attributes
    ----------
    vertices : ndarray (N, 3)
        The medium mesh in model space.
    coarse_vertices : ndarray (N, 3)
    faces : ndarray (F, 3)
    handle_indices : ndarray of int (M,)
        Vertices used as handles.
    targets : ndarray (M, 3)
        Their model-space targets ``mu``.
    weights : ndarray (M,)
        Their weights.
    landmark_index : ndarray of int (M,)
        Row of ``landmarks_2d`` each handle came from.
    dropped : ndarray of int
        Rows of ``landmarks_2d`` not used (outside the image, on background, or a vertex already
        taken by an earlier landmark).
    deformer : LaplacianDeformer
        The factored system (re-use it to deform with new targets or weights).
    """

    vertices: np.ndarray
    coarse_vertices: np.ndarray
    faces: np.ndarray
    handle_indices: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    landmark_index: np.ndarray
    dropped: np.ndarray
    deformer: Any = field(repr=False, default=None)


def _camera_params(camera):
    if isinstance(camera, dict):
        R, s, t = camera["rotation"], camera["scale"], camera["translation"]
    else:
        R, s, t = camera.rotation, camera.scale, camera.translation
    R = np.asarray(asnumpy(R), dtype=np.float64)
    s = np.asarray(asnumpy(s), dtype=np.float64)
    t = np.asarray(asnumpy(t), dtype=np.float64)
    if R.shape != (3, 3) or s.size != 1 or t.shape != (2,):
        raise ValueError("medium_stage: one image at a time: rotation (3, 3), scalar scale, translation (2,) "
                         f"expected, got {R.shape}, {s.shape}, {t.shape}")
    s = float(s.reshape(()))
    if not (np.all(np.isfinite(R)) and np.isfinite(s) and s > 0 and np.all(np.isfinite(t))):
        raise ValueError("medium_stage: camera parameters must be finite with scale > 0")
    return R, s, t


def medium_stage(coarse, landmarks_2d, image_size=None, *, model=None, faces=None, camera=None,
                 landmark_ids=None, weights=None, dense_weight: float = 0.1, use_model_landmarks: bool = True,
                 index_map=None, laplacian_weights: str = "uniform") -> MediumResult:
    """Seed 004's medium stage: tie image landmarks to vertices and Laplacian-deform the coarse mesh.

    Parameters
    ----------
    coarse : LandmarkFit-like or array (N, 3)
        The coarse fit: an object with ``vertices``, ``rotation``, ``scale``, ``translation`` (and
        optionally ``model``, ``image_size``), as returned by :func:`geomfit.fit_landmarks`; or the
        coarse vertices (model space), in which case ``camera`` and ``faces`` (or ``model``) are needed.
    landmarks_2d : array (K, 2)
        Landmark pixel positions ``(x, y)``: origin top-left, y down (``.pts`` convention). 68 iBUG
        points or a dense set.
    image_size : (h, w), optional
        Defaults to ``coarse.image_size``.
    model : MorphableModel, optional
        Supplies ``faces`` and the iBUG -> vertex map ``model.landmarks`` (defaults to ``coarse.model``).
    faces : int array (F, 3), optional
        Mesh faces when no model is given.
    camera : ScaledOrthographic or dict, optional
        ``rotation`` (3, 3), ``scale``, ``translation`` (2,) when ``coarse`` is an array. Projection:
        ``x = s (R v)_x + t_x``, ``y = h - (s (R v)_y + t_y)``, depth ``z' = s (R v)_z``.
    landmark_ids : int array (K,), optional
        iBUG number (1-based) of each landmark; defaults to 1..68 when K == 68, else none (dense).
    weights : float or array (K,), optional
        Handle weight per landmark; default :func:`ibug_region_weights` for iBUG landmarks and
        ``dense_weight`` for the others.
    use_model_landmarks : bool
        Use ``model.landmarks`` for iBUG landmarks that have a fixed vertex (the others, e.g. the
        jaw contour, go through the index map).
    index_map : int array (h, w), optional
        Precomputed vertex-index map (-1 = background). By default the coarse mesh is rasterised
        with :func:`geomfit.render.rasterize`.
    laplacian_weights : {"uniform", "cotangent"}

    Returns
    -------
    MediumResult

    Raises
    ------
    ValueError
        Bad shapes, non-finite landmarks, no landmark landing on the mesh, missing camera/faces.
    ImportError
        When no ``index_map`` is given and :mod:`geomfit.render` is unavailable.

    Notes
    -----
    Each landmark ``s = (x, y)`` is tied to a vertex ``v``: its fixed model vertex when known, else
    the vertex in the index map at the landmark's pixel (row ``floor(y)``, column ``floor(x)``). Its
    target is ``(x, y, z')`` in screen space with ``z'`` the vertex's own depth (seed 004 section 3.3),
    mapped back to model space by the inverse camera, so the deformation only moves handles parallel
    to the image plane. A vertex hit by several landmarks keeps the first one. Landmarks outside the
    image or on background are dropped (listed in ``dropped``).

    References
    ----------
    Jin et al. (seed 004), section 3.3 (index maps, Eq. 3, ``mu = (x, y, z')``), section 4.1 (weights).
    """
    if model is None:
        model = getattr(coarse, "model", None)
    if hasattr(coarse, "vertices") and hasattr(coarse, "rotation"):
        verts = coarse.vertices
        if camera is None:
            camera = coarse
        if image_size is None:
            image_size = getattr(coarse, "image_size", None)
    else:
        verts = coarse
    if camera is None:
        raise ValueError("medium_stage: a camera (rotation, scale, translation) is needed with raw vertices")
    if image_size is None:
        raise ValueError("medium_stage: image_size (h, w) is needed")
    if faces is None:
        if model is None:
            raise ValueError("medium_stage: faces or a model with faces is needed")
        faces = model.faces
    v, f = _check_mesh(verts, faces)
    n = v.shape[0]
    R, s, t = _camera_params(camera)
    hw = np.asarray(asnumpy(image_size)).reshape(-1)
    if hw.size != 2 or np.any(hw <= 0):
        raise ValueError(f"medium_stage: image_size must be (h, w) > 0, got {image_size!r}")
    H, W = int(hw[0]), int(hw[1])
    lm = np.asarray(asnumpy(landmarks_2d), dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] == 0:
        raise ValueError(f"medium_stage: landmarks_2d must have shape (K, 2), got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ValueError("medium_stage: landmarks_2d contain NaN or infinite values")
    k = lm.shape[0]
    if landmark_ids is None:
        ids = np.arange(1, 69) if k == 68 else np.zeros(k, dtype=np.int64)
    else:
        ids = np.asarray(asnumpy(landmark_ids)).astype(np.int64).reshape(-1)
        if ids.shape != (k,):
            raise ValueError(f"medium_stage: landmark_ids must have shape ({k},), got {ids.shape}")
    if weights is None:
        table = ibug_region_weights()
        w_all = np.array([table.get(int(i), dense_weight) for i in ids], dtype=np.float64)
    else:
        w_all = _check_weights(weights, k, name="weights")

    cam = ScaledOrthographic(scale=s, rotation=R, translation=t)
    screen = np.asarray(cam.to_screen(v, H))
    vert = np.full(k, -1, dtype=np.int64)
    if use_model_landmarks and model is not None and getattr(model, "landmarks", None):
        known = np.array([int(model.landmarks.get(int(i), -1)) for i in ids])
        vert = np.where(known >= 0, known, vert)
    need = vert < 0
    if need.any():
        if index_map is None:
            try:
                from .render import rasterize
            except ImportError as e:  # pragma: no cover - geomfit.render is part of the package
                raise ImportError("medium_stage: geomfit.render.rasterize is needed to build the index map "
                                  "(or pass index_map=)") from e
            index_map = asnumpy(rasterize(screen, f, H, W).vertex_index)
        imap = np.asarray(asnumpy(index_map))
        if imap.shape != (H, W):
            raise ValueError(f"medium_stage: index_map must have shape ({H}, {W}), got {imap.shape}")
        col = np.floor(lm[:, 0]).astype(np.int64)
        row = np.floor(lm[:, 1]).astype(np.int64)
        inside = need & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        looked = np.full(k, -1, dtype=np.int64)
        looked[inside] = imap[row[inside], col[inside]]
        vert = np.where(need, looked, vert)
    if vert.max() >= n:
        raise ValueError(f"medium_stage: landmark vertices out of range [0, {n})")
    ok = vert >= 0
    first = np.zeros(k, dtype=bool)
    _, first_idx = np.unique(np.where(ok, vert, -1 - np.arange(k)), return_index=True)
    first[first_idx] = True
    use = ok & first
    if not use.any():
        raise ValueError("medium_stage: no landmark falls on the rendered coarse mesh")
    li = np.flatnonzero(use)
    h = vert[li]
    mu = np.asarray(cam.unproject(lm[li], screen[h, 2], H))
    deformer = LaplacianDeformer(v, f, h, w_all[li], weights=laplacian_weights)
    out = deformer.deform(mu)
    return MediumResult(vertices=out, coarse_vertices=v, faces=f, handle_indices=h, targets=mu,
                        weights=w_all[li], landmark_index=li, dropped=np.flatnonzero(~use), deformer=deformer)
