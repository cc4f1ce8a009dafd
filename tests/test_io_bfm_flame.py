"""BFM 2009 (.mat), BFM 2017/2019 (.h5) and FLAME (.pkl) readers, on small files written here in the
same layouts as the real (registration-only) files."""
import os
import pickle
import re
import sys
import types

import numpy as np
import pytest
import scipy.io
import scipy.sparse

from geomfit.io import detect_format, load_model


def _orthonormal(rng, m, k):
    q, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return q


def _grid_faces(nx, ny):
    """Triangles of an nx*ny vertex grid, counter-clockwise seen from +z (x right, y up)."""
    f = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = j * nx + i, j * nx + i + 1, (j + 1) * nx + i, (j + 1) * nx + i + 1
            f += [[a, b, d], [a, d, c]]
    return np.array(f)


def _normals_z(v, f):
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])[:, 2]


@pytest.fixture
def bfm2009_file(tmp_path):
    rng = np.random.default_rng(0)
    nx, ny, k = 4, 3, 5
    n = nx * ny
    xy = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * 1e4
    mean = np.c_[xy, np.zeros(n)].astype(np.float32)
    ccw = _grid_faces(nx, ny)
    cw = ccw[:, [0, 2, 1]]  # BFM 2009 stores front faces clockwise
    d = dict(shapeMU=mean.reshape(-1, 1), shapePC=_orthonormal(rng, 3 * n, k).astype(np.float32),
             shapeEV=rng.uniform(1e3, 5e3, (k, 1)).astype(np.float32),
             texMU=rng.uniform(0, 255, (3 * n, 1)).astype(np.float32),
             texPC=_orthonormal(rng, 3 * n, 3).astype(np.float32),
             texEV=rng.uniform(5, 40, (3, 1)).astype(np.float32),
             tl=(cw + 1).astype(np.float64))  # MATLAB stores tl as double, 1-based
    p = tmp_path / "01_MorphableModel.mat"
    scipy.io.savemat(p, d)
    return p, d


def test_bfm2009(bfm2009_file):
    p, d = bfm2009_file
    assert detect_format(p) == "bfm2009"
    m = load_model(p)
    n = d["shapeMU"].size // 3
    np.testing.assert_array_equal(m.mean, d["shapeMU"].reshape(n, 3))
    a = np.random.default_rng(1).standard_normal(5)
    # independent evaluation in the file's flat layout: mu + PC diag(EV) a (EV are std devs)
    ref = d["shapeMU"][:, 0].astype(np.float64) + d["shapePC"].astype(np.float64) @ (d["shapeEV"][:, 0] * a)
    np.testing.assert_allclose(m.shape(a), ref.reshape(n, 3), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose((m.id_basis ** 2).sum(axis=(0, 1)), d["shapeEV"][:, 0].astype(float) ** 2, rtol=1e-5)
    assert m.n_exp == 0
    np.testing.assert_array_equal(np.sort(m.faces, 1), np.sort(d["tl"].astype(int) - 1, 1))
    assert np.all(_normals_z(m.mean, m.faces) > 0)  # front faces now counter-clockwise
    np.testing.assert_allclose(m.color_mean, d["texMU"].reshape(n, 3) / 255, rtol=1e-6)
    np.testing.assert_allclose((m.color_basis ** 2).sum(axis=(0, 1)), (d["texEV"][:, 0] / 255.0) ** 2, rtol=1e-5)


def test_bfm2009_with_landmark_files(bfm2009_file, sfm_dir, tmp_path):
    """The real BFM mapping files parse; with a model too small for them -> clear error."""
    p, _ = bfm2009_file
    with pytest.raises(ValueError, match=re.escape(str(sfm_dir / "ibug_to_bfm2009.txt")) + ".*outside"):
        load_model(p, landmarks=sfm_dir / "ibug_to_bfm2009.txt")


def test_bfm2009_bad(tmp_path, bfm2009_file):
    p, d = bfm2009_file
    data = p.read_bytes()
    t = tmp_path / "t.mat"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(t)) + ".*(truncated|not a valid)"):
        load_model(t)
    d2 = dict(d)
    del d2["shapeEV"]
    scipy.io.savemat(t, d2)
    with pytest.raises(ValueError, match="missing variables \\['shapeEV'\\]"):
        load_model(t)
    d2 = dict(d, shapeEV=d["shapeEV"][:3])
    scipy.io.savemat(t, d2)
    with pytest.raises(ValueError, match="5 columns but 3"):
        load_model(t)
    d2 = dict(d, tl=d["tl"] + 100)
    scipy.io.savemat(t, d2)
    with pytest.raises(ValueError, match="outside"):
        load_model(t)


