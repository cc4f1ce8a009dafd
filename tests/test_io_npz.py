"""geomfit .npz: save_model / load_model round trip and bad files."""
import re
import zipfile

import numpy as np
import pytest

from geomfit.io import load_model, save_model
from geomfit.model import MorphableModel


def _random_model(rng, n=30, k=5, e=2, kc=3, with_optional=True):
    faces = rng.integers(0, n, (40, 3))
    kw = {}
    if with_optional:
        kw = dict(texcoords=rng.uniform(size=(n, 2)), color_mean=rng.uniform(size=(n, 3)),
                  color_basis=rng.standard_normal((n, 3, kc)),
                  landmarks={31: 4, 9: 0, 37: n - 1}, contours={"right": [1, 2, 3], "left": [7, 8]})
    return MorphableModel(mean=rng.standard_normal((n, 3)), id_basis=rng.standard_normal((n, 3, k)),
                          exp_basis=rng.standard_normal((n, 3, e)), faces=faces, name="random", **kw)


@pytest.mark.parametrize("with_optional", [True, False])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, with_optional, compress):
    m = _random_model(np.random.default_rng(3), with_optional=with_optional)
    p = tmp_path / "m.npz"
    save_model(p, m, compress=compress)
    assert [f.name for f in tmp_path.iterdir()] == ["m.npz"]
    back = load_model(p)
    for k in ("mean", "id_basis", "exp_basis", "faces", "texcoords", "color_mean", "color_basis"):
        a, b = getattr(m, k), getattr(back, k)
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)
    assert back.landmarks == m.landmarks and back.contours == m.contours and back.name == "random"
    a = np.random.default_rng(0).standard_normal((4, 5))
    np.testing.assert_array_equal(back.shape(a), m.shape(a))


def test_round_trip_sfm(tmp_path, sfm_dir):
    m = load_model(sfm_dir / "sfm_shape_3448.bin", expressions=sfm_dir / "expression_blendshapes_3448.bin",
                   landmarks=sfm_dir / "ibug_to_sfm.txt", contours=sfm_dir / "sfm_model_contours.json")
    p = tmp_path / "sfm.npz"
    save_model(p, m)
    back = load_model(p, dtype=np.float32)
    assert back.mean.dtype == np.float32
    np.testing.assert_array_equal(back.id_basis, m.id_basis.astype(np.float32))
    np.testing.assert_array_equal(back.texcoords, m.texcoords.astype(np.float32))
    assert back.landmarks == m.landmarks and back.contours == m.contours


def test_save_overwrites_atomically(tmp_path):
    rng = np.random.default_rng(4)
    p = tmp_path / "m.npz"
    save_model(p, _random_model(rng))
    m2 = _random_model(rng, n=12)
    save_model(p, m2)
    np.testing.assert_array_equal(load_model(p).mean, m2.mean)
    with pytest.raises(TypeError):
        save_model(p, {"mean": 1})
    with pytest.raises(ValueError, match="does not exist"):
        save_model(tmp_path / "nodir" / "m.npz", m2)


def test_bad_npz(tmp_path):
    m = _random_model(np.random.default_rng(5))
    p = tmp_path / "m.npz"
    save_model(p, m)
    data = p.read_bytes()
    t = tmp_path / "t.npz"
    for c in (10, len(data) // 2, len(data) - 10):
        t.write_bytes(data[:c])
        with pytest.raises(ValueError, match=re.escape(str(t)) + ".*(truncated|corrupt)"):
            load_model(t)
    other = tmp_path / "other.npz"
    np.savez(other, mean=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a geomfit model"):
        load_model(other)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(p) as z:
        arrays = {n[:-4]: np.load(z.open(n)) for n in z.namelist()}
    arrays["id_basis"] = arrays["id_basis"][:5]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*id_basis must have shape"):
        load_model(bad)
    arrays["id_basis"] = np.full((30, 3, 5), np.nan)
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*NaN"):
        load_model(bad)
    del arrays["faces"]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="missing arrays \\['faces'\\]"):
        load_model(bad)
