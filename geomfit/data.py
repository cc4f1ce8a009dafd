"""Finding and fetching morphable models by name.

``resolve_model("sfm")`` finds the Surrey Face Model (the shape-only 3448-vertex version that ships
with the eos fitting library) together with its expression blendshapes, iBUG landmark mapping and
jaw-contour file, looking in this order:

1. ``$GEOMFIT_DATA/sfm/`` (the project's real-data folder, when set);
2. the local cache: ``$GEOMFIT_CACHE/sfm/`` if set, else ``$XDG_CACHE_HOME/geomfit/sfm/``, else
   ``~/.cache/geomfit/sfm/``;
3. otherwise it raises, telling the user to run ``geomfit download-model sfm``.

``download_model("sfm")`` fetches the four files from the eos repository at the pinned release
``v1.5.0`` (raw GitHub URLs), verifies each file's SHA-256 against the hashes recorded here, and
writes them atomically into the cache.  The Surrey model is free for non-commercial use only (see
eos's README); downloading it means accepting those terms.

Any other argument is taken as a path to a model file in a format :func:`geomfit.io.load_model`
reads (eos ``.bin``, BFM ``.h5``, FLAME ``.pkl``/``.npz``, geomfit ``.npz``).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional, Union

from . import atomic

__all__ = [
    "EOS_REVISION",
    "SFM_FILES",
    "cache_dir",
    "find_model_dir",
    "model_files",
    "resolve_model",
    "download_model",
    "ModelNotFoundError",
]

#: The eos revision the Surrey model files are fetched from (a release tag; the SHA-256 of every
#: file is checked as well, so a moved tag cannot change what is installed).
EOS_REVISION = "v1.5.0"
DEFAULT_URL_BASE = f"https://raw.githubusercontent.com/patrikhuber/eos/{EOS_REVISION}/share/"

#: File name -> SHA-256 of eos 1.5.0's ``share/`` files.
SFM_FILES: Dict[str, str] = {
    "sfm_shape_3448.bin": "43750338ae533e7fb981e924b6f67ebde3d292f15ec4fc886ae5af14308ad980",
    "expression_blendshapes_3448.bin": "a77c81712fc5e8b08a1be4cd2824d51514e5bde6578109ae5240dfb3489efd43",
    "ibug_to_sfm.txt": "810810c457184526c7d54305ecbc5da764e2431b5e66025d921a7d424aebfac9",
    "sfm_model_contours.json": "c9e69bfa995ab19ac6b27abb07729eb0520a00bb192be12426ca6bce76f3fded",
}
#: Role of each file for :func:`geomfit.io.load_model`.
_SFM_ROLES = {
    "model": "sfm_shape_3448.bin",
    "expressions": "expression_blendshapes_3448.bin",
    "landmarks": "ibug_to_sfm.txt",
    "contours": "sfm_model_contours.json",
}
KNOWN_MODELS = {"sfm": SFM_FILES}


class ModelNotFoundError(FileNotFoundError):
    """A named model is neither in GEOMFIT_DATA nor in the cache."""


def cache_dir() -> pathlib.Path:
    """The local model cache: ``$GEOMFIT_CACHE``, else ``$XDG_CACHE_HOME/geomfit``, else ``~/.cache/geomfit``."""
    env = os.environ.get("GEOMFIT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "geomfit"


def _complete(d: pathlib.Path, files) -> bool:
    return all((d / f).is_file() for f in files)


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(KNOWN_MODELS))}")
    return key


def find_model_dir(name: str = "sfm") -> pathlib.Path:
    """Folder holding all the files of the named model.

    Parameters
    ----------
    name : str
        A known model name (``"sfm"``).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ModelNotFoundError
        When neither ``$GEOMFIT_DATA/<name>/`` nor the cache holds every file; the message says how
        to download them.
    """
    key = _check_name(name)
    files = KNOWN_MODELS[key]
    tried = []
    data = data_dir()
    if data is not None:
        d = data / key
        tried.append(d)
        if _complete(d, files):
            return d
    d = cache_dir() / key
    tried.append(d)
    if _complete(d, files):
        return d
    raise ModelNotFoundError(
        f"model {name!r} not found (looked in {', '.join(str(t) for t in tried)}); "
        f"run `geomfit download-model {key}` to fetch it (non-commercial licence), "
        "or pass a path to a model file"
    )


def data_dir() -> Optional[pathlib.Path]:
    """The real-data folder: ``$GEOMFIT_DATA``, else ``../shared/data`` beside a source checkout.

    Returns ``None`` when neither exists.
    """
    env = os.environ.get("GEOMFIT_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    for base in (pathlib.Path(__file__).resolve().parents[1], pathlib.Path.cwd()):
        d = base.parent / "shared" / "data"
        if d.is_dir():
            return d
    return None


def model_files(name: str = "sfm") -> Dict[str, pathlib.Path]:
    """Paths of a named model's files by role: ``model``, ``expressions``, ``landmarks``, ``contours``."""
    d = find_model_dir(name)
    return {role: d / fn for role, fn in _SFM_ROLES.items()}


