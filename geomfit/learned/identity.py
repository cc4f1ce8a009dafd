"""Offline face identity network: dlib's face-recognition ResNet, read from its own file and run in torch.

Gecer et al., "Fast-GANFIT: Generative Adversarial Network for High Fidelity 3D Face Reconstruction"
(IEEE TPAMI 2021) use a face-recognition network for the identity loss (cosine distance of embeddings,
Eq. 4) and its intermediate activations for the content loss (Eq. 5). No pretrained identity network
installs offline here except dlib's 128-D metric-learning ResNet
(``dlib_face_recognition_resnet_model_v1.dat``, shipped by the ``face_recognition_models`` package).
This module reads that file with a parser of dlib's serialisation format written from dlib's
documented format (``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h``, ``loss.h``),
rebuilds the network in torch and makes it differentiable, together with a differentiable
alignment of a rendered face to dlib's 150x150 chip (:func:`align_chip`).

dlib's serialisation, as far as this file needs it
--------------------------------------------------
* integers: one control byte (bit 7: negative; low 4 bits: number ``n`` of bytes) then ``n``
  little-endian magnitude bytes; bools: one ASCII byte ``'0'``/``'1'``; strings: length then bytes;
* scalars ``float``/``double``: an integer mantissa then an integer exponent (``m * 2**e``; the
  exponents 32000/32001/32002 encode inf/-inf/NaN);
* tensors: version 2, then ``n, k, nr, nc`` and ``n*k*nr*nc`` little-endian float32;
* a network is written from the loss layer down: ``add_loss_layer`` (version, loss, subnet),
  ``add_layer`` (version, *subnet*, layer details, 3 bools, tensors), ``add_tag_layer`` and
  ``add_skip_layer`` (version, subnet), the bottom ``add_layer`` holds the input layer. Tag ids are
  types, not data: the layout of the chain below mirrors dlib's ``anet_type`` definition.
"""
from __future__ import annotations

import importlib.util
import io
import math
import os
import pathlib
import struct
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FaceIdentity", "read_dlib_net", "align_chip", "chip_transform", "dlib_model_path", "identity_loss",
           "DLIB_CHIP_TEMPLATE"]

