"""A sweep of bad inputs to every ``geomfit`` sub-command (issue 12): each must end in exactly one
line ``geomfit: error: ...`` that names the offending file or option, exit status 1, no traceback,
no "internal error" (the command's catch-all for bugs), and no output folder created or changed.

Every case fails before the pipeline runs, so the sweep is fast (the model is read at most once per
case).  Cases are built from small generated files; the real photo is image_0010 at a quarter size.
"""
import gzip
import os

import numpy as np
import pytest

from geomfit.cli import main
from test_photo import _png_header_only


def _read_pts(p):
    return np.array(open(p).read().split("{")[1].split("}")[0].split(), float).reshape(68, 2)


def _pts_text(q, n_points=None, header=True):
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in q)
    return (f"version: 1\nn_points: {len(q) if n_points is None else n_points}\n" if header else "") + \
        "{\n" + body + "\n}\n"


@pytest.fixture(scope="module")
def zoo(data, tmp_path_factory):
    import cv2

    d = tmp_path_factory.mktemp("zoo")
    img = cv2.imread(str(data / "images" / "image_0010.png"))
    small = cv2.resize(img, (320, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(d / "face.png"), small)
    ok, jpg = cv2.imencode(".jpg", small)
    (d / "real.jpg").write_bytes(jpg.tobytes())
    q = _read_pts(data / "images" / "image_0010.pts") / 4.0
    (d / "face.pts").write_text(_pts_text(q))
    np.save(d / "q.npy", q)
    return d


# -- the cases --------------------------------------------------------------------------------------
# Each builder gets (tmp, zoo, data) and returns (argv, needle); OUT in argv is tmp/"out".
def _recon_image(content, ext):
    def b(tmp, zoo, data):
        p = tmp / f"photo{ext}"
        p.write_bytes(content(zoo) if callable(content) else content)
        return ["reconstruct", str(p), "--landmarks", str(zoo / "face.pts"), "-o", "OUT"], p.name
    return b


_png = lambda zoo: (zoo / "face.png").read_bytes()  # noqa: E731
_jpg = lambda zoo: (zoo / "real.jpg").read_bytes()  # noqa: E731
IMAGE_CONTENTS = {
    "empty": b"",
    "one-byte": b"\x89",
    "png-signature": b"\x89PNG\r\n\x1a\n",
    "png-signature-zeros": b"\x89PNG\r\n\x1a\n" + b"\0" * 50,
    "png-cut-100": lambda z: _png(z)[:100],
    "png-cut-1000": lambda z: _png(z)[:1000],
    "png-half": lambda z: _png(z)[: len(_png(z)) // 2],
    "jpeg-soi-only": b"\xff\xd8\xff",
    "jpeg-cut-200": lambda z: _jpg(z)[:200],
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "text": b"hello, I am not a photo\n",
    "html": b"<!doctype html><html><body>404</body></html>",
    "gzip": gzip.compress(b"x" * 1000),
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "nul": b"\0" * 4096,
    "png-huge-header": lambda z: _png_header_only(200000, 200000),  # OpenCV raises, not returns None
}
CASES = {}
for _k, _c in IMAGE_CONTENTS.items():
    for _ext in (".png", ".jpg"):
        CASES[f"image-{_k}{_ext}"] = _recon_image(_c, _ext)


def _case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


@_case("image-missing")
def _(tmp, zoo, data):
    return ["reconstruct", str(tmp / "nope.jpg"), "-o", "OUT"], "nope.jpg"


@_case("image-missing-folder")
def _(tmp, zoo, data):
    return ["reconstruct", str(tmp / "no" / "such" / "photo.png"), "-o", "OUT"], "photo.png"


@_case("image-unicode-missing")
def _(tmp, zoo, data):
    return ["reconstruct", str(tmp / "fötö ü.png"), "-o", "OUT"], "fötö ü.png"


@_case("image-folder-without-photos")
def _(tmp, zoo, data):
    (tmp / "x.png").mkdir()
    (tmp / "x.png" / "notes.txt").write_text("x")
    return ["reconstruct", str(tmp / "x.png"), "-o", "OUT"], "x.png"


@_case("image-dangling-symlink")
def _(tmp, zoo, data):
    (tmp / "link.png").symlink_to(tmp / "gone.png")
    return ["reconstruct", str(tmp / "link.png"), "-o", "OUT"], "link.png"


@_case("image-symlink-loop")
def _(tmp, zoo, data):
    (tmp / "a.png").symlink_to(tmp / "b.png")
    (tmp / "b.png").symlink_to(tmp / "a.png")
    return ["reconstruct", str(tmp / "a.png"), "-o", "OUT"], "a.png"


@_case("image-fifo")
def _(tmp, zoo, data):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp / "pipe.png")  # reading it would block forever
    return ["reconstruct", str(tmp / "pipe.png"), "-o", "OUT"], "pipe.png"


@_case("image-unknown-skimage")
def _(tmp, zoo, data):
    return ["reconstruct", "skimage:no_such_sample", "-o", "OUT"], "no_such_sample"


@_case("image-dev-null")
def _(tmp, zoo, data):
    return ["reconstruct", "/dev/null", "-o", "OUT"], "/dev/null"


# landmark files, for reconstruct and for fit-landmarks
def _pts_cases(zoo):
    q = np.load(zoo / "q.npy")
    far = q + 5000.0
    return {
        "empty": b"",
        "header-only": b"version: 1\nn_points: 68\n",
        "no-braces": _pts_text(q).replace("{", "").replace("}", "").encode(),
        "67-points": _pts_text(q[:67]).encode(),
        "69-points": _pts_text(np.vstack([q, q[:1]])).encode(),
        "count-mismatch": _pts_text(q, n_points=10).encode(),
        "word": _pts_text(q).replace(f"{q[5, 0]:.3f}", "five", 1).encode(),
        "all-nan": _pts_text(np.full((68, 2), np.nan)).encode(),
        "inf": _pts_text(np.where(np.arange(68)[:, None] == 3, np.inf, q)).encode(),
        "huge": _pts_text(q * 1e300).encode(),
        "far-outside": _pts_text(far).encode(),
        "negative-far": _pts_text(q - 5000.0).encode(),
        "binary": bytes(range(256)) * 4,
        "utf16": _pts_text(q).encode("utf-16"),
        "three-columns": _pts_text(q).replace("\n{\n", "\n{\n1 2 3\n").encode(),
        "json": b'{"points": [[1, 2]]}',
        "one-point": b"version: 1\nn_points: 1\n{\n1 2\n}\n",
    }


PTS_NAMES = ["empty", "header-only", "no-braces", "67-points", "69-points", "count-mismatch", "word", "all-nan",
             "inf", "huge", "far-outside", "negative-far", "binary", "utf16", "three-columns", "json", "one-point"]


def _recon_pts(key):
    def b(tmp, zoo, data):
        p = tmp / f"lm-{key}.pts"
        p.write_bytes(_pts_cases(zoo)[key])
        return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(p), "-o", "OUT"], p.name
    return b


