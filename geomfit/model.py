"""The morphable-model data type shared by every stage.

A :class:`MorphableModel` is a linear shape model (Jin et al., "High-fidelity 3D face reconstruction with
multi-scale details", Pattern Recognition Letters 2021, Eq. 1)::

    S = mean + id_basis @ alpha_id + exp_basis @ alpha_exp

with ``id_basis`` already scaled by the PCA standard deviations, so identity coefficients are in
standard-deviation units (``alpha_id ~ N(0, I)`` under the model's prior).  Loaders in
:mod:`geomfit.io` build it from eos ``.bin``, BFM 2009/2017/2019, FLAME and geomfit's own ``.npz``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .backend import get_array_module

__all__ = ["MorphableModel"]


@dataclass
class MorphableModel:
    """A linear 3D morphable model of face shape (and optionally colour).

    Attributes
    ----------
    mean : ndarray, shape (N, 3)
        Mean shape, model units (mm for SFM/BFM, metres for FLAME).
    id_basis : ndarray, shape (N, 3, K)
        Identity basis, columns scaled by the standard deviations.
    exp_basis : ndarray, shape (N, 3, E)
        Expression basis (blendshape offsets or scaled PCA); E may be 0.
    faces : ndarray of int, shape (F, 3)
        Triangles, counter-clockwise seen from the front.
    texcoords : ndarray, shape (N, 2), optional
        Per-vertex texture coordinates ``(u, v)`` in [0, 1] where the file has them, u right and v up
        (the OBJ convention: texture row = (1 - v) * height). eos files store v down; their loader flips it.
    landmarks : dict of int -> int
        iBUG 68-point number (1-based) to vertex index, for the fixed (non-contour) landmarks.
    contours : dict of str -> list of int
        ``{"right": [...], "left": [...]}``: candidate vertices for the sliding jaw contour
        (iBUG 1-8 are the right contour, 10-17 the left, as in eos's contour files).
    color_mean, color_basis : ndarray, optional
        Per-vertex colour model (N, 3) and (N, 3, Kc) where the file has one (BFM).
    name : str
        Where the model came from.
    """

    mean: np.ndarray
    id_basis: np.ndarray
    exp_basis: np.ndarray
    faces: np.ndarray
    texcoords: Optional[np.ndarray] = None
    landmarks: Dict[int, int] = field(default_factory=dict)
    contours: Dict[str, List[int]] = field(default_factory=dict)
    color_mean: Optional[np.ndarray] = None
    color_basis: Optional[np.ndarray] = None
    name: str = ""

    def __post_init__(self):
        n = self.mean.shape[0]
        if self.mean.ndim != 2 or self.mean.shape[1] != 3:
            raise ValueError(f"MorphableModel({self.name}): mean must have shape (N, 3), got {self.mean.shape}")
        if self.exp_basis is None:
            self.exp_basis = np.zeros((n, 3, 0), dtype=self.mean.dtype)
        for nm in ("id_basis", "exp_basis"):
            b = getattr(self, nm)
            if b.ndim != 3 or b.shape[:2] != (n, 3):
                raise ValueError(f"MorphableModel({self.name}): {nm} must have shape ({n}, 3, K), got {b.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"MorphableModel({self.name}): faces must have shape (F, 3), got {self.faces.shape}")
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= n):
            raise ValueError(f"MorphableModel({self.name}): faces reference vertices outside [0, {n})")
        bad = {k: v for k, v in self.landmarks.items() if not 0 <= int(v) < n}
        if bad:
            raise ValueError(f"MorphableModel({self.name}): landmark vertices out of range: {bad}")

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def n_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def n_id(self) -> int:
        return self.id_basis.shape[2]

    @property
    def n_exp(self) -> int:
        return self.exp_basis.shape[2]

    # -- evaluation -------------------------------------------------------------------------------
    def shape(self, id_coeffs=None, exp_coeffs=None):
        """Evaluate the model (Jin et al. 2021, Eq. 1).

        Parameters
        ----------
        id_coeffs : array_like, shape (K,) or (B, K), optional
            Identity coefficients in standard-deviation units; fewer than K are zero-padded.
        exp_coeffs : array_like, shape (E,) or (B, E), optional
            Expression coefficients.

        Returns
        -------
        ndarray, shape (N, 3) or (B, N, 3)
            Vertices; on the device of the coefficients (CuPy in, CuPy out).
        """
        xp = get_array_module(id_coeffs, exp_coeffs)
        mean = xp.asarray(self.mean)
        out = None
        batched = False
        for c, basis in ((id_coeffs, self.id_basis), (exp_coeffs, self.exp_basis)):
            if c is None:
                continue
            c = xp.asarray(c, dtype=mean.dtype)
            if c.ndim not in (1, 2):
                raise ValueError(f"coefficients must have shape (K,) or (B, K), got {c.shape}")
            batched |= c.ndim == 2
            k = c.shape[-1]
            if k > basis.shape[2]:
                raise ValueError(f"{k} coefficients given, the model has {basis.shape[2]}")
            if k == 0:
                continue
            b = xp.asarray(basis[:, :, :k])
            term = xp.einsum("nck,...k->...nc", b, c)
            out = term if out is None else out + term
        if out is None:
            return mean.copy()
        return mean + out

    def landmark_arrays(self):
        """Fixed landmarks as two int arrays ``(ibug_numbers, vertex_indices)``, sorted by number."""
        keys = np.array(sorted(self.landmarks), dtype=np.int64)
        return keys, np.array([self.landmarks[k] for k in keys], dtype=np.int64)
