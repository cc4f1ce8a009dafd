"""Reader for eos's cereal-binary morphable models (``.bin``) and blendshape files.

Byte layout (cereal ``BinaryOutputArchive``, little-endian, no padding), as written by the eos
library (Huber et al., VISAPP 2016) and documented here from inspecting the files:

* ``MorphableModel``: ``uint32`` class version (1-4), then
  version 1: shape PcaModel, colour PcaModel, texture coordinates;
  version 2: + expression model (after colour); version 3: + landmark definitions (after the
  expression model); version 4: + texture triangle indices (at the end).
* ``PcaModel``: mean, orthonormal basis, eigenvalues (three Eigen matrices), triangle list.
* Eigen matrix: ``int32`` rows, ``int32`` cols, ``rows*cols`` ``float32`` in column-major order.
* ``std::vector<T>`` / ``std::string``: ``uint64`` count, then the elements / bytes.
  ``std::array<int,3>``: three ``int32``; ``std::array<double,2>``: two ``float64``.
* ``optional<T>``: ``bool`` (1 byte) "is empty" flag, then T when not empty.
* ``variant<PcaModel, Blendshapes>``: ``int32`` index (0 = PcaModel, 1 = Blendshapes), then the value.
* ``unordered_map<string,int>``: ``uint64`` count, then (string, ``int32``) pairs.
* ``Blendshape``: string name, Eigen matrix (3N x 1) of per-vertex offsets (xyzxyz...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ._errors import ByteReader, file_error, read_bytes

__all__ = ["EosPcaModel", "EosModelFile", "read_eos_model", "read_eos_blendshapes"]

_MAX_VERSION = 4


@dataclass
class EosPcaModel:
    """One PCA model as stored in the file (float32, eos's flat xyzxyz... layout)."""

    mean: np.ndarray  # (3N,)
    orthonormal_basis: np.ndarray  # (3N, K)
    eigenvalues: np.ndarray  # (K,)
    triangles: np.ndarray  # (F, 3) int32

    @property
    def rescaled_basis(self) -> np.ndarray:
        """Basis columns times sqrt(eigenvalue), computed in float32 like eos's ``rescale_pca_basis``."""
        return self.orthonormal_basis * np.sqrt(self.eigenvalues).astype(np.float32)[None, :]


@dataclass
class EosModelFile:
    """Everything an eos ``.bin`` model file holds."""

    version: int
    shape: EosPcaModel
    color: EosPcaModel
    expression_pca: Optional[EosPcaModel] = None
    blendshape_names: Optional[List[str]] = None
    blendshapes: Optional[np.ndarray] = None  # (3N, E)
    landmark_definitions: Optional[Dict[str, int]] = None
    texcoords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    texture_triangles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))


def _matrix(r: ByteReader, what: str) -> np.ndarray:
    at = r.pos
    rows = r.i32(f"{what} rows")
    cols = r.i32(f"{what} cols")
    if rows < 0 or cols < 0:
        raise file_error(r.path, f"corrupt: {what} at byte {at} has negative size {rows} x {cols}")
    if rows * cols * 4 > r.remaining:
        raise file_error(
            r.path,
            f"truncated or corrupt: {what} at byte {at} is {rows} x {cols} float32 "
            f"({rows * cols * 4} bytes), only {r.remaining} bytes left",
        )
    flat = r.array(np.float32, rows * cols, what)
    # Eigen's default storage is column-major.
    return flat.reshape(cols, rows).T.copy()


def _int3_list(r: ByteReader, what: str) -> np.ndarray:
    n = r.count(what, 12)
    return r.array(np.int32, 3 * n, what).reshape(n, 3)


def _pca_model(r: ByteReader, what: str) -> EosPcaModel:
    mean = _matrix(r, f"{what} mean")
    basis = _matrix(r, f"{what} PCA basis")
    ev = _matrix(r, f"{what} eigenvalues")
    tri = _int3_list(r, f"{what} triangle list")
    if mean.size and mean.shape[1] != 1:
        raise file_error(r.path, f"corrupt: {what} mean is {mean.shape[0]} x {mean.shape[1]}, expected a column")
    mean = mean.reshape(-1)
    ev = ev.reshape(-1)
    if mean.size % 3:
        raise file_error(r.path, f"corrupt: {what} mean has {mean.size} values, not a multiple of 3")
    if basis.size and basis.shape[0] != mean.size:
        raise file_error(r.path, f"corrupt: {what} basis has {basis.shape[0]} rows, mean has {mean.size}")
    if basis.shape[1] != ev.size:
        raise file_error(r.path, f"corrupt: {what} basis has {basis.shape[1]} columns but {ev.size} eigenvalues")
    for nm, a in (("mean", mean), ("basis", basis), ("eigenvalues", ev)):
        if not np.all(np.isfinite(a)):
            raise file_error(r.path, f"corrupt: {what} {nm} contains NaN or infinite values")
    if np.any(ev < 0):
        raise file_error(r.path, f"corrupt: {what} has negative eigenvalues (variances)")
    n = mean.size // 3
    if tri.size and (tri.min() < 0 or tri.max() >= n):
        raise file_error(r.path, f"corrupt: {what} triangles reference vertices outside [0, {n})")
    return EosPcaModel(mean, basis, ev, tri)