def _fit_pts(key):
    def b(tmp, zoo, data):
        p = tmp / f"lm-{key}.pts"
        p.write_bytes(_pts_cases(zoo)[key])
        return ["fit-landmarks", str(zoo / "face.pts"), str(p), "-o", "OUT", "--image-size", "256", "320"], p.name
    return b


for _k in PTS_NAMES:
    CASES[f"landmarks-{_k}"] = _recon_pts(_k)
    CASES[f"fit-landmarks-{_k}"] = _fit_pts(_k)


@_case("landmarks-missing")
def _(tmp, zoo, data):
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(tmp / "none.pts"), "-o", "OUT"], "none.pts"


@_case("landmarks-folder")
def _(tmp, zoo, data):
    (tmp / "dir.pts").mkdir()
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(tmp / "dir.pts"), "-o", "OUT"], "dir.pts"


# models
def _model(content, name):
    def b(tmp, zoo, data):
        p = tmp / name
        p.write_bytes(content(data) if callable(content) else content)
        return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(zoo / "face.pts"), "--model", str(p),
                "-o", "OUT"], name
    return b


_sfm = lambda data: (data / "sfm" / "sfm_shape_3448.bin").read_bytes()  # noqa: E731
for _k, _c, _n in [("empty", b"", "m.bin"), ("random", bytes(range(256)) * 8, "m.bin"),
                   ("cut-16", lambda d: _sfm(d)[:16], "cut16.bin"), ("cut-1000", lambda d: _sfm(d)[:1000], "c1k.bin"),
                   ("cut-100k", lambda d: _sfm(d)[:100000], "c100k.bin"),
                   ("cut-last-byte", lambda d: _sfm(d)[:-1], "clast.bin"),
                   ("text-bin", b"this is not a model\n", "t.bin"), ("npz-garbage", b"PK\x03\x04garbage", "m.npz"),
                   ("h5-garbage", b"\x89HDF\r\n\x1a\nxx", "m.h5"), ("json-garbage", b"{not json", "m.json"),
                   ("unknown-ext", b"abc", "m.xyz")]:
    CASES[f"model-{_k}"] = _model(_c, _n)


