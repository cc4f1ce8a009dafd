"""geomfit.model.MorphableModel: evaluation and validation."""
import numpy as np
import pytest

from geomfit.model import MorphableModel


def _model(n=7, k=4, e=2, seed=0):
    rng = np.random.default_rng(seed)
    return MorphableModel(
        mean=rng.normal(size=(n, 3)),
        id_basis=rng.normal(size=(n, 3, k)),
        exp_basis=rng.normal(size=(n, 3, e)),
        faces=np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]]),
        landmarks={31: 3, 37: 5},
        name="toy",
    )


def test_shape_is_the_linear_model():
    m = _model()
    a = np.array([0.5, -1.0, 2.0, 0.1])
    b = np.array([0.3, -0.2])
    ref = np.stack([m.mean[i] + sum(m.id_basis[i, :, k] * a[k] for k in range(4))
                    + sum(m.exp_basis[i, :, k] * b[k] for k in range(2)) for i in range(m.n_vertices)])
    np.testing.assert_allclose(m.shape(a, b), ref, atol=1e-12)
    np.testing.assert_allclose(m.shape(), m.mean)


def test_shape_batched_and_truncated():
    m = _model()
    A = np.random.default_rng(1).normal(size=(5, 2))
    out = m.shape(A)
    assert out.shape == (5, m.n_vertices, 3)
    for i in range(5):
        np.testing.assert_allclose(out[i], m.shape(np.r_[A[i], 0, 0]), atol=1e-12)
    with pytest.raises(ValueError, match="model has 4"):
        m.shape(np.zeros(9))


def test_validation_names_the_problem():
    m = _model()
    with pytest.raises(ValueError, match="faces"):
        MorphableModel(m.mean, m.id_basis, m.exp_basis, np.array([[0, 1, 99]]))
    with pytest.raises(ValueError, match="id_basis"):
        MorphableModel(m.mean, m.id_basis[:3], m.exp_basis, m.faces)
    with pytest.raises(ValueError, match="landmark"):
        MorphableModel(m.mean, m.id_basis, m.exp_basis, m.faces, landmarks={1: 100})
    keys, verts = m.landmark_arrays()
    assert keys.tolist() == [31, 37] and verts.tolist() == [3, 5]