_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_path() -> Optional[pathlib.Path]:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` from the ``face_recognition_models``
    package (located without importing it), or None where that package is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = pathlib.Path(loc) / "models" / _FILE
        if p.is_file():
            return p
    return None


# ------------------------------------------------------------------------------------------------
# dlib's serialisation primitives
# ------------------------------------------------------------------------------------------------
class DlibFormatError(ValueError):
    """The file is not a dlib network of the expected layout."""


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.b = data
        self.pos = 0
        self.name = name

    def _fail(self, what):
        raise DlibFormatError(f"{self.name}: {what} at byte {self.pos} (not a dlib face-recognition network?)")

    def take(self, n):
        if self.pos + n > len(self.b):
            self._fail(f"unexpected end of file reading {n} bytes")
        out = self.b[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self):
        c = self.take(1)[0]
        neg = bool(c & 0x80)
        n = c & 0x0F
        if n == 0 or n > 8 or (c & 0x70):
            self._fail(f"bad integer control byte 0x{c:02x}")
        v = int.from_bytes(self.take(n), "little")
        return -v if neg else v

    def bool(self):
        c = self.take(1)
        if c not in (b"0", b"1"):
            self._fail(f"bad bool byte {c!r}")
        return c == b"1"

    def str(self):
        n = self.int()
        if n < 0 or n > 1 << 20:
            self._fail(f"bad string length {n}")
        return self.take(n).decode("latin-1")

    def float(self):
        if self.b[self.pos] & 0x70:
            self._fail("old ASCII float format is not supported")
        m = self.int()
        e = self.int()
        if e == 32000:
            return math.inf
        if e == 32001:
            return -math.inf
        if e == 32002:
            return math.nan
        return math.ldexp(float(m), e)

    def tensor(self):
        v = self.int()
        if v != 2:
            self._fail(f"tensor version {v}, expected 2")
        n, k, nr, nc = self.int(), self.int(), self.int(), self.int()
        if min(n, k, nr, nc) < 0:
            self._fail(f"negative tensor size {(n, k, nr, nc)}")
        cnt = n * k * nr * nc
        arr = np.frombuffer(self.take(4 * cnt), dtype="<f4").astype(np.float32)
        return arr.reshape(n, k, nr, nc)

    def expect(self, *versions):
        s = self.str()
        if s not in versions:
            self._fail(f"found {s!r}, expected one of {versions}")
        return s


# ------------------------------------------------------------------------------------------------
# the layer chain of dlib's face-recognition ResNet (dlib/tools/python/src/face_recognition.cpp)
# ------------------------------------------------------------------------------------------------
def _block(stride):  # BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUB>>>>>, top to bottom
    return ["affine", "con", "relu", "affine", "con"]


def _ares():  # relu<add_prev1<block<N,affine,1,tag1<SUB>>>>
    return ["relu", ("add_prev", 1)] + _block(1) + [("tag", 1)]


def _ares_down():  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUB>>>>>>>>
    return ["relu", ("add_prev", 2), "avg_pool", ("skip", 1), ("tag", 2)] + _block(2) + [("tag", 1)]


def _chain():
    """Top-to-bottom list of the wrappers of ``anet_type``: computational layers by kind, tags and skips."""
    c = ["fc", "avg_pool"]  # fc_no_bias<128, avg_pool_everything<
    c += _ares_down()  # alevel0
    c += _ares() + _ares() + _ares_down()  # alevel1
    c += _ares() + _ares() + _ares_down()  # alevel2
    c += _ares() + _ares() + _ares() + _ares_down()  # alevel3
    c += _ares() + _ares() + _ares()  # alevel4
    c += ["max_pool", "relu", "affine", "con"]  # max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input
    return c


@dataclass
class DlibLayer:
    """One layer of a parsed dlib network (bottom-to-top order in :class:`DlibNet`)."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, tag, skip, fc
    tag: int = 0
    params: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    """A parsed dlib network: input normalisation, layers bottom to top, loss settings."""

    mean_rgb: tuple
    input_size: tuple
    layers: List[DlibLayer]
    loss: dict


def _read_details(r: _Reader, kind):
    if kind == "con":
        ver = r.expect("con_4", "con_5", "con_6")
        params = r.tensor()
        nf = r.int()
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        for _ in range(2):  # alias tensors of filters and biases: version + 4 dims each
            r.int(), r.int(), r.int(), r.int(), r.int()
        for _ in range(4):
            r.float()  # learning-rate and weight-decay multipliers
        use_bias = r.bool() if ver in ("con_5", "con_6") else True
        if ver == "con_6":
            r.bool()  # use_relu (fused relu; dlib never serialises it as true for this net)
        flat = params.reshape(-1)
        k = (flat.size - (nf if use_bias else 0)) // (nf * nr * nc)
        if k * nf * nr * nc + (nf if use_bias else 0) != flat.size:
            r._fail(f"con_ parameter count {flat.size} does not fit {nf} filters of {nr}x{nc}")
        w = flat[: nf * k * nr * nc].reshape(nf, k, nr, nc)
        b = flat[nf * k * nr * nc:] if use_bias else np.zeros(nf, np.float32)
        return {"weight": w, "bias": b, "stride": (sy, sx), "padding": (py, px)}
    if kind == "affine":
        ver = r.expect("affine_", "affine_2", "bn_con2")
        if ver == "bn_con2":  # a batch-norm layer stored in place of the affine layer: fold it
            params = r.tensor().reshape(-1)
            for _ in range(2):  # gamma, beta alias tensors
                r.int(), r.int(), r.int(), r.int(), r.int()
            r.tensor(), r.tensor()  # means, invstds of the last batch
            rm = r.tensor().reshape(-1)
            rv = r.tensor().reshape(-1)
            r.int(), r.int()  # num_updates, running_stats_window_size
            for _ in range(4):
                r.float()
            eps = r.float()
            k = params.size // 2
            g = params[:k] / np.sqrt(rv + eps)
            return {"gamma": g.astype(np.float32), "beta": (params[k:] - g * rm).astype(np.float32)}
        params = r.tensor().reshape(-1)
        for _ in range(2):
            r.int(), r.int(), r.int(), r.int(), r.int()
        mode = r.int()
        if mode != 0:  # CONV_MODE (0): one gamma/beta per channel
            r._fail(f"affine_ layer in mode {mode}, expected per-channel CONV_MODE (0)")
        if ver == "affine_2" and r.bool():
            return {"gamma": None, "beta": None}  # disabled: identity
        k = params.size // 2
        return {"gamma": params[:k], "beta": params[k:]}
    if kind == "relu":
        ver = r.expect("relu_", "relu_2")
        if ver == "relu_2" and r.bool():
            return {"disabled": True}
        return {}
    if kind in ("max_pool", "avg_pool"):
        r.expect(kind + "_2")
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return {"size": (nr, nc), "stride": (sy, sx), "padding": (py, px)}
    if kind == "add_prev":
        r.expect("add_prev_")
        return {}
    if kind == "fc":
        ver = r.expect("fc_2", "fc_3")
        n_out, n_in = r.int(), r.int()
        params = r.tensor().reshape(-1)
        for _ in range(2):
            r.int(), r.int(), r.int(), r.int(), r.int()
        bias_mode = r.int()  # 0: FC_HAS_BIAS, 1: FC_NO_BIAS
        for _ in range(4):
            r.float()
        use_bias = r.bool() if ver == "fc_3" else True
        has_bias = bias_mode == 0 and use_bias
        if params.size != n_in * n_out + (n_out if bias_mode == 0 else 0):
            r._fail(f"fc_ parameter count {params.size} does not fit {n_in}x{n_out}")
        w = params[: n_in * n_out].reshape(n_in, n_out)
        b = params[n_in * n_out:] if has_bias else np.zeros(n_out, np.float32)
        return {"weight": w, "bias": b}
    raise AssertionError(kind)


def read_dlib_net(path=None) -> DlibNet:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` (dlib's own serialisation) into arrays.

    Parameters
    ----------
    path : str or path-like, optional
        The ``.dat`` file; default: the copy shipped by ``face_recognition_models``.

    Returns
    -------
    DlibNet
        Input mean, input size, the layers bottom to top (kinds, tag ids, weights as float32
        arrays) and the loss settings.

    Raises
    ------
    FileNotFoundError
        No path given and ``face_recognition_models`` not installed, or the file is missing.
    DlibFormatError (a ValueError)
        The file is not dlib's face-recognition ResNet (wrong layer, version or size), or is
        truncated.
    """
    if path is None:
        path = dlib_model_path()
        if path is None:
            raise FileNotFoundError(f"{_FILE} not found: install face_recognition_models (pip install "
                                    "geomfit[landmarks]) or pass its path")
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"dlib network file not found: {path}")
    data = path.read_bytes()
    if data[:3] == b"BZh":
        import bz2

        data = bz2.decompress(data)
    r = _Reader(data, path.name)
    chain = _chain()
    if r.int() != 1:
        r._fail("add_loss_layer version is not 1")
    lver = r.expect("loss_metric_", "loss_metric_2")
    loss = {"margin": 0.1, "distance_threshold": 0.75}
    if lver == "loss_metric_2":
        loss = {"margin": r.float(), "distance_threshold": r.float()}
    layers: List[DlibLayer] = []
    inp = {}

    def parse(i):
        item = chain[i]
        if isinstance(item, tuple) and item[0] in ("tag", "skip"):
            v = r.int()
            if v != 1:
                r._fail(f"{item[0]} layer version {v}, expected 1")
            parse(i + 1)
            layers.append(DlibLayer(item[0], tag=item[1]))
            return
        kind, tag = (item, 0) if isinstance(item, str) else item
        v = r.int()
        bottom = i == len(chain) - 1
        if bottom:  # add_layer over the input layer
            if v not in (2, 3):
                r._fail(f"input add_layer version {v}")
            r.expect("input_rgb_image_sized")
            inp["mean"] = (r.float(), r.float(), r.float())
            inp["size"] = (r.int(), r.int())
        else:
            if v not in (1, 2):
                r._fail(f"add_layer version {v}")
            parse(i + 1)
        details = _read_details(r, kind)
        r.bool(), r.bool(), r.bool()
        r.tensor(), r.tensor()  # x_grad, cached_output
        if bottom:
            r.tensor()  # grad_final
            if v == 3:
                r.int()  # sample expansion factor
        elif v == 2:
            r.tensor()  # params_grad
        layers.append(DlibLayer(kind, tag=tag, params=details))

    parse(0)
    if r.pos != len(r.b):
        r._fail(f"{len(r.b) - r.pos} bytes left after the network")
    return DlibNet(mean_rgb=inp["mean"], input_size=inp["size"], layers=layers, loss=loss)


# ------------------------------------------------------------------------------------------------
# torch module
# ------------------------------------------------------------------------------------------------
def _add_padded(a, b):
    """dlib's ``add_prev``: sum of two tensors zero-padded (bottom/right, extra channels) to the larger."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

    def pad(t):
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return pad(a) + pad(b)


class FaceIdentity(torch.nn.Module):
    """dlib's 128-D face-recognition ResNet in torch: identity embeddings and content features.

    Build it with :meth:`from_dlib`. ``forward(chips)`` takes ``(B, 3, 150, 150)`` RGB chips in
    ``[0, 1]`` aligned as ``dlib.get_face_chip`` does (see :func:`align_chip`) and returns the
    ``(B, 128)`` descriptors of ``dlib.face_recognition_model_v1.compute_face_descriptor``
    (Euclidean distance < 0.6: same person by dlib's rule). Differentiable in the chips; the
    weights are buffers (not trained here).

    :meth:`features` also returns intermediate activations (the outputs of the residual levels),
    for the content loss of Gecer et al., Fast-GANFIT, TPAMI 2021, Eq. 5.
    """

    def __init__(self, net: DlibNet):
        super().__init__()
        self.input_size = tuple(net.input_size)
        self.register_buffer("mean_rgb", torch.tensor(net.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.loss = dict(net.loss)
        self._ops = []
        for i, L in enumerate(net.layers):
            p = {}
            for k, v in L.params.items():
                if isinstance(v, np.ndarray):
                    self.register_buffer(f"l{i}_{k}", torch.from_numpy(np.ascontiguousarray(v)))
                    p[k] = f"l{i}_{k}"
                else:
                    p[k] = v
            self._ops.append((L.kind, L.tag, p))
        # the outputs of the residual levels (after the relu that closes each down-sampling level)
        self._level_ends = self._find_levels()

    @classmethod
    def from_dlib(cls, path=None) -> "FaceIdentity":
        """Load ``dlib_face_recognition_resnet_model_v1.dat`` (default: from ``face_recognition_models``).

        Parameters
        ----------
        path : str or path-like, optional

        Returns
        -------
        FaceIdentity
            In eval mode, float32, on the CPU (``.to(device)`` moves it).

        Raises
        ------
        FileNotFoundError, ValueError
            See :func:`read_dlib_net`.
        """
        return cls(read_dlib_net(path)).eval()

    def _find_levels(self):
        ends = []
        n = len(self._ops)
        for i, (kind, _, _) in enumerate(self._ops):
            # a level ends before the next down-sampling block: the relu before a tag-1 whose block has stride 2
            if kind == "relu" and i + 1 < n and self._ops[i + 1][0] == "tag" and i > 0 and self._ops[i - 1][0] == "add_prev":
                j = i + 2  # the block's first conv
                if j < n and self._ops[j][0] == "con" and self._ops[j][2]["stride"] != (1, 1):
                    ends.append(i)
            if kind == "avg_pool" and self._ops[i][2]["size"] == (0, 0):
                ends.append(i - 1)
        return ends

    def _run(self, chips, keep=()):
        if not isinstance(chips, torch.Tensor):
            raise TypeError(f"FaceIdentity: chips must be a torch tensor, got {type(chips).__name__}")
        H, W = self.input_size
        if chips.ndim != 4 or chips.shape[1] != 3 or tuple(chips.shape[2:]) != (H, W):
            raise ValueError(f"FaceIdentity: chips must have shape (B, 3, {H}, {W}) (RGB in [0, 1]), got "
                             f"{tuple(chips.shape)}")
        x = (chips.to(self.mean_rgb.dtype) * 255.0 - self.mean_rgb) / 256.0
        tags = {}
        kept = []
        for i, (kind, tag, p) in enumerate(self._ops):
            g = lambda k: getattr(self, p[k])  # noqa: E731
            if kind == "con":
                x = F.conv2d(x, g("weight"), g("bias"), stride=p["stride"], padding=p["padding"])
            elif kind == "affine":
                if p["gamma"] is not None:
                    x = x * g("gamma").view(1, -1, 1, 1) + g("beta").view(1, -1, 1, 1)
            elif kind == "relu":
                if not p.get("disabled"):
                    x = F.relu(x)
            elif kind == "max_pool":
                x = F.max_pool2d(x, p["size"], p["stride"], p["padding"])
            elif kind == "avg_pool":
                if p["size"] == (0, 0):  # avg_pool_everything
                    x = x.mean(dim=(2, 3), keepdim=True)
                else:
                    x = F.avg_pool2d(x, p["size"], p["stride"], p["padding"], count_include_pad=False)
            elif kind == "tag":
                tags[tag] = x
            elif kind == "skip":
                x = tags[tag]
            elif kind == "add_prev":
                x = _add_padded(x, tags[tag])
            elif kind == "fc":
                x = x.flatten(1) @ g("weight") + g("bias")
            if i in keep:
                kept.append(x)
        return x, kept

    def forward(self, chips):
        """128-D descriptors of ``(B, 3, 150, 150)`` RGB chips in [0, 1] (dlib's values, not normalised)."""
        return self._run(chips)[0]

    def features(self, chips):
        """``(descriptors, [activations of each residual level, coarse to fine order of the network])``."""
        out, kept = self._run(chips, keep=set(self._level_ends))
        return out, kept


def identity_loss(emb_a, emb_b):
    """Cosine distance ``1 - cos(a, b)`` per row (Gecer et al., Fast-GANFIT, TPAMI 2021, Eq. 4)."""
    return 1.0 - F.cosine_similarity(emb_a, emb_b, dim=-1)


# ------------------------------------------------------------------------------------------------
# chip alignment (dlib.get_face_chip) - differentiable
# ------------------------------------------------------------------------------------------------
def _template68():
    # dlib's mean face shape of the 68-point model for indices 17..67 (51 points), in [0, 1] chip
    # coordinates before padding (get_face_chip_details); published constants of dlib.
    xs = [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
          0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
          0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
          0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
          0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
          0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
          0.553364, 0.490127, 0.42689]
    ys = [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
          0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
          0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
          0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
          0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
          0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
          0.784792, 0.824182, 0.831803, 0.824182]
    return np.stack([xs, ys], 1)


#: dlib's mean-face template for iBUG points 18..68 (0-based 17..67), chip units before padding.
DLIB_CHIP_TEMPLATE = _template68()


def _chip_points():
    """dlib's landmark subset for 68-point chips: indices 17..67 without eyebrows (17-26) and lower lip."""
    return [i for i in range(17, 68) if not (17 <= i <= 26 or 55 <= i <= 59 or 65 <= i <= 67)]


def _similarity(src, dst):
    """Least-squares similarity (Umeyama 1991) mapping src -> dst, batched (B, P, 2); returns (c*R, t)."""
    P = src.shape[1]
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - ms, dst - md
    var = (xs * xs).sum((1, 2)) / P
    cov = xd.transpose(1, 2) @ xs / P  # (B, 2, 2)
    U, S, Vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    e = torch.stack([torch.ones_like(d), d], 1)
    A = (U * e[:, None, :]) @ Vh * ((S * e).sum(1) / var)[:, None, None]
    t = md[:, 0] - (A @ ms[:, 0, :, None])[..., 0]
    return A, t


def _chip_to_image(L, size, padding):
    """dlib's chip -> image affine map (get_face_chip_details, chip_details, get_mapping_to_chip)."""
    idx = _chip_points()
    finite = torch.isfinite(L[:, idx]).all(-1).all(0).cpu().numpy()
    if not finite.all():  # missing points (NaN): the similarity from the others
        idx = [i for i, ok in zip(idx, finite) if ok]
        if len(idx) < 10:
            raise ValueError(f"chip alignment needs at least 10 of dlib's 32 chip landmarks, {len(idx)} are finite")
    src = L[:, idx]
    tpl = torch.as_tensor(DLIB_CHIP_TEMPLATE[np.array(idx) - 17], dtype=src.dtype, device=src.device)
    chip_pts = ((padding + tpl) / (2 * padding + 1) * size).expand_as(src)
    A, t = _similarity(chip_pts, src)  # chip -> image, least squares
    # dlib keeps the rotation and scale of A and re-centres: the chip's pixel grid 0..size-1 spans a
    # rectangle of side size*scale - 1 centred at A(size/2) + t
    scale = torch.linalg.norm(A[:, :, 0], dim=1)
    Rn = A / scale[:, None, None]
    centre = (A @ torch.full((2, 1), size / 2.0, dtype=A.dtype, device=A.device))[..., 0] + t
    s2 = (size * scale - 1.0) / (size - 1.0)
    M = Rn * s2[:, None, None]
    off = centre - (M @ torch.full((2, 1), (size - 1) / 2.0, dtype=A.dtype, device=A.device))[..., 0]
    return M, off


def chip_transform(landmarks, size: int = 150, padding: float = 0.25):
    """Affine map from image pixels to dlib's face chip, differentiable in the landmarks.

    Parameters
    ----------
    landmarks : torch.Tensor (68, 2) or (B, 68, 2)
        iBUG-68 points in pixels (x = column, y = row; pixel centres at integers, as dlib) of the
        image to crop; e.g. the projected landmark vertices of a fitted model (the "model-vertex
        equivalents" of dlib's points).
    size : int
        Chip side (150 for the identity network).
    padding : float
        dlib's padding (0.25 in ``dlib.get_face_chip``'s default).

    Returns
    -------
    torch.Tensor (2, 3) or (B, 2, 3)
        ``T`` with ``chip_xy = T[:, :2] @ image_xy + T[:, 2]``.

    Notes
    -----
    The construction of dlib's ``get_face_chip_details``: the least-squares similarity (Umeyama)
    between dlib's mean-face template and the 32 landmarks it uses (17..67 without eyebrows and
    lower lip), turned into dlib's ``chip_details`` rectangle and its three-corner mapping. Written
    in torch so that gradients flow into the landmarks.
    """
    L = landmarks
    if L.ndim not in (2, 3) or tuple(L.shape[-2:]) != (68, 2):
        raise ValueError(f"chip_transform: landmarks must have shape (68, 2) or (B, 68, 2), got {tuple(L.shape)}")
    single = L.ndim == 2
    L = L[None] if single else L
    if not L.is_floating_point():
        L = L.to(torch.float64)
    M, off = _chip_to_image(L, size, padding)
    Mi = torch.linalg.inv(M)
    T = torch.cat([Mi, -(Mi @ off[..., None])], 2)
    return T[0] if single else T


def align_chip(image, landmarks, size: int = 150, padding: float = 0.25):
    """Crop the face chip of dlib's ``get_face_chip`` differentiably (bilinear affine warp).

    Parameters
    ----------
    image : torch.Tensor (B, 3, H, W) or (3, H, W)
        RGB in [0, 1] (e.g. a rendered face composited on the photo).
    landmarks : torch.Tensor (68, 2) or (B, 68, 2)
        iBUG-68 points in pixels of ``image`` (see :func:`chip_transform`).
    size, padding : as :func:`chip_transform`.

    Returns
    -------
    torch.Tensor (B, 3, size, size) or (3, size, size)
        Differentiable in ``image`` and ``landmarks``. Bilinear sampling; dlib also uses bilinear
        interpolation, but low-passes (pyramid) first when shrinking by more than 2x, so chips of
        large images differ slightly.
    """
    single = image.ndim == 3
    img = image[None] if single else image
    L = landmarks if landmarks.ndim == 3 else landmarks[None]
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"align_chip: image must have shape (B, 3, H, W), got {tuple(image.shape)}")
    if L.shape[0] != img.shape[0]:
        L = L.expand(img.shape[0], -1, -1)
    chip = _sample_chip(img, _chip_grid(L, img.shape[-2:], img.dtype, img.device, size, padding))
    return chip[0] if single else chip


def _chip_grid(L, hw, dtype, device, size: int = 150, padding: float = 0.25):
    """The ``grid_sample`` grid (B, size, size, 2) of :func:`align_chip` for landmarks ``L`` (B, 68, 2)
    on images of size ``hw``: computed once where the landmarks do not change (it syncs with the GPU)."""
    M, off = _chip_to_image(L.to(torch.float64 if dtype == torch.float64 else torch.float32), size, padding)
    M, off = M.to(dtype), off.to(dtype)
    H, W = hw
    u = torch.arange(size, dtype=dtype, device=device)
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    q = torch.stack([uu, vv], -1).reshape(1, -1, 2)
    p = q @ M.transpose(1, 2) + off[:, None, :]  # (B, size*size, 2) image (x, y)
    gx = p[..., 0] / (W - 1) * 2 - 1
    gy = p[..., 1] / (H - 1) * 2 - 1
    return torch.stack([gx, gy], -1).reshape(-1, size, size, 2)


def _sample_chip(img, grid):
    """The chip of ``img`` (B, 3, H, W) at ``grid`` (from :func:`_chip_grid`), bilinear."""
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