@_case("model-missing")
def _(tmp, zoo, data):
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(zoo / "face.pts"), "--model",
            str(tmp / "nomodel.bin"), "-o", "OUT"], "nomodel.bin"


@_case("model-unknown-name")
def _(tmp, zoo, data):
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(zoo / "face.pts"), "--model", "bfm1999",
            "-o", "OUT"], "bfm1999"


@_case("model-folder")
def _(tmp, zoo, data):
    (tmp / "mdir").mkdir()
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(zoo / "face.pts"), "--model", str(tmp / "mdir"),
            "-o", "OUT"], "mdir"


# output folders and options
def _recon(tmp, zoo, *extra, out="OUT"):
    return ["reconstruct", str(zoo / "face.png"), "--landmarks", str(zoo / "face.pts"), "-o", str(out), "--no-fine",
            *extra]


@_case("outdir-is-a-file")
def _(tmp, zoo, data):
    (tmp / "out").write_text("x")
    return _recon(tmp, zoo), "out"


@_case("outdir-under-a-file")
def _(tmp, zoo, data):
    (tmp / "f.txt").write_text("x")
    return _recon(tmp, zoo, out=tmp / "f.txt" / "out"), "f.txt"


@_case("outdir-not-empty")
def _(tmp, zoo, data):
    (tmp / "out").mkdir()
    (tmp / "out" / "report.json").write_text("{}")
    return _recon(tmp, zoo), "--force"


for _k, _make in [("text-file", lambda o: (o / "notes.txt").write_text("mine")),
                  ("subfolder", lambda o: (o / "photos").mkdir()),
                  ("hidden-file", lambda o: (o / ".git").write_text("x")),
                  ("tex-file", lambda o: (o / "paper.tex").write_text("x"))]:
    def _b(tmp, zoo, data, _make=_make):
        (tmp / "out").mkdir()
        _make(tmp / "out")
        return _recon(tmp, zoo, "--force"), "geomfit does not write"
    CASES[f"outdir-force-foreign-{_k}"] = _b


@_case("outdir-unwritable")
def _(tmp, zoo, data):
    if os.geteuid() == 0:
        return _recon(tmp, zoo, out="/sys/geomfit-sweep-out"), "not writable"
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return _recon(tmp, zoo, out=tmp / "ro" / "out"), "not writable"


@_case("force-and-resume")
def _(tmp, zoo, data):
    return _recon(tmp, zoo, "--force", "--resume"), "--resume"


@_case("workers-zero")
def _(tmp, zoo, data):
    return _recon(tmp, zoo, "--workers", "0"), "--workers"


@_case("workers-negative")
def _(tmp, zoo, data):
    return _recon(tmp, zoo, "--workers", "-3"), "--workers"


