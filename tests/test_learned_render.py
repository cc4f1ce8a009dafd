"""geomfit.learned.render: forward equals geomfit's rasteriser, gradients equal finite differences."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0)")

import geomfit  # noqa: E402
from geomfit.learned import reference_render, render  # noqa: E402


def _grid_mesh(n=6, size=16.0, seed=0):
    """A jittered, bumpy grid of 2 n^2 triangles filling most of a size x size image."""
    rng = np.random.default_rng(seed)
    u = np.linspace(2.0, size - 2.0, n + 1)
    X, Y = np.meshgrid(u, u)
    X = X + rng.uniform(-0.4, 0.4, X.shape)
    Y = Y + rng.uniform(-0.4, 0.4, Y.shape)
    Z = np.sin(X / 3.0) + np.cos(Y / 4.0)
    v = np.stack([X.ravel(), Y.ravel(), Z.ravel()], 1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f


def _two_layers():
    """Two overlapping grids at different depths: occlusion inside the image."""
    v1, f1 = _grid_mesh(5, 16.0, 1)
    v2, f2 = _grid_mesh(3, 12.0, 2)
    v2 = v2 + np.array([5.0, 3.0, 4.0])
    return np.concatenate([v1, v2]), np.concatenate([f1, f2 + len(v1)])


def test_forward_equals_geomfit_interpolate():
    v, f = _two_layers()
    attr = np.random.default_rng(3).normal(size=(len(v), 4))
    H, W = 18, 20
    ref = geomfit.interpolate(geomfit.rasterize(v, f, H, W), attr)
    img, mask = render(torch.tensor(v), f, torch.tensor(attr), (H, W))
    r = geomfit.rasterize(v, f, H, W)
    assert np.array_equal(mask.numpy(), r.mask)
    np.testing.assert_allclose(img.numpy(), ref, atol=1e-12)
    assert np.all(img.numpy()[~r.mask] == 0)


def test_batch_and_shared_attributes():
    v, f = _two_layers()
    attr = torch.tensor(np.random.default_rng(4).random((len(v), 3)))
    vb = torch.tensor(np.stack([v, v * [1.1, 0.9, 1.0] + [0.5, -0.3, 0.0]]))
    imgs, masks = render(vb, torch.tensor(f), attr, (18, 18))
    for b in range(2):
        one, m = render(vb[b], f, attr, (18, 18))
        assert torch.equal(imgs[b], one) and torch.equal(masks[b], m)
    # per-item attributes
    ab = torch.stack([attr, 2 * attr])
    imgs2, _ = render(vb, f, ab, (18, 18))
    torch.testing.assert_close(imgs2[1], 2 * imgs[1])


def _fd_check(v, f, attr, H, W, h=1e-6):
    rng = np.random.default_rng(7)
    wts = torch.tensor(rng.normal(size=(H, W, attr.shape[1])))
    vt = torch.tensor(v, requires_grad=True)
    at = torch.tensor(attr, requires_grad=True)
    img, mask = render(vt, f, at, (H, W))
    (img * wts).sum().backward()
    ids0 = geomfit.rasterize(v, f, H, W).triangle_id

    def loss(vv, aa):
        return float((render(torch.tensor(vv), f, torch.tensor(aa), (H, W))[0] * wts).sum())

    gv = np.zeros_like(v)
    for i in range(v.shape[0]):
        for k in range(3):
            vp, vm = v.copy(), v.copy()
            vp[i, k] += h
            vm[i, k] -= h
            # the check is for a fixed visible set: the perturbation must not move an edge across a pixel centre
            assert np.array_equal(geomfit.rasterize(vp, f, H, W).triangle_id, ids0)
            assert np.array_equal(geomfit.rasterize(vm, f, H, W).triangle_id, ids0)
            gv[i, k] = (loss(vp, attr) - loss(vm, attr)) / (2 * h)
    ga = np.zeros_like(attr)
    for i in range(attr.shape[0]):
        for k in range(attr.shape[1]):
            ap, am = attr.copy(), attr.copy()
            ap[i, k] += h
            am[i, k] -= h
            ga[i, k] = (loss(v, ap) - loss(v, am)) / (2 * h)
    return vt.grad.numpy(), gv, at.grad.numpy(), ga


def test_gradients_match_central_differences():
    v, f = _two_layers()
    attr = np.random.default_rng(5).normal(size=(len(v), 2))
    gv_auto, gv_fd, ga_auto, ga_fd = _fd_check(v, f, attr, 17, 17)
    scale = np.abs(gv_fd).max()
    assert scale > 1.0  # the check is not vacuous
    np.testing.assert_allclose(gv_auto, gv_fd, atol=1e-6 * scale)
    np.testing.assert_allclose(ga_auto, ga_fd, atol=1e-7)
    assert np.all(gv_auto[:, 2] == 0)  # depth only decides visibility
    assert np.abs(ga_auto).sum() > 0


def test_reference_renderer_agrees():
    v, f = _two_layers()
    attr = torch.tensor(np.random.default_rng(6).random((len(v), 3)))
    a, ma = render(torch.tensor(v), f, attr, (18, 18))
    b, mb = reference_render(torch.tensor(v), f, attr, (18, 18))
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_float32_and_empty_image():
    v, f = _grid_mesh(3)
    img, mask = render(torch.tensor(v, dtype=torch.float32), f, torch.ones(len(v), 1), (16, 16))
    assert img.dtype == torch.float32 and mask.any()
    far = torch.tensor(v + [100.0, 0.0, 0.0])  # entirely outside the image
    img, mask = render(far, f, torch.ones(len(v), 1, dtype=torch.float64), (16, 16))
    assert not mask.any() and float(img.abs().sum()) == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(vertices=np.zeros((3, 3))), "torch tensor"),
    (dict(vertices=torch.zeros(3, 2)), r"\(N, 3\)"),
    (dict(vertices=torch.full((3, 3), float("nan"))), "NaN"),
    (dict(faces=[[0, 1, 5]]), "faces index"),
    (dict(faces=[[0.0, 1.0, 2.0]]), "integers"),
    (dict(attributes=torch.zeros(4, 1)), "attributes must have shape"),
    (dict(image_size=(0, 4)), "image_size"),
])
def test_bad_input(bad, match):
    args = dict(vertices=torch.tensor([[1.0, 1.0, 0.0], [7.0, 1.0, 0.0], [1.0, 7.0, 0.0]]), faces=[[0, 1, 2]],
                attributes=torch.zeros(3, 1), image_size=(8, 8))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        render(**args)


@pytest.mark.cudasim
def test_cuda_kernel_ids_give_same_image():
    """geomfit's CUDA z-buffer (here Numba's simulator) gives the same image and gradients as the CPU one."""
    from geomfit import backend

    v, f = _two_layers()
    attr = np.random.default_rng(8).random((len(v), 3))
    vt = torch.tensor(v, requires_grad=True)
    b, mb = render(vt, f, torch.tensor(attr), (12, 12))
    b.sum().backward()
    g_cpu = vt.grad.clone()
    vt.grad = None
    with backend.force("cuda"):
        a, ma = render(vt, f, torch.tensor(attr), (12, 12))
    a.sum().backward()
    assert torch.equal(ma, mb)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(vt.grad, g_cpu, atol=1e-12, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with CuPy")
def test_cuda_tensors_match_cpu():
    pytest.importorskip("cupy")
    v, f = _two_layers()
    attr = torch.tensor(np.random.default_rng(9).random((len(v), 3)))
    a, ma = render(torch.tensor(v).cuda(), f, attr.cuda(), (18, 18))
    b, mb = render(torch.tensor(v), f, attr, (18, 18))
    assert torch.equal(ma.cpu(), mb)
    torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=0)


def test_imports_are_lazy():
    code = ("import sys, geomfit, geomfit.learned; assert 'torch' not in sys.modules, 'torch imported'; "
            "geomfit.learned.render; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
