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
import errno
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Iterator, Union

import numpy as np

__all__ = ["atomic_open", "atomic_path", "write_bytes", "write_text", "write_json", "write_image", "file_mode",
           "dir_mode", "signals_deferred", "ResultDir", "OutputError", "OutputBusyError"]

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    old = os.umask(0o022)  # pragma: no cover - the portable way sets it and puts it back
    os.umask(old)  # pragma: no cover
    return old  # pragma: no cover


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666`` less the umask.

    ``tempfile.mkstemp`` creates files with mode 0600 whatever the umask; writers here ``chmod``
    their temporary file to this mode before it is renamed, so results and shared caches are as
    readable as any other file the user creates.
    """
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder: ``0o777`` less the umask (``mkdtemp`` uses 0700)."""
    return 0o777 & ~current_umask()


_DEFERRED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                              getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def signals_deferred():
    """Hold back SIGINT, SIGTERM and SIGHUP for the duration of the block (main thread).

    A signal that arrives meanwhile is recorded and raised again -- giving ``KeyboardInterrupt``
    or running its handler -- as soon as the block ends.  Used around steps that must not be cut in
    half (the two renames that swap a result folder) and around third-party code that catches
    ``BaseException`` (importing trimesh, whose optional imports would otherwise swallow a Ctrl-C).
    The Python-level handlers are swapped rather than the signal mask blocked: a blocked signal
    would still reach the interpreter through any other thread (BLAS, Numba) and be raised inside
    the block.  Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list = []

    def note(signum, frame):
        got.append(signum)

    old = {}
    try:
        for sig in _DEFERRED:
            old[sig] = signal.signal(sig, note)
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(got):
            signal.raise_signal(sig)


def test_hook(point: str) -> None:
    """Test-only fault injection at a named point of the write phase (no effect unless set).

    ``GEOMFIT_TEST_PAUSE=point`` with ``GEOMFIT_TEST_PAUSE_FILE=F``: create F and wait (at most
    120 s) until F is removed -- a test then sends a signal or starts a second run at an exact
    moment instead of racing a timer.  ``GEOMFIT_TEST_KILL=point``: the process kills itself with
    SIGKILL (a crashed worker); with ``GEOMFIT_TEST_KILL_ONCE=M`` only the first process to create
    the marker file M does.
    """
    env = os.environ
    if env.get("GEOMFIT_TEST_PAUSE") == point and env.get("GEOMFIT_TEST_PAUSE_FILE"):
        import time

        flag = pathlib.Path(env["GEOMFIT_TEST_PAUSE_FILE"])
        flag.write_text(str(os.getpid()))
        t_end = time.monotonic() + 120.0
        while flag.exists() and time.monotonic() < t_end:
            time.sleep(0.02)
    if env.get("GEOMFIT_TEST_KILL") == point:
        once = env.get("GEOMFIT_TEST_KILL_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


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
    tmp = pathlib.Path(tmp)
    try:
        try:
            os.fchmod(fd, file_mode())  # mkstemp's 0600 would make results unreadable to others
        finally:
            os.close(fd)
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


# -- result folders: claimed, staged, swapped -------------------------------------------------------
class OutputError(OSError):
    """The output folder cannot be used (not writable, not a folder, holds foreign files, ...)."""


class OutputBusyError(OutputError):
    """Another process is writing the same output folder."""


#: Suffixes of the files geomfit writes into a result folder; ``force`` replaces only such folders.
RESULT_SUFFIXES = frozenset({".obj", ".ply", ".png", ".npz", ".json"})

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _writable_error(target: pathlib.Path, folder: pathlib.Path, e: OSError) -> OutputError:
    return OutputError(e.errno, f"cannot write the output folder {target}: {folder} is not writable "
                       f"({e.strerror or e})")


class ResultDir:
    """A result folder written as a whole: the old set of files or the new set, never a mix.

    ``claim()`` (or entering the ``with`` block) checks the destination *before* any work is done:
    its parent folder must be writable (it is created if missing), an existing non-empty folder is
    refused unless ``force`` (and even then only if it holds nothing but files of the kinds geomfit
    writes), and a lock -- ``fcntl.flock`` on ``.<name>.geomfit-lock`` beside it, released by the
    kernel even if the process is killed -- makes a second process that targets the same folder
    fail at once with :class:`OutputBusyError`.  Files are then written into :attr:`staging`, a
    hidden sibling folder, and ``commit()`` swaps it in: one ``rename`` when the folder is new, an
    atomic exchange (``renameat2(RENAME_EXCHANGE)``) when it replaces an old result, with SIGINT and
    SIGTERM held back while it happens.  Leaving the block without ``commit()`` -- an error, Ctrl-C,
    SIGTERM turned into an exception -- removes the staging folder and leaves the destination as it
    was; after a SIGKILL the next claim of the same folder removes the leftovers.

    Parameters
    ----------
    path : str or os.PathLike
        The result folder.
    force : bool
        Replace an existing result folder.
    """

    def __init__(self, path: PathLike, force: bool = False):
        # the real path: a symlinked OUTDIR is written where it points (the link stays a link)
        self.path = pathlib.Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
        self.force = force
        self.staging: pathlib.Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.path.parent / f".{self.path.name}.geomfit-lock"
        self._made: list = []
        self.committed = False

    # ---- claim ---------------------------------------------------------------------------------
    def claim(self) -> pathlib.Path:
        """Check and lock the destination and create the staging folder; returns the staging folder."""
        with signals_deferred():  # a claim is quick; never leave it half-made
            return self._claim()

    def _check_and_lock(self) -> pathlib.Path:
        """Refuse a non-folder destination, create its parents and take the lock; returns the path."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError(errno.ENOTDIR, f"output path {p} exists and is not a folder")
        self._make_parents()
        self._lock()
        return p

    def _claim(self) -> pathlib.Path:
        p = self._check_and_lock()
        try:
            if p.is_dir():
                entries = sorted(p.iterdir())
                if entries and not self.force:
                    raise OutputError(errno.EEXIST, f"output folder {p} already exists and is not empty; "
                                      "use --force to replace it")
                foreign = [e.name for e in entries if not (e.is_file() and e.suffix.lower() in RESULT_SUFFIXES)]
                if foreign:
                    raise OutputError(errno.EEXIST, f"output folder {p} holds {foreign[0]!r}, which geomfit does "
                                      "not write; --force replaces the whole folder, so move that away first "
                                      "or choose another folder")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise OutputError(errno.EACCES, f"output folder {p} is not writable")
            self._remove_leftovers()
            try:
                st = tempfile.mkdtemp(prefix=f".{p.name}.geomfit-new-", dir=str(p.parent))
                os.chmod(st, dir_mode())
            except OSError as e:
                raise _writable_error(p, p.parent, e) from e
            self.staging = pathlib.Path(st)
        except BaseException:
            self._unlock()
            self._remove_made()
            raise
        return self.staging

    def _make_parents(self):
        missing = []
        q = self.path.parent
        while not q.exists():
            missing.append(q)
            q = q.parent
        if not q.is_dir():
            raise OutputError(errno.ENOTDIR, f"cannot create output folder {self.path}: {q} is not a folder")
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                self._remove_made()
                raise _writable_error(self.path, d.parent, e) from e
            self._made.append(d)

    def _lock(self):
        import fcntl

        for _ in range(10):
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, file_mode())
            except OSError as e:
                raise _writable_error(self.path, self.path.parent, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputBusyError(errno.EBUSY, f"another geomfit run is writing to {self.path} (it holds "
                                          f"{self._lock_path}); wait for it to finish or choose another "
                                          "output folder") from None
                raise
            # the holder before us may have unlinked the file after we opened it: lock the live one
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)
        raise OutputBusyError(errno.EBUSY, f"could not lock {self._lock_path}")  # pragma: no cover

    def _unlock(self):
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_leftovers(self):
        """Staging/old folders of runs that were killed (we hold the lock: nobody else uses them)."""
        for pat in (f".{self.path.name}.geomfit-new-*", f".{self.path.name}.geomfit-old-*"):
            for q in self.path.parent.glob(pat):
                shutil.rmtree(q, ignore_errors=True)

    def _remove_made(self):
        for d in reversed(self._made):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._made = []

    def claim_in_place(self) -> pathlib.Path:
        """Claim the folder to write into it directly (a batch's top folder): create it if missing,
        check that it is writable and take the lock; no staging folder.  ``release()`` ends it."""
        p = self._check_and_lock()
        try:
            if not p.is_dir():
                try:
                    p.mkdir(mode=0o777)
                except OSError as e:
                    raise _writable_error(p, p.parent, e) from e
                self._made.append(p)
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(errno.EACCES, f"output folder {p} is not writable")
        except BaseException:
            self._unlock()
            self._remove_made()
            raise
        return p

    def release(self, keep: bool = True) -> None:
        """End a :meth:`claim_in_place`; ``keep=False`` removes the folders it created if still empty."""
        if not keep:
            self._remove_made()
        self._made = []
        self._unlock()

    # ---- commit / abort ------------------------------------------------------------------------
    def commit(self) -> pathlib.Path:
        """Swap the staged files in as the result folder (atomically) and release the claim."""
        if self.staging is None:
            raise RuntimeError("ResultDir.commit() before claim()")
        p, st = self.path, self.staging
        _fsync_dir(st)
        with signals_deferred():
            if p.is_dir():
                if _exchange(st, p):
                    old = st
                else:  # two renames; in between the folder is absent, never mixed
                    old = pathlib.Path(tempfile.mktemp(prefix=f".{p.name}.geomfit-old-", dir=str(p.parent)))
                    os.rename(p, old)
                    os.rename(st, p)
            else:
                os.rename(st, p)
                old = None
            _fsync_dir(p.parent)
            self.staging = None
            self.committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._made = []
            self._unlock()
        return p

    def abort(self) -> None:
        """Discard the staged files and release the claim; the result folder stays as it was."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self.committed:
            self._remove_made()
        self._unlock()

    def __enter__(self) -> "ResultDir":
        self.claim()
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            with signals_deferred():
                self.abort()