def _blendshapes(r: ByteReader, what: str):
    n = r.count(what, 16)
    names, cols = [], []
    for i in range(n):
        names.append(r.string(f"{what} {i} name"))
        d = _matrix(r, f"{what} {i} ('{names[-1]}') deformation")
        if d.size and d.shape[1] != 1:
            raise file_error(r.path, f"corrupt: {what} {i} deformation is {d.shape}, expected a column")
        cols.append(d.reshape(-1))
    sizes = {c.size for c in cols}
    if len(sizes) > 1:
        raise file_error(r.path, f"corrupt: {what} have different lengths {sorted(sizes)}")
    if sizes and next(iter(sizes)) % 3:
        raise file_error(r.path, f"corrupt: {what} length {next(iter(sizes))} is not a multiple of 3")
    mat = np.stack(cols, axis=1) if cols else np.zeros((0, 0), np.float32)
    if not np.all(np.isfinite(mat)):
        raise file_error(r.path, f"corrupt: {what} contain NaN or infinite values")
    return names, mat


def read_eos_model(path) -> EosModelFile:
    """Read an eos ``MorphableModel`` ``.bin`` file (cereal binary, class versions 1-4).

    Parameters
    ----------
    path : str or path-like
        The ``.bin`` file, e.g. ``sfm_shape_3448.bin`` from eos's ``share/`` folder.

    Returns
    -------
    EosModelFile
        The raw contents (float32, eos's flat layouts).

    Raises
    ------
    ValueError
        The file is missing, truncated, of an unknown version, internally inconsistent or has
        trailing bytes; the message names the file and the problem.
    """
    r = ByteReader(read_bytes(path), path)
    if r.remaining < 4:
        raise file_error(path, f"too short ({r.remaining} bytes) to be an eos model file")
    version = r.u32("class version")
    if not 1 <= version <= _MAX_VERSION:
        raise file_error(path, f"not an eos model file, or an unsupported version: version field is {version}, expected 1-{_MAX_VERSION}")
    shape = _pca_model(r, "shape model")
    if shape.mean.size == 0:
        raise file_error(path, "corrupt: the shape model is empty")
    color = _pca_model(r, "colour model")
    out = EosModelFile(version, shape, color)
    if version >= 2:
        if not r.bool("expression model 'empty' flag"):
            at = r.pos
            idx = r.i32("expression model variant index")
            if idx == 0:
                out.expression_pca = _pca_model(r, "expression model")
            elif idx == 1:
                out.blendshape_names, out.blendshapes = _blendshapes(r, "blendshapes")
            else:
                raise file_error(path, f"corrupt: expression model variant index {idx} at byte {at}, expected 0 or 1")
    if version >= 3:
        if not r.bool("landmark definitions 'empty' flag"):
            n = r.count("landmark definitions", 12)
            defs = {}
            for _ in range(n):
                k = r.string("landmark name")
                defs[k] = r.i32(f"landmark '{k}' vertex")
            out.landmark_definitions = defs
    nt = r.count("texture coordinates", 16)
    out.texcoords = r.array(np.float64, 2 * nt, "texture coordinates").reshape(nt, 2)
    if version >= 4:
        out.texture_triangles = _int3_list(r, "texture triangle indices")
    r.done("an eos model file")

    n3 = shape.mean.size
    n = n3 // 3
    if color.mean.size not in (0, n3):
        raise file_error(path, f"corrupt: colour model has {color.mean.size // 3} vertices, shape model {n}")
    if out.expression_pca is not None and out.expression_pca.mean.size != n3:
        raise file_error(path, f"corrupt: expression model has {out.expression_pca.mean.size // 3} vertices, shape model {n}")
    if out.blendshapes is not None and out.blendshapes.size and out.blendshapes.shape[0] != n3:
        raise file_error(path, f"corrupt: blendshapes have {out.blendshapes.shape[0] // 3} vertices, shape model {n}")
    if out.landmark_definitions:
        bad = {k: v for k, v in out.landmark_definitions.items() if not 0 <= v < n}
        if bad:
            raise file_error(path, f"corrupt: landmark definitions outside [0, {n}): {bad}")
    if nt and nt != n and len(out.texture_triangles) == 0:
        raise file_error(path, f"corrupt: {nt} texture coordinates for {n} vertices")
    return out


def read_eos_blendshapes(path):
    """Read an eos blendshapes ``.bin`` file (``std::vector<Blendshape>``, cereal binary).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    names : list of str
    offsets : ndarray, float32, shape (3N, E)
        Column ``e`` is blendshape ``e``'s per-vertex offsets, flat xyzxyz... like eos's
        ``to_matrix(blendshapes)``.

    Raises
    ------
    ValueError
        Missing, truncated or inconsistent file, naming it.
    """
    r = ByteReader(read_bytes(path), path)
    if r.remaining < 8:
        raise file_error(path, f"too short ({r.remaining} bytes) to be an eos blendshapes file")
    names, mat = _blendshapes(r, "blendshapes")
    r.done("an eos blendshapes file")
    if not names:
        raise file_error(path, "holds no blendshapes")
    return names, mat