def _write_h5(path, groups, cells, points=None):
    import h5py

    with h5py.File(path, "w") as f:
        for g, (mean, basis, var) in groups.items():
            f[f"{g}/model/mean"] = mean
            f[f"{g}/model/pcaBasis"] = basis
            f[f"{g}/model/pcaVariance"] = var
        f["shape/representer/cells"] = cells
        if points is not None:
            f["shape/representer/points"] = points


@pytest.fixture
def bfm2017_file(tmp_path):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(2)
    nx, ny = 3, 3
    n = nx * ny
    xy = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * 10.0
    mean = np.c_[xy, np.zeros(n)].astype(np.float32).reshape(-1)
    groups = {
        "shape": (mean, _orthonormal(rng, 3 * n, 4).astype(np.float32), rng.uniform(10, 100, 4).astype(np.float32)),
        "expression": (rng.standard_normal(3 * n).astype(np.float32) * 0.1,
                       _orthonormal(rng, 3 * n, 3).astype(np.float32), rng.uniform(1, 9, 3).astype(np.float32)),
        "color": (rng.uniform(0, 1, 3 * n).astype(np.float32), _orthonormal(rng, 3 * n, 2).astype(np.float32),
                  rng.uniform(0.01, 0.1, 2).astype(np.float32)),
    }
    cells = _grid_faces(nx, ny).T.astype(np.uint32)
    p = tmp_path / "model2017-1_bfm_nomouth.h5"
    _write_h5(p, groups, cells, mean.reshape(n, 3).T)
    return p, groups, cells


def test_bfm2017(bfm2017_file):
    p, g, cells = bfm2017_file
    assert detect_format(p) == "bfm2017"
    m = load_model(p)
    n = 9
    a, e = np.array([1.0, -0.5, 2.0, 0.3]), np.array([0.7, -1.2, 0.1])
    (sm, sb, sv), (em, eb, ev), (cm, cb, cv) = g["shape"], g["expression"], g["color"]
    ref = (sm.astype(float) + em + sb.astype(float) @ (np.sqrt(sv.astype(float)) * a)
           + eb.astype(float) @ (np.sqrt(ev.astype(float)) * e))
    np.testing.assert_allclose(m.shape(a, e), ref.reshape(n, 3), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m.faces, cells.T.astype(int))
    np.testing.assert_allclose(m.color_mean, cm.reshape(n, 3))
    np.testing.assert_allclose((m.color_basis ** 2).sum(axis=(0, 1)), cv, rtol=1e-5)
    assert m.n_id == 4 and m.n_exp == 3


@pytest.mark.filterwarnings("ignore:.*not unit length")
def test_bfm2017_shape_only_and_bad(tmp_path, bfm2017_file):
    p, g, cells = bfm2017_file
    t = tmp_path / "s.h5"
    _write_h5(t, {"shape": g["shape"]}, cells)
    m = load_model(t)
    assert m.n_exp == 0 and m.color_mean is None
    mean, basis, var = g["shape"]
    _write_h5(t, {"shape": (mean, basis * 3, var)}, cells)
    with pytest.warns(UserWarning, match="not unit length"):
        load_model(t)
    _write_h5(t, {"shape": (mean, basis, -var)}, cells)
    with pytest.raises(ValueError, match=re.escape(str(t)) + ".*negative"):
        load_model(t)
    _write_h5(t, {"shape": g["shape"]}, cells.T)
    with pytest.raises(ValueError, match="cells must have shape \\(3, F\\)"):
        load_model(t)
    _write_h5(t, {"shape": g["shape"], "expression": (mean[:-3], basis[:-3], var)}, cells)
    with pytest.raises(ValueError, match="expression model has 8 vertices, shape model 9"):
        load_model(t)
    import h5py
    with h5py.File(t, "w") as f:
        f["shape/model/mean"] = mean
    with pytest.raises(ValueError, match="missing datasets"):
        load_model(t)
    data = p.read_bytes()
    t.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=re.escape(str(t)) + ".*(truncated|cannot read)"):
        load_model(t)