@_case("workers-and-scheduler")
def _(tmp, zoo, data):
    return _recon(tmp, zoo, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"), "--scheduler"


@_case("batch-with-landmarks")
def _(tmp, zoo, data):
    return ["reconstruct", str(zoo / "face.png"), str(zoo / "real.jpg"), "--landmarks", str(zoo / "face.pts"),
            "-o", "OUT"], "--landmarks"


@_case("batch-outdir-is-a-file")
def _(tmp, zoo, data):
    (tmp / "out").write_text("x")
    return ["reconstruct", str(zoo / "face.png"), str(zoo / "real.jpg"), "-o", "OUT"], "out"


@_case("batch-outdir-not-empty")
def _(tmp, zoo, data):
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text("{}")
    return ["reconstruct", str(zoo / "face.png"), str(zoo / "real.jpg"), "-o", "OUT"], "--resume"


@_case("batch-unknown-model")
def _(tmp, zoo, data):
    return ["reconstruct", str(zoo / "face.png"), str(zoo / "real.jpg"), "--model", str(tmp / "x.bin"),
            "-o", "OUT"], "x.bin"


# evaluate
def _evaluate(pred_name, pred_bytes, gt_name=None, gt_bytes=None, needle=None):
    def b(tmp, zoo, data):
        p = tmp / pred_name
        p.write_bytes(pred_bytes() if callable(pred_bytes) else pred_bytes)
        if gt_name is None:
            g = tmp / ("gt" + p.suffix)
            if p.suffix in (".npy",):
                np.save(g, np.ones((4, 4)))
            elif p.suffix in (".obj", ".ply"):
                g.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
                g = g.with_suffix(".obj") if p.suffix == ".obj" else g
                if p.suffix == ".ply":
                    g = tmp / "gt.obj"
                    g.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
            else:
                g = tmp / "gt.npy"
                np.save(g, np.ones((4, 4)))
        else:
            g = tmp / gt_name
            g.write_bytes(gt_bytes() if callable(gt_bytes) else gt_bytes)
        return ["evaluate", str(p), str(g)], needle or p.name
    return b


def _npy(arr):
    import io

    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


for _k, _args in {
    "empty-obj": ("e.obj", b""),
    "garbage-obj": ("g.obj", bytes(range(256)) * 4),
    "obj-no-vertices": ("nv.obj", b"# nothing here\n"),
    "empty-ply": ("e.ply", b""),
    "garbage-ply": ("g.ply", b"ply\nformat nonsense\nend_header\n\x00\x01"),
    "empty-npy": ("e.npy", b""),
    "corrupt-npy": ("c.npy", b"\x93NUMPY\x01\x00garbage"),
    "npy-3d": ("d3.npy", lambda: _npy(np.zeros((2, 3, 4)))),
    "npy-strings": ("s.npy", lambda: _npy(np.array([["a", "b"], ["c", "d"]]))),
    "empty-npz": ("e.npz", b""),
    "corrupt-npz": ("c.npz", b"PK\x03\x04broken"),
    "npz-no-arrays": ("n.npz", lambda: (lambda f: (np.savez(f), f.getvalue())[1])(__import__("io").BytesIO())),
    "empty-png": ("e.png", b""),
    "corrupt-png": ("c.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 30),
    "shape-mismatch": ("big.npy", lambda: _npy(np.ones((5, 7)))),
}.items():
    CASES[f"evaluate-{_k}"] = _evaluate(*_args)


@_case("evaluate-missing")
def _(tmp, zoo, data):
    np.save(tmp / "gt.npy", np.ones((3, 3)))
    return ["evaluate", str(tmp / "nothere.npy"), str(tmp / "gt.npy")], "nothere.npy"


@_case("evaluate-folder")
def _(tmp, zoo, data):
    (tmp / "d.obj").mkdir()
    (tmp / "gt.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    return ["evaluate", str(tmp / "d.obj"), str(tmp / "gt.obj")], "d.obj"


@_case("evaluate-json-in-missing-folder")
def _(tmp, zoo, data):
    np.save(tmp / "a.npy", np.ones((3, 3)))
    np.save(tmp / "b.npy", np.ones((3, 3)))
    return ["evaluate", str(tmp / "a.npy"), str(tmp / "b.npy"), "--json", str(tmp / "nodir" / "r.json")], "nodir"


# fit-landmarks, more
@_case("fit-landmarks-image-size-zero")
def _(tmp, zoo, data):
    return ["fit-landmarks", str(zoo / "face.pts"), "-o", "OUT", "--image-size", "0", "0"], "--image-size"


@_case("fit-landmarks-image-size-negative")
def _(tmp, zoo, data):
    return ["fit-landmarks", str(zoo / "face.pts"), "-o", "OUT", "--image-size", "-5", "10"], "--image-size"


@_case("fit-landmarks-image-too-small")
def _(tmp, zoo, data):
    return ["fit-landmarks", str(zoo / "face.pts"), "-o", "OUT", "--image-size", "20", "20"], "face.pts"


for _k, _c in [("empty", b""), ("corrupt", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ("text", b"not an image"),
               ("huge-header", _png_header_only(200000, 200000))]:
    def _b(tmp, zoo, data, _c=_c, _k=_k):
        d = tmp / f"side-{_k}"
        d.mkdir()
        (d / "face.pts").write_bytes((zoo / "face.pts").read_bytes())
        (d / "face.png").write_bytes(_c)
        return ["fit-landmarks", str(d / "face.pts"), "-o", "OUT"], str(d / "face.png")
    CASES[f"fit-landmarks-image-beside-{_k}"] = _b


@_case("fit-landmarks-folder")
def _(tmp, zoo, data):
    (tmp / "d").mkdir()
    return ["fit-landmarks", str(tmp / "d"), "-o", "OUT"], "is a folder"


@_case("fit-landmarks-missing")
def _(tmp, zoo, data):
    return ["fit-landmarks", str(tmp / "missing.pts"), "-o", "OUT"], "missing.pts"


@_case("fit-landmarks-outdir-is-a-file")
def _(tmp, zoo, data):
    (tmp / "out").write_text("x")
    return ["fit-landmarks", str(zoo / "face.pts"), "-o", "OUT"], "out"


# info and download-model
for _k, _c in [("empty", b""), ("random", bytes(range(200))), ("cut", lambda d: _sfm(d)[:5000])]:
    def _b(tmp, zoo, data, _c=_c, _k=_k):
        p = tmp / f"info-{_k}.bin"
        p.write_bytes(_c(data) if callable(_c) else _c)
        return ["info", str(p)], p.name
    CASES[f"info-{_k}"] = _b


@_case("info-missing")
def _(tmp, zoo, data):
    return ["info", str(tmp / "absent.bin")], "absent.bin"


@_case("download-bad-mirror")
def _(tmp, zoo, data):
    return ["download-model", "sfm", "--url-base", (tmp / "mirror").as_uri(), "--dest", str(tmp / "dl"), "-q"], \
        "sfm_shape_3448.bin"


@_case("download-dest-under-a-file")
def _(tmp, zoo, data):
    (tmp / "f").write_text("x")
    return ["download-model", "sfm", "--url-base", (data / "sfm").as_uri(), "--dest", str(tmp / "f" / "dl"),
            "-q"], "f"


def test_sweep_is_large_enough():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, zoo, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOMFIT_DATA", str(data))
    monkeypatch.setenv("GEOMFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEOMFIT_DEBUG", raising=False)
    argv, needle = CASES[name](tmp_path, zoo, data)
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*") if not p.is_symlink()
              and not p.is_fifo()}
    existed = out.exists()
    rc = main(argv + (["-q"] if argv[0] in ("reconstruct", "fit-landmarks") else []))
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 1, (rc, cap.err)
    assert len(err) == 1 and err[0].startswith("geomfit: error: "), cap.err
    assert "Traceback" not in cap.err and "internal error" not in err[0], err[0]
    assert needle in err[0], (needle, err[0])
    # nothing created or changed: no output folder, no temporary or lock files, inputs untouched
    if not existed:
        assert not out.exists(), err[0]
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*") if not p.is_symlink()
             and not p.is_fifo()}
    assert after == before, (set(after) ^ set(before))
