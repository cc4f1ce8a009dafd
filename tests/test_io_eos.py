"""eos .bin reader against eos-py (independent C++ reader), on the real Surrey model and on files
eos-py itself writes (class version 4: colour, expression PCA/blendshapes, landmark definitions)."""
import json
import re

import numpy as np
import pytest

from geomfit.io import load_model, read_contours, read_eos_blendshapes, read_eos_model, read_landmark_mapping

eos = pytest.importorskip("eos")
mm = eos.morphablemodel


def _eos_blendshape_matrix(bs):
    return np.stack([np.asarray(b.deformation).reshape(-1) for b in bs], axis=1)


def _assert_rescaled_close(ours, theirs):
    # eos rescales with Eigen's vectorised sqrt, which under Eigen's default EIGEN_FAST_MATH is
    # rsqrt + one Newton step: up to 2 ulp off the correctly rounded float32 sqrt that geomfit uses.
    # Everything else is bit-identical; here allow 4 ulp of float32 relative error.
    np.testing.assert_allclose(ours, theirs, rtol=4 * 2.0 ** -23, atol=0)


def test_sfm_shape_model_matches_eos(sfm_dir):
    path = sfm_dir / "sfm_shape_3448.bin"
    ref = mm.load_model(str(path))
    sm = ref.get_shape_model()
    raw = read_eos_model(path)
    assert raw.version == 1
    np.testing.assert_array_equal(raw.shape.mean, np.asarray(sm.get_mean()).reshape(-1))
    np.testing.assert_array_equal(raw.shape.orthonormal_basis, sm.get_orthonormal_pca_basis())
    np.testing.assert_array_equal(raw.shape.eigenvalues, np.asarray(sm.get_eigenvalues()).reshape(-1))
    np.testing.assert_array_equal(raw.shape.triangles, np.asarray(sm.get_triangle_list()))
    np.testing.assert_array_equal(raw.texcoords, np.asarray(ref.get_texture_coordinates()))
    assert raw.color.mean.size == 0 and not ref.has_color_model()

    m = load_model(path)
    n = 3448
    assert m.mean.shape == (n, 3) and m.id_basis.shape == (n, 3, 63) and m.n_exp == 0
    np.testing.assert_array_equal(m.mean, np.asarray(sm.get_mean()).reshape(n, 3))
    _assert_rescaled_close(m.id_basis, np.asarray(sm.get_rescaled_pca_basis()).reshape(n, 3, 63))
    np.testing.assert_array_equal(m.faces, np.asarray(sm.get_triangle_list()))
    tc = np.asarray(ref.get_texture_coordinates())  # eos: v down; geomfit: OBJ's v up
    np.testing.assert_array_equal(m.texcoords, np.column_stack([tc[:, 0], 1.0 - tc[:, 1]]))
    assert m.faces.shape == (6736, 3)
    # The scaled columns square-sum to the eigenvalues (orthonormal basis times sqrt(variance)).
    np.testing.assert_allclose((m.id_basis ** 2).sum(axis=(0, 1)), raw.shape.eigenvalues, rtol=1e-4)


def test_sfm_sample_matches_eos_draw_sample(sfm_dir):
    ref = mm.load_model(str(sfm_dir / "sfm_shape_3448.bin"))
    m = load_model(sfm_dir / "sfm_shape_3448.bin")
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10)
    mesh = ref.draw_sample(list(a), [])
    np.testing.assert_allclose(m.shape(a), np.asarray(mesh.vertices), atol=1e-3)


def test_blendshapes_match_eos(sfm_dir):
    path = sfm_dir / "expression_blendshapes_3448.bin"
    bs = mm.load_blendshapes(str(path))
    names, off = read_eos_blendshapes(path)
    assert names == [b.name for b in bs] == ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    np.testing.assert_array_equal(off, _eos_blendshape_matrix(bs))
    m = load_model(sfm_dir / "sfm_shape_3448.bin", expressions=path)
    np.testing.assert_array_equal(m.exp_basis, _eos_blendshape_matrix(bs).reshape(3448, 3, 6))


def _plain_mapping(path):
    """Independent line-based parse of 'N = V' lines inside [landmark_mappings]."""
    out, inside = {}, False
    for line in path.read_text().splitlines():
        s = line.split("#")[0].strip()
        if s.startswith("["):
            inside = s == "[landmark_mappings]"
            continue
        mt = re.fullmatch(r"(\d+)\s*=\s*(\d+)", s)
        if inside and mt:
            out[int(mt.group(1))] = int(mt.group(2))
    return out