# ---- FLAME ---------------------------------------------------------------------------------------

def _fake_chumpy():
    """A module tree named like chumpy with a Ch class that pickles like chumpy's (its __dict__)."""
    ch_mod = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x, np.float64)
            self._dirty_vars = set()
            self._itr = None

    class add(Ch):  # a chumpy operation node (not a leaf)
        def __init__(self, a, b):
            self.a, self.b = a, b

    for c in (Ch, add):
        c.__module__ = "chumpy.ch"
        c.__qualname__ = c.__name__
        setattr(ch_mod, c.__name__, c)
    pkg = types.ModuleType("chumpy")
    pkg.ch = ch_mod
    return pkg, ch_mod


def _flame_dict(rng, Ch, n=20, k_shape=6, k_exp=4):
    v = rng.standard_normal((n, 3)) * 0.1
    sd = rng.standard_normal((n, 3, k_shape + k_exp)) * 1e-3
    return dict(v_template=v, shapedirs=Ch(sd), f=rng.integers(0, n, (30, 3)).astype(np.uint32),
                J_regressor=scipy.sparse.random(5, n, density=0.3, format="csc", random_state=0),
                posedirs=Ch(rng.standard_normal((n, 3, 9))), kintree_table=np.zeros((2, 5), np.int64),
                bs_style="lbs", bs_type="lrotmin")


def _dump_with_fake_chumpy(monkeypatch, path, build):
    pkg, ch_mod = _fake_chumpy()
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "chumpy", pkg)
        mp.setitem(sys.modules, "chumpy.ch", ch_mod)
        d = build(ch_mod)
        path.write_bytes(pickle.dumps(d, protocol=2))
    assert "chumpy" not in sys.modules or sys.modules["chumpy"] is not pkg
    return d


def test_flame(tmp_path, monkeypatch):
    p = tmp_path / "generic_model.pkl"
    rng = np.random.default_rng(3)
    d = _dump_with_fake_chumpy(monkeypatch, p, lambda ch: _flame_dict(rng, ch.Ch))
    assert detect_format(p) == "flame"
    from geomfit.io.flame import load_flame

    m = load_flame(p, n_shape=6)
    sd = d["shapedirs"].x
    np.testing.assert_array_equal(m.mean, d["v_template"])
    np.testing.assert_array_equal(m.id_basis, sd[:, :, :6])
    np.testing.assert_array_equal(m.exp_basis, sd[:, :, 6:])
    np.testing.assert_array_equal(m.faces, d["f"].astype(int))
    b, e = rng.standard_normal(6), rng.standard_normal(4)
    np.testing.assert_allclose(m.shape(b, e), d["v_template"] + sd @ np.r_[b, e], rtol=1e-12)
    m300 = load_model(p)  # default split: 300 identity directions (here all 10)
    assert m300.n_id == 10 and m300.n_exp == 0


def test_flame_bad(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    p = tmp_path / "op.pkl"
    _dump_with_fake_chumpy(monkeypatch, p, lambda ch: dict(_flame_dict(rng, ch.Ch), shapedirs=ch.add(1, 2)))
    with pytest.raises(ValueError, match="shapedirs: cannot recover an array from a pickled chumpy.ch.add"):
        load_model(p)
    p2 = tmp_path / "keys.pkl"
    _dump_with_fake_chumpy(monkeypatch, p2, lambda ch: {"v_template": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="missing keys \\['shapedirs', 'f'\\]"):
        load_model(p2)
    p3 = tmp_path / "shape.pkl"
    _dump_with_fake_chumpy(monkeypatch, p3, lambda ch: dict(_flame_dict(rng, ch.Ch), v_template=np.zeros((7, 3))))
    with pytest.raises(ValueError, match="shapedirs must have shape \\(7, 3, K\\)"):
        load_model(p3)
    data = (tmp_path / "op.pkl").read_bytes()
    t = tmp_path / "t.pkl"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(t)) + ".*truncated"):
        load_model(t)
    t.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="holds a list, expected a dict"):
        load_model(t)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_flame_pickle_runs_no_code(tmp_path):
    """Classes and functions outside NumPy's array reconstruction are never called."""
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"v_template": _Evil(target)}, protocol=2))
    with pytest.raises(ValueError):
        load_model(p)
    assert not target.exists()
