"""Medium stage: landmark-driven sparse Laplacian deformation.

Jin, Wang, Zhao, Yang and Zhou, "High-fidelity 3D face reconstruction with multi-scale details",
Pattern Recognition Letters 2021, Sec. 3.3: the coarse 3DMM mesh is fine-tuned so that landmark
vertices move to 3D targets while every vertex keeps its Laplacian coordinate (Eqs. 2 and 3, with
squared norms)::

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
scaled-orthographic camera. ``method="paper"`` does exactly that; the default ``method="robust"``
departs from the paper so that landmark noise is not fitted as shape (see :func:`medium_stage` and
docs/medium.md): handle displacements shrunk by the landmark noise level, trust weights by pose,
jaw-contour landmarks matched to the coarse silhouette, and a cotangent bi-Laplacian energy
(``energy="biharmonic"``) whose solution is smooth around point handles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Dict, Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from . import ibug
from .camera import ScaledOrthographic
from .mesh import cotangent_laplacian, face_normals, mass_matrix, uniform_laplacian
from .backend import asnumpy, factorize_spd, get_array_module, sparse_on_device, to_device

__all__ = [
    "LaplacianDeformer",
    "laplacian_deform",
    "ibug_region_weights",
    "landmark_weights",
    "folded_triangles",
    "estimate_landmark_noise",
    "MediumResult",
    "medium_stage",
    "IBUG_REGIONS",
    "DEFAULT_REGION_WEIGHTS",
    "JAW_CONTOUR",
]

# iBUG 68-point regions as 1-based numbers (the keys of ``model.landmarks``), from geomfit.ibug.
IBUG_REGIONS: Dict[str, range] = {name: range(r.start + 1, r.stop + 1) for name, r in ibug.REGIONS.items()}
#: Jin et al. 2021, Sec. 4.1: 0.6 for eyes and nose, 0.1 for brows and mouth. The jaw/contour weight is
#: geomfit's choice (the paper gives "lower weights for the boundary" without a number): 0.05,
#: because the ``mu = (x, y, z')`` approximation is worst at the silhouette.
DEFAULT_REGION_WEIGHTS: Dict[str, float] = {"jaw": 0.05, "brows": 0.1, "nose": 0.6, "eyes": 0.6, "mouth": 0.1}


def ibug_region_weights(eyes: float = 0.6, nose: float = 0.6, brows: float = 0.1, mouth: float = 0.1,
                        jaw: float = 0.05) -> Dict[int, float]:
    """Handle weight per iBUG 68-point landmark number (1-based), by face region.

    Parameters
    ----------
    eyes, nose, brows, mouth : float
        Region weights; defaults from Jin et al., "High-fidelity 3D face reconstruction with
        multi-scale details", Pattern Recognition Letters 2021, Sec. 4.1 (0.6 eyes and nose, 0.1
        brows and mouth).
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
    """Row-normalised Laplacian ``I - diag(1/sum w) W`` (Jin et al. 2021, Eq. 2) as CSR."""
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

_PAPER_REF = ('Jin, Wang, Zhao, Yang, Zhou, "High-fidelity 3D face reconstruction with multi-scale details", '
              "Pattern Recognition Letters, 2021")


def _bilaplacian(v, f):
    """``(C, Q)``: cotangent Laplacian and bi-Laplacian ``Q = C^T (M / mbar)^-1 C`` (dimensionless, scale-invariant).

    ``C`` is the cotangent Laplacian, ``M`` the lumped Voronoi mass matrix and ``mbar`` its mean
    entry, so ``D^T Q D`` is ``mbar`` times the discrete integral of ``|Delta D|^2`` (Laplace-Beltrami
    of the displacement squared), the energy of biharmonic deformation.
    """
    C = sp.csr_matrix(cotangent_laplacian(v, f))
    if not np.all(np.isfinite(C.data)):
        raise ValueError("cotangent weights are not finite (zero-area triangles?)")
    m = np.asarray(mass_matrix(v, f, "voronoi").diagonal(), dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m <= 1e-12 * max(1e-300, float(np.abs(m).max()))):
        bad = np.flatnonzero(~(m > 1e-12 * max(1e-300, float(np.abs(m).max()))))
        raise ValueError(f"energy='biharmonic': {bad.size} vertices have zero area (first {bad[:5].tolist()}): "
                         "degenerate triangles; use energy='laplacian' or clean the mesh")
    return C, (C.T @ sp.diags(m.mean() / m) @ C).tocsc()


