"""Model resolution and download (against local file:// URLs: no network in tests)."""
import hashlib
import os
import pathlib

import pytest

from geomfit import atomic, data as gdata


def _fake_share(tmp_path, files=None):
    """A folder of fake model files and a SFM_FILES-like hash table for it."""
    src = tmp_path / "share"
    src.mkdir()
    table = {}
    for i, fn in enumerate(files or gdata.SFM_FILES):
        payload = (f"file {fn} " * (100 + i)).encode()
        (src / fn).write_bytes(payload)
        table[fn] = hashlib.sha256(payload).hexdigest()
    return src, table


def test_download_from_file_url_verifies_and_installs(tmp_path, monkeypatch):
    src, table = _fake_share(tmp_path)
    monkeypatch.setitem(gdata.KNOWN_MODELS, "sfm", table)
    monkeypatch.setenv("GEOMFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GEOMFIT_DATA", str(tmp_path / "no-data"))
    with pytest.raises(gdata.ModelNotFoundError, match="geomfit download-model sfm"):
        gdata.find_model_dir("sfm")
    lines = []
    out = gdata.download_model("sfm", url_base=src.as_uri(), progress=lines.append)
    assert out == tmp_path / "cache" / "sfm"
    for fn, h in table.items():
        assert gdata.sha256_file(out / fn) == h
        assert (out / fn).read_bytes() == (src / fn).read_bytes()
    assert gdata.find_model_dir("sfm") == out
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(table)
    # second call: already present, nothing downloaded
    lines.clear()
    gdata.download_model("sfm", url_base=src.as_uri(), progress=lines.append)
    assert all("already present" in s for s in lines)


def test_download_hash_mismatch_leaves_nothing(tmp_path, monkeypatch):
    src, table = _fake_share(tmp_path)
    fn = "ibug_to_sfm.txt"
    table[fn] = "0" * 64
    monkeypatch.setitem(gdata.KNOWN_MODELS, "sfm", table)
    dest = tmp_path / "dest"
    with pytest.raises(RuntimeError, match="SHA-256"):
        gdata.download_model("sfm", url_base=src.as_uri(), dest=dest)
    assert not (dest / fn).exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_download_missing_file_clear_error(tmp_path, monkeypatch):
    src, table = _fake_share(tmp_path)
    (src / "sfm_model_contours.json").unlink()
    monkeypatch.setitem(gdata.KNOWN_MODELS, "sfm", table)
    with pytest.raises(RuntimeError, match="could not download .*sfm_model_contours.json"):
        gdata.download_model("sfm", url_base=src.as_uri(), dest=tmp_path / "d")


def test_real_hashes_match_shared_data(sfm_dir, tmp_path, monkeypatch):
    # The pinned hashes are those of eos 1.5.0's share/ files; downloading from a mirror works.
    for fn, h in gdata.SFM_FILES.items():
        assert gdata.sha256_file(sfm_dir / fn) == h
    out = gdata.download_model("sfm", url_base=sfm_dir.as_uri(), dest=tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == sorted(gdata.SFM_FILES)


def test_resolution_order(tmp_path, monkeypatch):
    src, table = _fake_share(tmp_path)
    monkeypatch.setitem(gdata.KNOWN_MODELS, "sfm", table)
    datadir = tmp_path / "data"
    (datadir / "sfm").mkdir(parents=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GEOMFIT_DATA", str(datadir))
    monkeypatch.setenv("GEOMFIT_CACHE", str(cache))
    gdata.download_model("sfm", url_base=src.as_uri())
    assert gdata.find_model_dir("sfm") == cache / "sfm"  # data folder incomplete -> cache
    gdata.download_model("sfm", url_base=src.as_uri(), dest=datadir / "sfm")
    assert gdata.find_model_dir("SFM") == datadir / "sfm"  # data folder first
    with pytest.raises(ValueError, match="unknown model name"):
        gdata.find_model_dir("nope")
    monkeypatch.delenv("GEOMFIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gdata.cache_dir() == tmp_path / "xdg" / "geomfit"


def test_resolve_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMFIT_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("GEOMFIT_DATA", str(tmp_path / "no-data"))
    with pytest.raises(gdata.ModelNotFoundError, match="download-model"):
        gdata.resolve_model("sfm")
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        gdata.resolve_model(str(tmp_path / "missing.bin"))
    with pytest.raises(TypeError):
        gdata.resolve_model(3)


def test_resolve_sfm_loads_model(sfm_dir, monkeypatch):
    pytest.importorskip("geomfit.io", reason="io stage not merged")
    io = pytest.importorskip("geomfit.io")
    if not hasattr(io, "load_model"):
        pytest.skip("geomfit.io.load_model not merged yet")
    monkeypatch.setenv("GEOMFIT_DATA", str(sfm_dir.parent))
    m = gdata.resolve_model("sfm")
    assert m.n_vertices == 3448 and m.n_exp == 6
    assert len(m.landmarks) > 40 and set(m.contours) == {"right", "left"}
    m2 = gdata.resolve_model(sfm_dir / "sfm_shape_3448.bin")
    assert m2.n_exp == 6
    assert gdata.resolve_model(m) is m


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "out.txt"
    atomic.write_text(p, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_open(p, "w") as f:
            f.write("half-written")
            raise KeyboardInterrupt
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.txt"]
    atomic.write_json(tmp_path / "a.json", {"x": __import__("numpy").float32(1.5)})
    assert (tmp_path / "a.json").read_text().strip() == '{\n  "x": 1.5\n}'
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.write_text(tmp_path / "nodir" / "x.txt", "x")


def test_atomic_write_image_roundtrip(tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (7, 5, 3), dtype=np.uint8)
    atomic.write_image(tmp_path / "i.png", img)
    back = cv2.imread(str(tmp_path / "i.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(back, img)
    img16 = rng.integers(0, 65535, (4, 6), dtype=np.uint16)
    atomic.write_image(tmp_path / "d.png", img16)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "d.png"), cv2.IMREAD_UNCHANGED), img16)
    with pytest.raises(ValueError, match="dtype"):
        atomic.write_image(tmp_path / "f.png", img.astype(float))


def test_data_dir_defaults_to_shared_data_beside_the_checkout(monkeypatch):
    monkeypatch.delenv("GEOMFIT_DATA", raising=False)
    import pathlib

    beside = pathlib.Path(gdata.__file__).resolve().parents[1].parent / "shared" / "data"
    if not beside.is_dir():
        import pytest

        pytest.skip(f"{beside} does not exist: no default data folder to find")
    assert gdata.data_dir() == beside
    monkeypatch.setenv("GEOMFIT_DATA", "/somewhere/else")
    assert str(gdata.data_dir()) == "/somewhere/else"
