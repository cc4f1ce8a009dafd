import numpy as np
import pytest
import trimesh

from geomfit.camera import ScaledOrthographic, euler_to_matrix
from geomfit.encodings import encode_dae, encode_dce
from geomfit.render import render_depth

S, H = 30.0, 80


def tilted_plane(nrm):
    """A large square through the origin with unit normal ``nrm`` (counter-clockwise seen from it)."""
    nrm = np.asarray(nrm, float) / np.linalg.norm(nrm)
    a = np.cross(nrm, [0.0, 0.0, 1.0]) if abs(nrm[2]) < 0.9 else np.cross(nrm, [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(nrm, a)
    v = np.array([-a - b, a - b, a + b, -a + b]) * 5.0
    f = np.array([[0, 1, 2], [0, 2, 3]])
    if np.dot(np.cross(v[1] - v[0], v[2] - v[0]), nrm) < 0:
        f = f[:, ::-1]
    return v, f, nrm


@pytest.mark.parametrize("nrm", [[0.3, -0.4, 1.0], [-0.5, 0.2, 0.6]])
def test_plane_angles_and_depth(nrm):
    v, f, n = tilted_plane(nrm)
    cam = ScaledOrthographic(S, np.eye(3), [H / 2, H / 2])
    raw, mask = encode_dae(v, f, cam, H, raw=True, return_mask=True)
    assert mask.all()
    np.testing.assert_allclose(raw[..., 0], render_depth(v, f, cam, H, H), atol=1e-12)
    np.testing.assert_allclose(raw[..., 1], np.arctan2(n[1], n[0]), atol=1e-9)
    np.testing.assert_allclose(raw[..., 2], np.arccos(n[2]), atol=1e-9)
    img = encode_dae(v, f, cam, H)
    np.testing.assert_allclose(img[..., 1], 255 * (np.arctan2(n[1], n[0]) + np.pi) / (2 * np.pi), atol=1e-7)
    np.testing.assert_allclose(img[..., 2], 255 * np.arccos(n[2]) / np.pi, atol=1e-7)
    d = raw[..., 0]
    np.testing.assert_allclose(img[..., 0], 255 * (d - d.min()) / (d.max() - d.min()), atol=1e-9)
    # plane: zero curvature in the interior of the mesh, elevation channel shared with DAE
    dce = encode_dce(v, f, cam, H, raw=True)
    np.testing.assert_allclose(dce[..., 1], 0.0, atol=1e-9)
    np.testing.assert_allclose(dce[..., 2], raw[..., 2], atol=1e-12)


def test_rotated_camera_view_space_normals():
    v, f, n = tilted_plane([0.0, 0.0, 1.0])
    R = euler_to_matrix(0.4, -0.3, 0.2)
    cam = ScaledOrthographic(S, R, [H / 2, H / 2])
    raw = encode_dae(v, f, cam, H, raw=True)
    nv = R @ n
    m = np.isfinite(raw[..., 0])
    np.testing.assert_allclose(raw[m][:, 2], np.arccos(nv[2]), atol=1e-9)
    np.testing.assert_allclose(raw[m][:, 1], np.arctan2(nv[1], nv[0]), atol=1e-9)


def test_sphere_channels():
    r = 1.0
    m = trimesh.creation.icosphere(subdivisions=4, radius=r)
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    cam = ScaledOrthographic(S, np.eye(3), [H / 2, H / 2])
    raw, mask = encode_dce(v, f, cam, H, raw=True, return_mask=True)
    jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(H) + 0.5)
    x, y = (jj - H / 2) / S, (H - ii - H / 2) / S
    rho2 = x ** 2 + y ** 2
    inner = rho2 < 0.8 ** 2
    nz = np.sqrt(np.maximum(1 - rho2, 0))
    np.testing.assert_allclose(raw[..., 2][inner], np.arccos(nz[inner]), atol=0.02)
    np.testing.assert_allclose(raw[..., 1][mask], 1.0 / r, rtol=0.05)
    img = encode_dce(v, f, cam, H, curvature_range=(-2.0, 2.0), depth_range=(0.0, S * r))
    np.testing.assert_allclose(img[..., 1][mask], 255 * (1 / r + 2) / 4, atol=0.05 * 255 / 4)
    np.testing.assert_allclose(img[..., 0][inner], 255 * raw[..., 0][inner] / (S * r), atol=1e-9)
    assert (img[~mask] == 0).all()
    dae = encode_dae(v, f, cam, H, raw=True)
    sel = inner & (rho2 > 0.2 ** 2)
    np.testing.assert_allclose(np.cos(dae[..., 1][sel] - np.arctan2(y, x)[sel]), 1.0, atol=2e-3)
    assert np.isnan(dae[~mask]).all()


def test_bad_input():
    v, f, _ = tilted_plane([0, 0, 1])
    cam = ScaledOrthographic(S, np.eye(3), [H / 2, H / 2])
    with pytest.raises(ValueError, match="size"):
        encode_dae(v, f, cam, (0, 4))
    with pytest.raises(ValueError, match="cover"):
        encode_dae(v + [1000, 0, 0], f, cam, H)
    with pytest.raises(ValueError, match="range"):
        encode_dce(v, f, cam, H, curvature_range=(1.0, -1.0))
