"""geomfit.learned.identity: dlib's face-recognition ResNet read by our parser, run in torch, against dlib."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0)")

from geomfit.learned import identity as I  # noqa: E402

needs_model = pytest.mark.skipif(I.dlib_model_path() is None, reason="face_recognition_models not installed")


@pytest.fixture(scope="module")
def net():
    if I.dlib_model_path() is None:
        pytest.skip("face_recognition_models not installed")
    return I.FaceIdentity.from_dlib()


@pytest.fixture(scope="module")
def dlib_tools():
    dlib = pytest.importorskip("dlib", reason="dlib-bin not installed")
    if I.dlib_model_path() is None:
        pytest.skip("face_recognition_models not installed")
    d = I.dlib_model_path().parent
    return dict(dlib=dlib, rec=dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat")),
                sp=dlib.shape_predictor(str(d / "shape_predictor_68_face_landmarks.dat")),
                det=dlib.get_frontal_face_detector())


def _faces(tools, img, n=1):
    dets = sorted(tools["det"](img, 1), key=lambda r: -r.area())[:n]
    assert len(dets) == n, "face not detected"
    return [tools["sp"](img, d) for d in dets]


def _u8(path):
    from geomfit.photo import as_uint8_rgb, read_image

    return as_uint8_rgb(read_image(path))


@pytest.fixture(scope="module")
def photos(data, dlib_tools):
    """(name, uint8 image, dlib 68-point shape) of: the shared photo, both views of the james scan's atlas."""
    out = [("image_0010", _u8(data / "images" / "image_0010.png"))]
    james = _u8(data / "scans" / "james" / "james.jpg")
    res = [(n, im, s) for n, im in out for s in _faces(dlib_tools, im)]
    s1, s2 = sorted(_faces(dlib_tools, james, 2), key=lambda s: s.rect.left())
    res += [("james_view1", james, s1), ("james_view2", james, s2)]
    try:
        astro = _u8("skimage:astronaut")
        res.append(("astronaut", astro, _faces(dlib_tools, astro)[0]))
    except ImportError:
        pass
    return res


def _chip_tensor(chips):
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255.0


def test_descriptors_equal_dlib(net, dlib_tools, photos):
    chips = [dlib_tools["dlib"].get_face_chip(im, s) for _, im, s in photos]
    ref = np.array([np.array(dlib_tools["rec"].compute_face_descriptor(c)) for c in chips])
    with torch.no_grad():
        out = net(_chip_tensor(chips)).numpy()
    assert out.shape == (len(chips), 128)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
    # the same rule dlib documents: distance < 0.6 means the same person
    D = np.linalg.norm(out[:, None] - out[None], axis=-1)
    names = [n for n, _, _ in photos]
    j1, j2, p = names.index("james_view1"), names.index("james_view2"), names.index("image_0010")
    assert D[j1, j2] < 0.6 < min(D[j1, p], D[j2, p])
    if "astronaut" in names:
        a = names.index("astronaut")
        assert min(D[a, j1], D[a, j2], D[a, p]) > 0.6


def test_align_chip_matches_dlib(net, dlib_tools, photos):
    for name, im, s in photos:
        ref = dlib_tools["dlib"].get_face_chip(im, s)
        L = torch.tensor([[p.x, p.y] for p in s.parts()], dtype=torch.float64)
        img = torch.from_numpy(im).permute(2, 0, 1).double() / 255.0
        chip = I.align_chip(img, L)
        err = np.abs(chip.permute(1, 2, 0).numpy() * 255.0 - ref)
        with torch.no_grad():
            d = torch.linalg.norm(net(chip[None].float()) - net(_chip_tensor([ref])))
        if name == "astronaut":  # enlarged chip: dlib interpolates bilinearly without a pyramid
            assert err.mean() < 0.6
        else:  # shrunk chips: dlib low-passes through an image pyramid first, we do not
            assert err.mean() < 6.0
        assert float(d) < 0.15, name


def test_chip_transform_maps_template_points():
    """Landmarks placed exactly on dlib's template land on the template in the chip (identity map)."""
    tpl = I.DLIB_CHIP_TEMPLATE
    L = np.zeros((68, 2))
    L[17:] = (0.25 + tpl) / 1.5 * 150.0
    rng = np.random.default_rng(0)
    th, sc, t = 0.3, 2.5, np.array([40.0, -12.0])
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    Limg = L @ (sc * R).T + t  # the face at another pose and scale in the image
    T = I.chip_transform(torch.tensor(Limg)).numpy()
    back = Limg[17:] @ T[:, :2].T + T[:, 2]
    # dlib's chip rectangle maps [0, 150) onto the grid 0..149: a scale of 149/(150 - 1/s)
    s_img = 149.0 / (150.0 * sc - 1.0) * sc
    centre = np.array([75.0, 75.0])
    expect = (L[17:] - centre) * s_img + 74.5
    np.testing.assert_allclose(back, expect, atol=1e-9)
    assert rng is not None


def test_gradients_flow_and_match_fd(net):
    net64 = I.FaceIdentity(I.read_dlib_net()).double().eval()
    x = torch.rand(1, 3, 150, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = torch.randn(1, 3, 150, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    (net64(x)[0] @ w).backward()
    h = 1e-8  # small: ReLU and max-pool kinks crossed within +-h would bias the difference
    with torch.no_grad():
        fd = ((net64(x + h * d)[0] - net64(x - h * d)[0]) @ w) / (2 * h)
    an = (x.grad * d).sum()
    assert abs(float(an)) > 1e-3
    assert abs(float(an - fd)) < 1e-6 * abs(float(fd))
    emb, feats = net64.features(x.detach())
    assert len(feats) == 5 and feats[0].shape[1] == 32 and feats[-1].shape[1] == 256


def test_identity_loss_is_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(I.identity_loss(a, b), torch.tensor([1.0, 0.0]))


@needs_model
def test_bad_files(tmp_path):
    good = I.dlib_model_path().read_bytes()
    p = tmp_path / "cut.dat"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="end of file|cut.dat"):
        I.read_dlib_net(p)
    other = I.dlib_model_path().parent / "shape_predictor_5_face_landmarks.dat"
    with pytest.raises(ValueError, match="not a dlib face-recognition network"):
        I.read_dlib_net(other)
    with pytest.raises(FileNotFoundError):
        I.read_dlib_net(tmp_path / "missing.dat")


@needs_model
def test_bad_chips(net):
    with pytest.raises(ValueError, match=r"\(B, 3, 150, 150\)"):
        net(torch.zeros(1, 3, 100, 100))
    with pytest.raises(TypeError):
        net(np.zeros((1, 3, 150, 150)))