@pytest.mark.parametrize("name", ["ibug_to_sfm.txt", "ibug_to_bfm2009.txt", "ibug_to_bfm2017-1_bfm_nomouth.txt"])
def test_landmark_mappings_parse(sfm_dir, name):
    mp = read_landmark_mapping(sfm_dir / name)
    assert mp == _plain_mapping(sfm_dir / name)
    assert len(mp) > 10
    # contour landmarks are not fixed vertices
    assert not set(mp) & (set(range(1, 9)) | set(range(10, 18)))


@pytest.mark.parametrize("name", ["sfm_model_contours.json", "bfm2009_model_contours.json",
                                  "bfm2017-1_bfm_nomouth_model_contours.json"])
def test_contours_parse(sfm_dir, name):
    c = read_contours(sfm_dir / name)
    raw = json.loads((sfm_dir / name).read_text())["model_contour"]
    assert c == {"right": raw["right_contour"], "left": raw["left_contour"]}


def test_full_sfm_load(sfm_dir):
    m = load_model(sfm_dir / "sfm_shape_3448.bin", expressions=sfm_dir / "expression_blendshapes_3448.bin",
                   landmarks=sfm_dir / "ibug_to_sfm.txt", contours=sfm_dir / "sfm_model_contours.json")
    assert m.landmarks == _plain_mapping(sfm_dir / "ibug_to_sfm.txt")
    assert m.landmarks[31] == 114 and 9 in m.landmarks and 1 not in m.landmarks
    assert len(m.contours["right"]) == len(m.contours["left"]) == 17
    k, v = m.landmark_arrays()
    assert len(k) == len(m.landmarks) == 50


def _small_pca(rng, n, k, tri):
    mean = rng.standard_normal(3 * n).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((3 * n, k)))
    ev = rng.uniform(0.5, 4.0, k).astype(np.float32)
    return mm.PcaModel(mean, q.astype(np.float32), ev, tri)


@pytest.mark.parametrize("expr", ["blendshapes", "pca"])
def test_eos_written_version4_file(tmp_path, expr):
    """Files eos-py writes (class version 4) with colour, expression, landmark definitions, UVs."""
    rng = np.random.default_rng(1)
    n = 7
    tri = [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    shape = _small_pca(rng, n, 4, tri)
    color = _small_pca(rng, n, 3, tri)
    if expr == "blendshapes":
        exp = [mm.Blendshape(f"b{i}", rng.standard_normal(3 * n).astype(np.float32)) for i in range(2)]
    else:
        exp = _small_pca(rng, n, 2, tri)
    uv = rng.uniform(size=(n, 2)).tolist()
    defs = {"eye.right.outer_corner": 3, "nose.tip": 5}
    model = mm.MorphableModel(shape, exp, color, defs, uv, [[0, 1, 2]])
    path = tmp_path / "m.bin"
    mm.save_model(model, str(path))
    raw = read_eos_model(path)
    assert raw.version == 4
    assert raw.landmark_definitions == defs
    np.testing.assert_array_equal(raw.texture_triangles, [[0, 1, 2]])
    np.testing.assert_array_equal(raw.color.mean, np.asarray(color.get_mean()).reshape(-1))
    m = load_model(path)
    np.testing.assert_array_equal(m.texcoords, np.column_stack([np.asarray(uv)[:, 0], 1.0 - np.asarray(uv)[:, 1]]))
    _assert_rescaled_close(m.color_basis, np.asarray(color.get_rescaled_pca_basis()).reshape(n, 3, -1))
    if expr == "blendshapes":
        assert raw.blendshape_names == ["b0", "b1"]
        np.testing.assert_array_equal(m.exp_basis, _eos_blendshape_matrix(exp).reshape(n, 3, 2))
        np.testing.assert_array_equal(m.mean, np.asarray(shape.get_mean()).reshape(n, 3))
    else:
        _assert_rescaled_close(m.exp_basis, np.asarray(exp.get_rescaled_pca_basis()).reshape(n, 3, 2))
        # eos's MorphableModel mean is shape mean + expression mean
        np.testing.assert_allclose(m.mean, np.asarray(model.get_mean().vertices), rtol=1e-6)
    # a mapping to named model landmarks resolves through the definitions
    mp = tmp_path / "map.txt"
    mp.write_text('[landmark_mappings]\n37 = "eye.right.outer_corner"\n31 = "nose.tip"\n34 = 6\n')
    m = load_model(path, landmarks=mp)
    assert m.landmarks == {37: 3, 31: 5, 34: 6}