def _renamed(old, new, value, where):
    warnings.warn(f"{where}: the keyword {old!r} is deprecated, use {new!r} (it names the Laplacian's "
                  "edge weights, not the handle weights)", DeprecationWarning, stacklevel=3)
    return value


class LaplacianDeformer:
    """Factor-once / solve-many Laplacian mesh deformation with soft handle constraints.

    With ``energy="laplacian"`` (the paper's) it minimises Jin et al. 2021 Eq. (3) with squared
    norms::

        E(V') = sum_i ||L v'_i - L v_i||^2 + sum_j w_j ||v'_{h_j} - mu_j||^2

    whose normal equations are ``A V' = L^T L V + W mu`` with ``A = L^T L + W``. With
    ``energy="biharmonic"`` the first term is the cotangent bi-Laplacian energy of the displacement
    ``D = V' - V``, ``D^T C^T (M / mbar)^-1 C D`` (``C`` cotangent Laplacian, ``M`` lumped Voronoi
    areas, ``mbar`` their mean), whose solutions are smooth (C1) around point handles, as in libigl's
    ``harmonic(..., k=2)`` deformation (Jacobson et al. 2010) but with soft handles.

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
        ``w_j > 0`` (Jin et al. 2021, Sec. 4.1, use 0.6 for eyes and nose, 0.1 for brows and mouth;
        see :func:`ibug_region_weights`).
    laplacian : {"uniform", "cotangent"}
        Edge weights ``omega_ij`` of the Laplacian of ``energy="laplacian"``: ``1/N_i`` as in the
        paper's Eq. (2), or cotangent weights normalised to sum to one per vertex. Ignored by
        ``energy="biharmonic"`` (always cotangent).
    energy : {"laplacian", "biharmonic"}
        The smoothness term (see above); ``"laplacian"`` is the paper's Eq. (3).
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
    weights : {"uniform", "cotangent"}, optional
        Deprecated name of ``laplacian`` (a :class:`DeprecationWarning` is issued).

    Attributes
    ----------
    L : scipy.sparse.csr_matrix (N, N)
        The Laplacian (rows ``I - omega``; for ``energy="biharmonic"`` the cotangent Laplacian ``C``).
    Q : scipy.sparse.csc_matrix (N, N)
        The smoothness matrix (``L^T L`` or the bi-Laplacian above).
    A : sparse matrix (N, N)
        The current system matrix ``Q + W``.
    factor : geomfit.backend.SPDFactor
    handle_indices, handle_weights : ndarray (M,)
    energy_kind : str

    Raises
    ------
    ValueError
        Wrong shapes; faces out of range or with a repeated vertex; vertices no face references;
        handle indices out of range or repeated; non-positive or non-finite weights; a connected
        component without a handle (singular system); zero-area vertices with cotangent weights.
    TypeError
        Non-integer faces or handle indices.

    Notes
    -----
    :meth:`deform` solves for the displacement ``D = V' - V``: since ``A V = Q V + W V_h`` for
    ``Q = L^T L``, the normal equations become ``A D = W (mu - V_h)``, whose right-hand side is
    non-zero only at the handle rows. Targets equal to the rest positions therefore return ``V``
    exactly. The bi-Laplacian energy is defined on ``D`` directly, with the same normal equations.

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition
    Letters 2021, Sec. 3.3, Eqs. (2)-(3) and Sec. 4.1 (weights); Sorkine et al., "Laplacian surface
    editing", SGP 2004; Jacobson, Tosun, Sorkine, Zorin, "Mixed finite elements for variational
    surface modeling", SGP 2010 (biharmonic deformation).
    """

    def __init__(self, vertices, faces, handle_indices, handle_weights=0.6, laplacian: Optional[str] = None,
                 method: Optional[str] = None, ordering: Optional[str] = None, handles_last: bool = False,
                 energy: str = "laplacian", weights: Optional[str] = None):
        if weights is not None:
            if laplacian is not None:
                raise TypeError("LaplacianDeformer: give 'laplacian' only ('weights' is its deprecated name)")
            laplacian = _renamed("weights", "laplacian", weights, "LaplacianDeformer")
        laplacian = "uniform" if laplacian is None else laplacian
        xp = get_array_module(vertices)
        self.xp = xp
        v, f = _check_mesh(vertices, faces)
        n = v.shape[0]
        h = _check_handles(handle_indices, n)
        w = _check_weights(handle_weights, h.size)
        if laplacian not in ("uniform", "cotangent"):
            raise ValueError(f"laplacian must be 'uniform' or 'cotangent', got {laplacian!r}")
        if energy not in ("laplacian", "biharmonic"):
            raise ValueError(f"energy must be 'laplacian' (Jin et al. 2021 Eq. 3) or 'biharmonic', got {energy!r}")
        _check_components(f, n, h)
        self.kind = laplacian if energy == "laplacian" else "cotangent"
        self.energy_kind = energy
        self.faces = f
        self.n = n
        self.handle_indices = h
        self.handle_weights = w
        self._v_host = v
        if energy == "laplacian":
            L = _laplacian(v, f, laplacian)
            Q = (L.T @ L).tocsc()
        else:
            L, Q = _bilaplacian(v, f)
        self.L = L
        self.Q = Q
        A = (Q + sp.csc_matrix((w, (h, h)), shape=(n, n))).tocsc()
        A.sort_indices()
        A = sparse_on_device(A, xp)
        try:
            self.factor = factorize_spd(A, method=method, ordering=ordering,
                                        last=h if handles_last else None)
        except np.linalg.LinAlgError as e:
            raise ValueError(f"LaplacianDeformer: the system matrix Q + W is not positive definite ({e}); "
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
        mu = to_device(mu, xp).astype(xp.float64, copy=False)
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
            C = sparse_on_device(C, xp)
            self.factor.update(C, subtract=subtract)
        self.handle_weights = self.handle_weights.copy()
        self.handle_weights[idx] = nw
        return self

    def energy(self, deformed, targets) -> float:
        """Value of the minimised energy at ``deformed`` (N, 3) for ``targets`` (M, 3).

        Eq. (3) of Jin et al. 2021 (squared norms) for ``energy="laplacian"``, the bi-Laplacian energy
        of the displacement plus the same handle term for ``energy="biharmonic"``.
        """
        V = np.asarray(asnumpy(deformed), dtype=np.float64)
        mu = np.asarray(asnumpy(targets), dtype=np.float64)
        D = V - self._v_host
        smooth = float((D * (self.Q @ D)).sum())
        fit = V[self.handle_indices] - mu
        return smooth + float((self.handle_weights[:, None] * fit ** 2).sum())


def laplacian_deform(vertices, faces, handle_indices, targets, weights=0.6, laplacian: Optional[str] = None,
                     energy: str = "laplacian", laplacian_weights: Optional[str] = None):
    """One-shot Laplacian deformation (see :class:`LaplacianDeformer`).

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    handle_indices : int array (M,)
    targets : array (M, 3) or (B, M, 3)
    weights : float or array (M,)
        Handle weights ``w_j`` of Jin et al. 2021, Eq. (3).
    laplacian : {"uniform", "cotangent"}
        Edge weights of the Laplacian (default ``"uniform"``, the paper's Eq. 2).
    energy : {"laplacian", "biharmonic"}
    laplacian_weights : {"uniform", "cotangent"}, optional
        Deprecated name of ``laplacian``.

    Returns
    -------
    array (N, 3) or (B, N, 3)

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition
    Letters 2021, Sec. 3.3, Eqs. (2)-(3).
    """
    if laplacian_weights is not None:
        if laplacian is not None:
            raise TypeError("laplacian_deform: give 'laplacian' only ('laplacian_weights' is its deprecated name)")
        laplacian = _renamed("laplacian_weights", "laplacian", laplacian_weights, "laplacian_deform")
    return LaplacianDeformer(vertices, faces, handle_indices, weights, laplacian=laplacian,
                             energy=energy).deform(targets)


def folded_triangles(reference_vertices, vertices, faces, max_angle_deg: float = 60.0) -> int:
    """Number of triangles whose normal turned by more than ``max_angle_deg`` between two meshes.

    A fold or a spike turns triangle normals sharply; a smooth deformation of a face mesh turns
    them by a few degrees. Degenerate (zero-area) triangles in either mesh count as folded.

    Parameters
    ----------
    reference_vertices, vertices : array (N, 3)
        The same triangulation before and after (e.g. the coarse and the medium mesh).
    faces : int array (F, 3)
    max_angle_deg : float

    Returns
    -------
    int

    Raises
    ------
    ValueError
        Shapes that disagree, faces out of range, non-finite vertices, an angle outside (0, 180).
    """
    v0 = np.asarray(asnumpy(reference_vertices), dtype=np.float64)
    v1 = np.asarray(asnumpy(vertices), dtype=np.float64)
    if v0.ndim != 2 or v0.shape[1] != 3 or v0.shape != v1.shape:
        raise ValueError(f"folded_triangles: both vertex arrays must have the same shape (N, 3), got {v0.shape} "
                         f"and {v1.shape}")
    if not (np.isfinite(v0).all() and np.isfinite(v1).all()):
        raise ValueError("folded_triangles: vertices contain NaN or infinite values")
    f = np.asarray(asnumpy(faces))
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"folded_triangles: faces must be an integer (F, 3) array, got {f.dtype} {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= v0.shape[0]):
        raise ValueError(f"folded_triangles: faces reference vertices outside [0, {v0.shape[0]})")
    if not 0.0 < float(max_angle_deg) < 180.0:
        raise ValueError(f"folded_triangles: max_angle_deg must be in (0, 180), got {max_angle_deg!r}")

    def normals(v):
        c = face_normals(v, f, normalize=False)
        return c, np.linalg.norm(c, axis=1)

    c0, n0 = normals(v0)
    c1, n1 = normals(v1)
    ok = (n0 > 0) & (n1 > 0)
    cos = np.full(f.shape[0], -1.0)
    cos[ok] = (c0[ok] * c1[ok]).sum(1) / (n0[ok] * n1[ok])
    return int((cos < np.cos(np.deg2rad(float(max_angle_deg)))).sum())


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
        Their handle weights.
    landmark_index : ndarray of int (M,)
        Row of ``landmarks_2d`` each handle came from.
    dropped : ndarray of int
        Rows of ``landmarks_2d`` not used (outside the image, on background, or a vertex already
        taken by an earlier landmark).
    deformer : LaplacianDeformer
        The factored system (re-use it to deform with new targets or weights).
    method : str
        ``"robust"`` or ``"paper"``.
    noise_px : float
        Landmark noise level used to shrink the residuals (``method="robust"``; 0 for the paper's).
    residuals_px : ndarray (M, 2)
        Landmark minus the handle's image position on the coarse mesh (for a jaw-contour landmark
        with ``method="robust"``: minus the nearest pixel of the coarse silhouette), pixels.
    displacement_px : ndarray (M, 2)
        The image-plane move asked of each handle after shrinkage and trust (``method="paper"``:
        the residual).
    trust : ndarray (M,)
        Pose trust in [0, 1] of each handle (1 for the paper's method).
    silhouette : ndarray of bool (M,)
        Handles matched to the coarse silhouette (jaw contour, ``method="robust"``).
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
    method: str = "paper"
    noise_px: float = 0.0
    residuals_px: Optional[np.ndarray] = None
    displacement_px: Optional[np.ndarray] = None
    trust: Optional[np.ndarray] = None
    silhouette: Optional[np.ndarray] = None


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


#: Jaw contour landmarks (iBUG numbers): placed on the face's outline in the image, not on fixed vertices.
JAW_CONTOUR = frozenset(range(1, 18))

#: Defaults of ``method="robust"`` (chosen by measurement, docs/medium.md).
ROBUST_SHRINK = 2.5
ROBUST_HANDLE_SCALE = 3.0


def _silhouette_match(lm, imap):
    """Nearest coarse-silhouette pixel of each landmark: (vertex, residual (K, 2)) or (-1, 0)."""
    from scipy.ndimage import binary_erosion

    mask = imap >= 0
    edge = mask & ~binary_erosion(mask, border_value=0)
    by, bx = np.nonzero(edge)
    k = lm.shape[0]
    if by.size == 0:
        return np.full(k, -1, dtype=np.int64), np.zeros((k, 2))
    cx, cy = bx + 0.5, by + 0.5  # pixel centres
    d2 = (lm[:, None, 0] - cx[None]) ** 2 + (lm[:, None, 1] - cy[None]) ** 2
    j = np.argmin(d2, axis=1)
    return imap[by[j], bx[j]].astype(np.int64), lm - np.stack([cx[j], cy[j]], 1)


def _pose_trust(v, f, R, screen, zbuf, vert, grazing=(0.2, 0.5), depth_tol=1.0):
    """Trust in [0, 1] of a handle from its pose: 0 when its vertex is hidden or seen edge-on.

    ``n_z`` is the view component of the vertex normal (camera looks along -z, larger depth = closer;
    the sign is flipped when most visible vertices face away, i.e. the faces are wound clockwise):
    the trust ramps linearly from 0 at ``n_z = grazing[0]`` (78 degrees from the view direction) to 1 at
    ``n_z = grazing[1]`` (60 degrees). A vertex more than ``depth_tol`` pixels behind the z-buffer at its
    pixel is self-occluded: trust 0.
    """
    from .mesh import vertex_normals

    nz_all = (np.asarray(vertex_normals(v, f)) @ R.T)[:, 2]
    H, W = zbuf.shape
    col = np.clip(np.floor(screen[:, 0]).astype(np.int64), 0, W - 1)
    row = np.clip(np.floor(screen[:, 1]).astype(np.int64), 0, H - 1)
    z = zbuf[row, col]
    hidden_all = np.isfinite(z) & (screen[:, 2] < z - depth_tol)
    seen = np.isfinite(z) & ~hidden_all
    if seen.any() and np.median(nz_all[seen]) < 0:  # faces wound clockwise: normals point inwards
        nz_all = -nz_all
    nz = nz_all[vert]
    t = np.clip((nz - grazing[0]) / (grazing[1] - grazing[0]), 0.0, 1.0)
    return np.where(hidden_all[vert], 0.0, t)


def estimate_landmark_noise(residuals_px) -> float:
    """Robust per-coordinate landmark noise (pixels) from 2D residuals: ``median |r| / sqrt(2 ln 2)``.

    For isotropic Gaussian noise of standard deviation ``sigma`` per coordinate, ``|r|`` is Rayleigh
    distributed with median ``sigma sqrt(2 ln 2)``; the median ignores the few large residuals that a
    local shape change the model cannot express leaves behind.

    Parameters
    ----------
    residuals_px : array (K, 2)

    Returns
    -------
    float
    """
    r = np.asarray(asnumpy(residuals_px), dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"estimate_landmark_noise: residuals must be a finite (K, 2) array with K > 0, got {r.shape}")
    return float(np.median(np.linalg.norm(r, axis=1)) / np.sqrt(2.0 * np.log(2.0)))


def medium_stage(coarse, landmarks_2d, image_size=None, *, model=None, faces=None, camera=None,
                 landmark_ids=None, weights=None, dense_weight: float = 0.1, use_model_landmarks: bool = True,
                 index_map=None, laplacian: Optional[str] = None, method: str = "robust",
                 noise_px: Optional[float] = None, shrink: float = ROBUST_SHRINK,
                 handle_scale: float = ROBUST_HANDLE_SCALE, energy: Optional[str] = None,
                 shrinkage: str = "soft", laplacian_weights: Optional[str] = None) -> MediumResult:
    """Medium stage: tie image landmarks to vertices and deform the coarse mesh towards them.

    ``method="paper"`` is Jin et al. 2021, Sec. 3.3, as written; ``method="robust"`` (default) departs
    from it so that landmark noise and untrustworthy landmarks do not deform the face (see Notes).

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
        ``dense_weight`` for the others. ``method="robust"`` multiplies them by ``handle_scale``.
    use_model_landmarks : bool
        Use ``model.landmarks`` for iBUG landmarks that have a fixed vertex (the others, e.g. the
        jaw contour, go through the index map or, with ``method="robust"``, the silhouette).
    index_map : int array (h, w), optional
        Precomputed vertex-index map (-1 = background). By default the coarse mesh is rasterised
        with :func:`geomfit.render.rasterize` (``method="robust"`` always rasterises: it needs the
        z-buffer).
    laplacian : {"uniform", "cotangent"}, optional
        Edge weights of the paper's Laplacian (``energy="laplacian"``); default ``"uniform"``.
    method : {"robust", "paper"}
        See Notes.
    noise_px : float, optional
        Landmark noise (standard deviation per coordinate, pixels) for ``method="robust"``; default:
        estimated from the coarse fit's residuals of the fixed landmarks by
        :func:`estimate_landmark_noise`. 0 trusts the landmarks fully.
    shrink : float
        ``method="robust"``: residuals are soft-thresholded at ``shrink * noise_px``.
    handle_scale : float
        ``method="robust"``: factor on the handle weights against the bi-Laplacian energy.
    energy : {"laplacian", "biharmonic"}, optional
        Smoothness term (see :class:`LaplacianDeformer`); default ``"biharmonic"`` for
        ``method="robust"``, ``"laplacian"`` (Eq. 3) for ``method="paper"``.
    laplacian_weights : optional
        Deprecated name of ``laplacian``.

    Returns
    -------
    MediumResult

    Raises
    ------
    ValueError
        Bad shapes, non-finite landmarks, no landmark landing on the mesh, missing camera/faces,
        an unknown method, a negative noise level or shrink factor.
    ImportError
        When no ``index_map`` is given and :mod:`geomfit.render` is unavailable.

    Notes
    -----
    Both methods tie each landmark ``s = (x, y)`` to a vertex ``v``: its fixed model vertex when known,
    else the vertex in the index map at the landmark's pixel (row ``floor(y)``, column ``floor(x)``).
    A vertex hit by several landmarks keeps the first one. Landmarks outside the image or on
    background are dropped (listed in ``dropped``).

    ``method="paper"``: the target is ``(x, y, z')`` in screen space with ``z'`` the vertex's own depth
    (Sec. 3.3), mapped back to model space by the inverse camera, and the mesh is deformed by Eq. (3)
    with the Sec. 4.1 weights. Landmark noise is fitted as shape: measured on synthetic Surrey faces
    with 1.5-3 px noise at 256 px it makes the shape 10-60 % worse than the coarse fit and folds
    triangles (docs/medium.md).

    ``method="robust"`` (geomfit's departure, chosen by measurement):

    1. Jaw-contour landmarks (iBUG 1-17 without a model vertex) mark the face's outline, so they are
       matched to the nearest pixel of the coarse mesh's silhouette (its vertex becomes the handle);
       their residual is the distance to that outline, normal to it.
    2. Each handle's 2D residual ``r`` (landmark minus its projection) is soft-thresholded at the noise
       level: ``r' = r max(0, 1 - shrink * sigma / |r|)``; residuals at the noise level move nothing.
    3. ``r'`` is multiplied by a pose trust in [0, 1]: 0 for a self-occluded vertex or one seen
       edge-on (normal more than 78 degrees from the view direction), 1 below 60 degrees. A handle
       with no trusted move stays as an anchor at its coarse position.
    4. The target moves the handle parallel to the image plane by ``r'`` (as the paper's
       ``mu = (x, y, z')``), and the mesh follows by the cotangent bi-Laplacian energy
       (:class:`LaplacianDeformer` with ``energy="biharmonic"``), smooth around point handles.

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern Recognition
    Letters 2021, Sec. 3.3 (index maps, Eq. 3, ``mu = (x, y, z')``) and Sec. 4.1 (weights);
    Jacobson et al., "Mixed finite elements for variational surface modeling", SGP 2010; Donoho,
    "De-noising by soft-thresholding", IEEE Trans. Information Theory 1995.
    """
    if laplacian_weights is not None:
        if laplacian is not None:
            raise TypeError("medium_stage: give 'laplacian' only ('laplacian_weights' is its deprecated name)")
        laplacian = _renamed("laplacian_weights", "laplacian", laplacian_weights, "medium_stage")
    if method not in ("robust", "paper"):
        raise ValueError(f"medium_stage: method must be 'robust' or 'paper' (Jin et al. 2021), got {method!r}")
    robust = method == "robust"
    if energy is None:
        energy = "biharmonic" if robust else "laplacian"
    if noise_px is not None and not (np.isfinite(noise_px) and noise_px >= 0):
        raise ValueError(f"medium_stage: noise_px must be finite and >= 0, got {noise_px!r}")
    if shrinkage not in ("soft", "garrote"):
        raise ValueError(f"medium_stage: shrinkage must be 'soft' or 'garrote', got {shrinkage!r}")
    if not (np.isfinite(shrink) and shrink >= 0):
        raise ValueError(f"medium_stage: shrink must be finite and >= 0, got {shrink!r}")
    if not (np.isfinite(handle_scale) and handle_scale > 0):
        raise ValueError(f"medium_stage: handle_scale must be finite and > 0, got {handle_scale!r}")
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
    fixed = vert >= 0
    need = ~fixed
    zbuf = None
    if need.any() or robust:
        if index_map is None or robust:
            try:
                from .render import rasterize
            except ImportError as e:  # pragma: no cover - geomfit.render is part of the package
                raise ImportError("medium_stage: geomfit.render.rasterize is needed to build the index map "
                                  "(or pass index_map=)") from e
            ras = rasterize(screen, f, H, W)
            zbuf = np.asarray(asnumpy(ras.depth))
            if index_map is None:
                index_map = asnumpy(ras.vertex_index)
        imap = np.asarray(asnumpy(index_map))
        if imap.shape != (H, W):
            raise ValueError(f"medium_stage: index_map must have shape ({H}, {W}), got {imap.shape}")
        col = np.floor(lm[:, 0]).astype(np.int64)
        row = np.floor(lm[:, 1]).astype(np.int64)
        inside = need & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        looked = np.full(k, -1, dtype=np.int64)
        looked[inside] = imap[row[inside], col[inside]]
        vert = np.where(need, looked, vert)
    on_sil = np.zeros(k, dtype=bool)
    resid = lm - screen[np.maximum(vert, 0), :2]
    if robust:
        # jaw-contour landmarks without a model vertex (the chin's iBUG 9 keeps its vertex: measured,
        # its residual along the outline is real information, docs/medium.md)
        on_sil = inside & np.isin(ids, list(JAW_CONTOUR))
        if on_sil.any():
            sv, sr = _silhouette_match(lm[on_sil], imap)
            vert[on_sil] = sv
            resid[on_sil] = sr
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
    r = resid[li]
    if robust:
        sil = on_sil[li]
        trust = np.ones(li.size)
        if (~sil).any():
            trust[~sil] = _pose_trust(v, f, R, screen, zbuf, h[~sil])
        if noise_px is None:
            base = r[fixed[li] & ~sil & (trust > 0.5)]  # semantic landmarks seen face-on
            if base.shape[0] < 5:
                base = r
            sigma = estimate_landmark_noise(base)
        else:
            sigma = float(noise_px)
        mag = np.linalg.norm(r, axis=1)
        if shrinkage == "soft":
            factor = np.clip(1.0 - shrink * sigma / np.maximum(mag, 1e-300), 0.0, 1.0)
        else:  # non-negative garrote
            factor = np.clip(1.0 - (shrink * sigma) ** 2 / np.maximum(mag, 1e-300) ** 2, 0.0, 1.0)
        factor = factor * trust
        move = r * factor[:, None]
        # image-plane move (dx, dy) in pixels, y down -> model space R^T (dx/s, -dy/s, 0)
        mu = v[h] + np.stack([move[:, 0] / s, -move[:, 1] / s, np.zeros(li.size)], 1) @ R
        w_h = w_all[li] * handle_scale
    else:
        sil, trust, sigma, move = on_sil[li], np.ones(li.size), 0.0, r
        mu = np.asarray(cam.unproject(lm[li], screen[h, 2], H))
        w_h = w_all[li]
    deformer = LaplacianDeformer(v, f, h, w_h, laplacian=laplacian, energy=energy)
    out = deformer.deform(mu)
    return MediumResult(vertices=out, coarse_vertices=v, faces=f, handle_indices=h, targets=mu,
                        weights=w_h, landmark_index=li, dropped=np.flatnonzero(~use), deformer=deformer,
                        method=method, noise_px=float(sigma), residuals_px=r, displacement_px=move, trust=trust,
                        silhouette=sil)
