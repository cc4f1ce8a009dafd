"""Landmark files: iBUG ``.pts`` point files, eos's TOML ``ibug_to_*.txt`` mappings and its
contour JSON files."""
from __future__ import annotations

import json
import tomllib
from typing import Dict, List, Union

import numpy as np

from ._errors import atomic_write, file_error, read_text

__all__ = ["read_pts", "write_pts", "read_landmark_mapping", "read_contour_landmarks", "read_contours"]


def read_pts(path) -> np.ndarray:
    """Read an iBUG/300-W ``.pts`` landmark file.

    The format is a ``version: 1`` line, an ``n_points: n`` line, ``{``, ``n`` rows of ``x y`` and
    ``}``; coordinates are pixels with the origin at the top-left corner and y pointing down.
    Lines starting with ``#`` and blank lines are ignored.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    ndarray, float64, shape (n_points, 2)
        ``(x, y)`` per landmark, in file order (landmark ``i`` is iBUG number ``i + 1``).

    Raises
    ------
    ValueError
        Missing file, missing header or braces, a row that is not two finite numbers, or a number of
        rows different from ``n_points``; the message names the file.
    """
    lines = [ln.strip() for ln in read_text(path).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    header = {}
    i = 0
    while i < len(lines) and lines[i] != "{":
        key, sep, val = lines[i].partition(":")
        if not sep:
            raise file_error(path, f"not a .pts file: unexpected header line {lines[i]!r}")
        header[key.strip().lower()] = val.strip()
        i += 1
    if i == len(lines):
        raise file_error(path, "not a .pts file: no '{' line")
    if "n_points" not in header:
        raise file_error(path, "not a .pts file: no 'n_points:' header line")
    try:
        n = int(header["n_points"])
    except ValueError:
        raise file_error(path, f"n_points is not an integer: {header['n_points']!r}") from None
    try:
        end = lines.index("}", i + 1)
    except ValueError:
        raise file_error(path, "truncated: no closing '}' line") from None
    rows = lines[i + 1:end]
    if len(rows) != n:
        raise file_error(path, f"n_points is {n} but {len(rows)} point rows were found")
    if end != len(lines) - 1:
        raise file_error(path, f"unexpected content after the closing '}}': {lines[end + 1]!r}")
    pts = np.empty((n, 2), dtype=np.float64)
    for k, row in enumerate(rows):
        parts = row.split()
        try:
            if len(parts) != 2:
                raise ValueError
            pts[k] = float(parts[0]), float(parts[1])
        except ValueError:
            raise file_error(path, f"point {k + 1}: expected two numbers 'x y', got {row!r}") from None
    if not np.all(np.isfinite(pts)):
        raise file_error(path, "contains NaN or infinite coordinates")
    return pts


def write_pts(path, points) -> None:
    """Write landmarks as an iBUG ``.pts`` file, atomically (temp file + ``os.replace``).

    Parameters
    ----------
    path : str or path-like
    points : array_like, shape (n, 2)
        Pixel coordinates ``(x, y)``, origin top-left, y down.

    Raises
    ------
    ValueError
        ``points`` is not (n, 2) or holds NaN/inf; the target folder does not exist.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"write_pts({path}): points must have shape (n, 2), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"write_pts({path}): points contain NaN or infinite values")
    body = "".join(f"{x:.6f} {y:.6f}\n" for x, y in pts)
    text = f"version: 1\nn_points: {len(pts)}\n{{\n{body}}}\n"
    atomic_write(path, lambda f: f.write(text.encode("ascii")))


def _toml(path) -> dict:
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise file_error(path, f"not a valid TOML landmark mapping: {e}") from None


def _ibug_key(path, k) -> int:
    try:
        v = int(k)
    except ValueError:
        raise file_error(path, f"landmark name {k!r} is not an integer landmark number") from None
    if v < 1:
        raise file_error(path, f"landmark number {v} is not positive (numbers are 1-based)")
    return v


def read_landmark_mapping(path) -> Dict[int, Union[int, str]]:
    """Read the ``[landmark_mappings]`` table of an eos landmark mapping file (TOML).

    Parameters
    ----------
    path : str or path-like
        e.g. ``ibug_to_sfm.txt``, ``ibug_to_bfm2009.txt``.

    Returns
    -------
    dict of int -> int or str
        iBUG landmark number (1-based) to model vertex index; where a file maps to a named model
        landmark (eos's newer files do, e.g. ``"eye.right.outer_corner"``) the value is that name,
        resolved by :func:`geomfit.io.load_model` through the model's landmark definitions.
        The contour landmarks (iBUG 1-8, 10-17) have no entry in the files; see
        :func:`read_contour_landmarks`.

    Raises
    ------
    ValueError
        Missing file, invalid TOML, no ``[landmark_mappings]`` table, a non-integer landmark number or a
        negative / non-integer vertex; the message names the file.
    """
    doc = _toml(path)
    table = doc.get("landmark_mappings")
    if not isinstance(table, dict):
        raise file_error(path, "no [landmark_mappings] table")
    out: Dict[int, Union[int, str]] = {}
    for k, v in table.items():
        key = _ibug_key(path, k)
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise file_error(path, f"landmark {k}: value {v!r} is neither a vertex index nor a landmark name")
        if isinstance(v, int) and v < 0:
            raise file_error(path, f"landmark {k}: negative vertex index {v}")
        out[key] = v
    return out


def read_contour_landmarks(path) -> Dict[str, List[int]]:
    """Read the ``[contour_landmarks]`` table of an eos mapping file: ``{"right": [1..8], "left": [10..17]}``
    (iBUG numbers of the sliding jaw-contour landmarks); ``{}`` when the file has none."""
    doc = _toml(path)
    table = doc.get("contour_landmarks", {})
    out = {}
    for side in ("right", "left"):
        vals = table.get(side, [])
        if not isinstance(vals, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise file_error(path, f"contour_landmarks.{side} must be a list of integers")
        out[side] = [_ibug_key(path, x) for x in vals]
    return out if any(out.values()) else {}


def read_contours(path) -> Dict[str, List[int]]:
    """Read an eos model-contour JSON file.

    The file holds ``{"model_contour": {"right_contour": [...], "left_contour": [...]}}``: candidate
    vertex indices, ordered from the top of the face to the chin, among which the sliding contour
    landmarks (iBUG 1-8 right, 10-17 left) are searched.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict
        ``{"right": [int, ...], "left": [int, ...]}``.

    Raises
    ------
    ValueError
        Missing file, invalid JSON, missing keys, or entries that are not non-negative integers.
    """
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise file_error(path, f"not valid JSON: {e}") from None
    mc = doc.get("model_contour") if isinstance(doc, dict) else None
    if not isinstance(mc, dict):
        raise file_error(path, "no 'model_contour' object: not an eos contour file")
    out = {}
    for side in ("right", "left"):
        vals = mc.get(f"{side}_contour")
        if not isinstance(vals, list) or not vals:
            raise file_error(path, f"model_contour.{side}_contour is missing or empty")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in vals):
            raise file_error(path, f"model_contour.{side}_contour must hold non-negative integers")
        out[side] = list(vals)
    return out
