"""Shared helpers for the readers: a bounds-checked little-endian byte reader and atomic writes."""
from __future__ import annotations

import os
import pathlib
import struct
import tempfile

import numpy as np


def file_error(path, what: str) -> ValueError:
    """A ValueError whose message starts with the file name."""
    return ValueError(f"{os.fspath(path)}: {what}")


def read_bytes(path) -> bytes:
    """Read a whole file, turning a missing/unreadable file into a ValueError naming it."""
    p = pathlib.Path(path)
    if not p.exists():
        raise file_error(p, "no such file")
    if not p.is_file():
        raise file_error(p, "not a regular file")
    try:
        return p.read_bytes()
    except OSError as e:  # permissions and the like
        raise file_error(p, f"cannot read ({e.strerror or e})") from e


def read_text(path) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise file_error(path, f"not a UTF-8 text file (bad byte at offset {e.start})") from e


class ByteReader:
    """Sequential little-endian reader over a bytes object; every read is bounds-checked.

    Errors are ValueErrors naming the file, the byte offset and the field being read.
    """

    def __init__(self, data: bytes, path):
        self.data = memoryview(data)
        self.path = path
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise file_error(
                self.path,
                f"truncated or corrupt: reading {what} at byte {self.pos} needs {n} bytes, "
                f"only {self.remaining} left (file size {len(self.data)})",
            )
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self._take(size, what))[0]

    def u32(self, what):
        return self.scalar("I", what)

    def i32(self, what):
        return self.scalar("i", what)

    def u64(self, what):
        return self.scalar("Q", what)

    def bool(self, what):
        v = self.scalar("B", what)
        if v not in (0, 1):
            raise file_error(self.path, f"corrupt: {what} at byte {self.pos - 1} is {v}, expected a bool 0/1")
        return bool(v)

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        buf = self._take(count * dt.itemsize, what)
        return np.frombuffer(buf, dtype=dt).copy()

    def count(self, what: str, itemsize: int) -> int:
        """A cereal size tag (uint64) that must fit in the rest of the file."""
        at = self.pos
        n = self.u64(f"{what} count")
        if n * itemsize > self.remaining:
            raise file_error(
                self.path,
                f"truncated or corrupt: {what} count {n} at byte {at} needs {n * itemsize} bytes, "
                f"only {self.remaining} left",
            )
        return n

    def string(self, what: str) -> str:
        n = self.count(what, 1)
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise file_error(self.path, f"corrupt: {what} is not valid UTF-8") from e

    def done(self, what: str):
        if self.remaining:
            raise file_error(
                self.path,
                f"corrupt or not {what}: {self.remaining} unexpected bytes after byte {self.pos}",
            )


def file_mode() -> int:
    """``0o666`` less the umask: the mode of a file made by a plain ``open``."""
    from ..atomic import file_mode as _fm

    return _fm()


def atomic_write(path, writer, mode: str = "wb"):
    """Write a file atomically: ``writer(fileobj)`` writes to a temp file in the same folder,
    which then replaces ``path`` (``os.replace``), so readers never see a half-written file."""
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    if not folder.is_dir():
        raise file_error(path, f"folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, file_mode())  # respect the umask (mkstemp makes 0600 files)
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def build_model(path, **fields):
    """Construct a MorphableModel, re-raising its validation errors with the file name."""
    from ..model import MorphableModel

    try:
        return MorphableModel(**fields)
    except ValueError as e:
        raise file_error(path, f"inconsistent model: {e}") from None
