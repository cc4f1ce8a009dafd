"""Atomic file writes: a reader never sees a half-written output.

Every writer here follows the same recipe: write to a temporary file in the *same directory* as the
target (so the final rename never crosses a file system), flush and ``fsync`` it, then
``os.replace`` it onto the target (atomic on POSIX and Windows) and ``fsync`` the directory so the
rename itself survives a crash.  If anything fails -- an exception, Ctrl-C -- the temporary file is
removed and the target is left exactly as it was.

>>> import tempfile, os, json
>>> d = tempfile.mkdtemp()
>>> write_json(os.path.join(d, "r.json"), {"a": 1})
>>> json.load(open(os.path.join(d, "r.json")))
{'a': 1}
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator, Union

import numpy as np

__all__ = ["atomic_open", "atomic_path", "write_bytes", "write_text", "write_json", "write_image"]

PathLike = Union[str, os.PathLike]


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    For writers that insist on a file name (``trimesh.Trimesh.export``, ``cv2.imwrite``): write to
    the yielded path, and when the ``with`` block ends without an exception the file is fsynced
    and renamed onto ``path``.  The temporary name keeps ``path``'s suffix so that writers that
    choose the format from the extension still work.

    Parameters
    ----------
    path : str or os.PathLike
        The final destination.  Its directory must exist.

    Raises
    ------
    FileNotFoundError
        If the destination directory does not exist.
    """
    path = pathlib.Path(path)
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=str(parent))
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file for writing that atomically becomes ``path`` on success.

    Parameters
    ----------
    path : str or os.PathLike
        The final destination.
    mode : {"wb", "w"}
        Binary or text mode.
    encoding : str, optional
        Text encoding (text mode only; UTF-8 by default).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def _json_default(o: Any):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, pathlib.PurePath):
        return str(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Atomically write ``obj`` as JSON (NumPy scalars and arrays are converted to Python)."""
    write_text(path, json.dumps(obj, indent=indent, default=_json_default, allow_nan=True) + "\n")


def write_image(path: PathLike, image: np.ndarray, rgb: bool = True) -> None:
    """Atomically write an image; the format follows the extension (``.png``, ``.jpg``, ...).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its suffix picks the encoder.
    image : ndarray, shape (H, W), (H, W, 3) or (H, W, 4), dtype uint8 or uint16
        Pixels.  Colour images are taken as RGB(A) unless ``rgb=False`` (then BGR(A), OpenCV's
        order).
    rgb : bool
        Channel order of ``image``.

    Raises
    ------
    ValueError
        If the image has an unsupported shape or dtype, or the encoder fails.
    """
    import cv2

    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_image({path}): dtype must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        if rgb:
            image = image[..., [2, 1, 0, 3][: image.shape[2]]]
    elif image.ndim != 2:
        raise ValueError(f"write_image({path}): shape must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    ext = pathlib.Path(path).suffix or ".png"
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"write_image({path}): OpenCV could not encode a {ext} image")
    write_bytes(path, buf.tobytes())
