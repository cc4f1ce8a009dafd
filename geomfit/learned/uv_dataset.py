"""A cached set of UV texture maps for training B-Net, FAN and DRN.

Wang, Lin, Xu, Che and Wang, "Low-frequency guided self-supervised learning for high-fidelity 3D face
reconstruction in the wild", ICME 2020, Sec. 3.1 and Fig. 2 (a): every training photo is fitted (landmarks,
Eq. 1) and turned into a texture map ``I_t(UV)`` with its visibility and the vertex normals in UV space;
these are computed once and reused by all three networks.
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_open

__all__ = ["UVDataset"]

_FIELDS = ("texture", "visible", "mask", "normals", "dpdu", "dpdv")


@dataclass
class UVDataset:
    """Texture maps with their visibility and geometry, stacked ``(N, S, S, ...)`` NumPy arrays.

    Attributes
    ----------
    texture : float32 (N, S, S, 3)
        :attr:`geomfit.uv.UVTexture.texture` per photo (0 where invisible).
    visible : bool (N, S, S)
    mask : bool (N, S, S)
        Texels covered by the UV layout.
    normals, dpdu, dpdv : float32 (N, S, S, 3)
        Unit normals and surface tangents per unit u / v in the camera frame of each fit
        (:class:`geomfit.uv.UVTexture`).
    sources : list of str
        Where each map came from.
    """

    texture: np.ndarray
    visible: np.ndarray
    mask: np.ndarray
    normals: np.ndarray
    dpdu: np.ndarray
    dpdv: np.ndarray
    sources: List[str] = field(default_factory=list)

    def __post_init__(self):
        t = np.asarray(self.texture)
        if t.ndim != 4 or t.shape[1] != t.shape[2] or t.shape[3] != 3:
            raise ValueError(f"UVDataset: texture must be (N, S, S, 3), got {t.shape}")
        n, S = t.shape[0], t.shape[1]
        self.texture = t.astype(np.float32)
        for name, shape, dt in (("visible", (n, S, S), bool), ("mask", (n, S, S), bool), ("normals", (n, S, S, 3), np.float32),
                                ("dpdu", (n, S, S, 3), np.float32), ("dpdv", (n, S, S, 3), np.float32)):
            a = np.asarray(getattr(self, name))
            if a.shape != shape:
                raise ValueError(f"UVDataset: {name} must have shape {shape}, got {a.shape}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"UVDataset: {name} contains NaN or infinite values")
            setattr(self, name, a.astype(dt))
        if not np.isfinite(self.texture).all():
            raise ValueError("UVDataset: texture contains NaN or infinite values")
        if not self.sources:
            self.sources = [f"#{i}" for i in range(n)]

    def __len__(self):
        return int(self.texture.shape[0])

    @property
    def size(self) -> int:
        return int(self.texture.shape[1])

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_textures(cls, textures: Sequence, sources: Optional[Sequence[str]] = None) -> "UVDataset":
        """Stack :class:`geomfit.uv.UVTexture` results (from :func:`geomfit.uv_texture`)."""
        if not textures:
            raise ValueError("UVDataset.from_textures: no textures given")
        from ..backend import asnumpy as g  # CuPy maps come to the host
        return cls(texture=np.stack([g(t.texture) for t in textures]), visible=np.stack([g(t.visible) for t in textures]),
                   mask=np.stack([g(t.mask) for t in textures]), normals=np.stack([g(t.normals) for t in textures]),
                   dpdu=np.stack([g(t.dpdu) for t in textures]), dpdv=np.stack([g(t.dpdv) for t in textures]),
                   sources=list(sources) if sources is not None else [])

    @classmethod
    def from_photos(cls, paths: Sequence, landmarks=None, model="sfm", size: int = 256, *, detector: str = "auto",
                    cache=None, progress: Optional[Callable[[int, int, str], None]] = None) -> "UVDataset":
        """Fit each photo's landmarks and cache its UV texture, visibility and normals.

        Wang et al., ICME 2020, Sec. 3.1: landmark fit (Eq. 1, :func:`geomfit.fit_landmarks`) then
        :func:`geomfit.uv_texture`.

        Parameters
        ----------
        paths : sequence of paths (or arrays)
            The photos.
        landmarks : sequence, "pts" or None
            One entry per photo: a ``.pts`` path, a (68, 2) array, or None (detector). ``"pts"``: the
            ``.pts`` file next to each photo (same stem). None: the detector for every photo.
        model : str, path or MorphableModel
            The 3DMM (needs texture coordinates); ``"sfm"`` is the Surrey model
            (:func:`geomfit.data.resolve_model`).
        size : int
            Map size S (256 in the paper).
        detector : str
            Passed to :func:`geomfit.detect_landmarks` where landmarks are not given.
        cache : path, optional
            An ``.npz`` file: loaded when it exists and was made from the same photos at the same size,
            else written (atomically) after the maps are made.
        progress : callable(i, n, source), optional

        Returns
        -------
        UVDataset
        """
        from ..data import resolve_model
        from ..fitting import fit_landmarks
        from ..landmarks import check_landmarks, detect_landmarks, read_pts_checked
        from ..photo import load_photo
        from ..uv import uv_texture

        paths = list(paths)
        if not paths:
            raise ValueError("UVDataset.from_photos: no photos given")
        names = [os.fspath(p) if isinstance(p, (str, os.PathLike)) else f"array#{i}" for i, p in enumerate(paths)]
        if cache is not None and pathlib.Path(cache).is_file():
            ds = cls.load(cache)
            if ds.sources == names and ds.size == size:
                return ds
        if landmarks is None or isinstance(landmarks, str):
            if landmarks not in (None, "pts"):
                raise ValueError(f"UVDataset.from_photos: landmarks must be a sequence, 'pts' or None, got {landmarks!r}")
            lms = [pathlib.Path(n).with_suffix(".pts") if landmarks == "pts" else None for n in names]
        else:
            lms = list(landmarks)
            if len(lms) != len(paths):
                raise ValueError(f"UVDataset.from_photos: {len(paths)} photos but {len(lms)} landmark entries")
        m = resolve_model(model)
        if m.texcoords is None:
            raise ValueError(f"UVDataset.from_photos: model {m.name!r} has no texture coordinates")
        texs = []
        for i, (p, lm, name) in enumerate(zip(paths, lms, names)):
            img = load_photo(p)
            if lm is None:
                pts, _ = detect_landmarks(img, detector)
            elif isinstance(lm, (str, os.PathLike)):
                pts = read_pts_checked(lm, img.shape)
            else:
                pts = check_landmarks(lm, img.shape)
            fit = fit_landmarks(m, pts, img.shape[:2])
            texs.append(uv_texture(img, fit, size=size))
            if progress is not None:
                progress(i + 1, len(paths), name)
        ds = cls.from_textures(texs, names)
        if cache is not None:
            ds.save(cache)
        return ds

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path) -> pathlib.Path:
        """Write an ``.npz`` atomically."""
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(p) as fh:
            np.savez_compressed(fh, format=np.array("geomfit-uvdataset-1"), sources=np.array(self.sources),
                                **{k: getattr(self, k) for k in _FIELDS})
        return p

    @classmethod
    def load(cls, path) -> "UVDataset":
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"UVDataset.load: no file at {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z.get("format", "")) != "geomfit-uvdataset-1":
                    raise ValueError("not a UVDataset file")
                kw = {k: z[k] for k in _FIELDS}
                kw["sources"] = [str(s) for s in z["sources"]]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"UVDataset.load: {p} is not a UVDataset file ({e})") from e
        return cls(**kw)

    # -- torch access -----------------------------------------------------------------------------
    def tensor(self, name: str, idx=None, device=None) -> torch.Tensor:
        """One field as a torch tensor, channels first: (B, C, S, S) for maps, (B, 1, S, S) for masks."""
        a = getattr(self, name)
        if idx is not None:
            a = a[np.asarray(idx)]
        t = torch.from_numpy(np.ascontiguousarray(a))
        t = t[:, None].float() if t.ndim == 3 else t.permute(0, 3, 1, 2).float()
        return t.to(device) if device is not None else t

    def batch(self, idx, device=None) -> dict:
        """All fields of the maps ``idx`` as tensors (see :meth:`tensor`)."""
        return {k: self.tensor(k, idx, device) for k in _FIELDS}

    def subset(self, idx) -> "UVDataset":
        idx = np.asarray(idx)
        return UVDataset(**{k: getattr(self, k)[idx] for k in _FIELDS}, sources=[self.sources[i] for i in idx])