def resolve_model(model: Union[str, os.PathLike, "object"] = "sfm", **load_kwargs):
    """Turn a model name, a path or a model into a :class:`geomfit.model.MorphableModel`.

    Parameters
    ----------
    model : str, os.PathLike or MorphableModel
        ``"sfm"`` (the Surrey model with its blendshapes, landmark and contour files, found as
        described in the module docstring), a path to a model file in any format
        :func:`geomfit.io.load_model` reads, or an already loaded ``MorphableModel`` (returned
        as is).
    **load_kwargs
        Passed to :func:`geomfit.io.load_model` for paths (``expressions``, ``landmarks``,
        ``contours``).

    Returns
    -------
    MorphableModel

    Raises
    ------
    ModelNotFoundError
        For ``"sfm"`` when its files are nowhere to be found (the message says how to fetch them).
    FileNotFoundError
        For a path that does not exist.
    TypeError
        For anything else.
    """
    from .model import MorphableModel

    if isinstance(model, MorphableModel):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a path or a MorphableModel, got {type(model).__name__}")
    def load_model(*a, **k):
        from .io import load_model as _load

        return _load(*a, **k)

    s = os.fspath(model)
    if s.lower() in KNOWN_MODELS and not pathlib.Path(s).exists():
        f = model_files(s)
        return load_model(f["model"], expressions=f["expressions"], landmarks=f["landmarks"], contours=f["contours"])
    p = pathlib.Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model {s!r} is neither a known name ({', '.join(sorted(KNOWN_MODELS))}) nor an existing file"
        )
    if p.is_dir():
        # A folder laid out like eos's share/: use the SFM file names.
        if _complete(p, SFM_FILES):
            return load_model(p / _SFM_ROLES["model"], expressions=p / _SFM_ROLES["expressions"],
                              landmarks=p / _SFM_ROLES["landmarks"], contours=p / _SFM_ROLES["contours"])
        raise FileNotFoundError(f"model folder {p} does not hold the files {', '.join(SFM_FILES)}")
    if p.name == _SFM_ROLES["model"] and not load_kwargs:
        # eos's SFM shape file next to its companions: pick them up.
        comp = {r: p.parent / fn for r, fn in _SFM_ROLES.items() if r != "model"}
        load_kwargs = {r: q for r, q in comp.items() if q.is_file()}
    return load_model(p, **load_kwargs)


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_model(
    name: str = "sfm",
    url_base: Optional[str] = None,
    dest: Optional[Union[str, os.PathLike]] = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: Optional[Callable[[str], None]] = None,
) -> pathlib.Path:
    """Download a named model's files, verify their SHA-256 and install them atomically.

    Parameters
    ----------
    name : str
        ``"sfm"``.
    url_base : str, optional
        Where the files live; the file name is appended.  Default: eos's ``share/`` folder at
        :data:`EOS_REVISION` on raw.githubusercontent.com.  ``file://`` URLs work (used by tests
        and for offline mirrors).
    dest : path, optional
        Target folder; default ``cache_dir()/<name>``.
    force : bool
        Re-download files that are already present with the right hash.
    timeout : float
        Seconds per request.
    progress : callable, optional
        Called with one line of text per file.

    Returns
    -------
    pathlib.Path
        The folder holding the verified files.

    Raises
    ------
    RuntimeError
        When a download fails (naming the URL and the reason) or a file's SHA-256 does not match;
        nothing is left behind for that file (earlier verified files stay).
    """
    key = _check_name(name)
    files = KNOWN_MODELS[key]
    base = url_base or DEFAULT_URL_BASE
    if not base.endswith("/"):
        base += "/"
    out = pathlib.Path(dest).expanduser() if dest is not None else cache_dir() / key
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda s: None)
    for fn, expected in files.items():
        target = out / fn
        if not force and target.is_file() and sha256_file(target) == expected:
            say(f"{fn}: already present, hash ok")
            continue
        url = base + fn
        say(f"{fn}: downloading {url}")
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, atomic.atomic_path(target) as tmp:
                with open(tmp, "wb") as f:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
                if h.hexdigest() != expected:
                    raise _HashMismatch(
                        f"{url}: SHA-256 {h.hexdigest()} does not match the expected {expected} "
                        "(wrong revision or corrupted download); nothing was installed"
                    )
        except _HashMismatch as e:
            raise RuntimeError(str(e)) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise RuntimeError(f"could not download {url}: {reason}") from e
        say(f"{fn}: ok")
    return out


class _HashMismatch(Exception):
    pass
