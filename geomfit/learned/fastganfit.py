"""FastGANFit: a regression network from a face image to the fitting parameters, and GANFit++.

Gecer et al., "Fast-GANFIT: Generative Adversarial Network for High Fidelity 3D Face Reconstruction"
(IEEE TPAMI 2021), Sec. 4: a network ``N(I0)`` regresses shape, expression, camera and light (and the
texture latent) so that reconstruction takes one forward pass; GANFit++ starts the optimisation of
Sec. 3 from its output. Here the network is trained on a folder of photos with the results of
:func:`geomfit.learned.fit_photometric` (or :func:`geomfit.fit_landmarks`) as targets: no labels are
needed, the fits supervise the regressor. The image enters as a face chip aligned by the landmarks
(:func:`geomfit.learned.align_chip`), so the camera is regressed in the chip's frame and mapped back
to the photo with the chip's similarity transform.

Checkpoints (:meth:`FastGANFit.save` / :meth:`FastGANFit.load`) hold the weights, the sizes, the
target normalisation and the model's name.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_open
from ..camera import matrix_to_rodrigues
from .identity import _chip_to_image, align_chip
from .photometric import linear_to_srgb_torch, rodrigues

__all__ = ["FastGANFit", "train_fastganfit", "ganfit_plus_plus", "collect_targets"]

_D = np.diag([1.0, -1.0])


# ------------------------------------------------------------------------------------------------
# camera in the chip frame
# ------------------------------------------------------------------------------------------------
def _chip_similarity(L, size, padding=0.25):
    """(M, off) of image -> chip (``chip = M @ img + off``) from landmarks (68, 2), NumPy float64."""
    Mi, offi = _chip_to_image(torch.as_tensor(np.asarray(L, dtype=np.float64))[None], size, padding)
    Mi, offi = Mi[0].numpy(), offi[0].numpy()
    M = np.linalg.inv(Mi)
    return M, -M @ offi


def _rot_z(Q2):
    R = np.eye(3)
    R[:2, :2] = Q2
    return R


def to_chip_camera(R, s, t, h, M, off, size):
    """Image camera (LandmarkFit convention, image height h) -> the same projection in chip pixels."""
    c = np.sqrt(abs(np.linalg.det(M)))
    Q = _D @ (M / c) @ _D
    Rc = _rot_z(Q) @ R
    sc = c * s
    tc = _D @ (M @ _D @ t + M @ np.array([0.0, h]) + off - np.array([0.0, size]))
    return Rc, sc, tc


def from_chip_camera(Rc, sc, tc, h, M, off, size):
    """Inverse of :func:`to_chip_camera`."""
    c = np.sqrt(abs(np.linalg.det(M)))
    Q = _D @ (M / c) @ _D
    R = _rot_z(Q).T @ Rc
    s = sc / c
    t = _D @ np.linalg.solve(M, _D @ tc - M @ np.array([0.0, h]) - off + np.array([0.0, size]))
    return R, s, t


# ------------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------------
class FastGANFit(torch.nn.Module):
    """Regressor ``chip (B, 3, S, S) sRGB in [0, 1] -> fitting parameters`` (Fast-GANFIT Sec. 4).

    Output vector layout: identity (K), expression (E), camera in the chip frame (axis-angle 3,
    log scale 1, translation / S 2), SH light (27), texture latent (T, 0 without a texture GAN);
    trained on standardised targets (``target_mean``, ``target_std`` buffers).

    Parameters
    ----------
    n_id, n_exp : int
        Sizes of the morphable model's coefficient vectors to regress.
    n_latent : int
        Texture-latent size (0: per-vertex albedo, not regressed).
    chip_size : int
        Input chip side (aligned with :func:`geomfit.learned.align_chip`).
    width : int
        Channels of the first convolution (doubled at each of the five stride-2 stages, capped
        at 8x). The paper uses a ResNet-50; a small network trains on a CPU.
    model_name : str
        Name of the morphable model the parameters belong to (stored in checkpoints).
    """

    def __init__(self, n_id: int, n_exp: int, n_latent: int = 0, chip_size: int = 112, width: int = 16,
                 model_name: str = ""):
        super().__init__()
        self.config = dict(n_id=int(n_id), n_exp=int(n_exp), n_latent=int(n_latent), chip_size=int(chip_size),
                           width=int(width), model_name=str(model_name))
        self.n_out = int(n_id) + int(n_exp) + 6 + 27 + int(n_latent)
        layers, cin = [], 3
        for i in range(5):
            cout = width * min(2 ** i, 8)
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1), torch.nn.BatchNorm2d(cout),
                       torch.nn.ReLU(inplace=True)]
            cin = cout
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(cin, self.n_out)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.register_buffer("target_mean", torch.zeros(self.n_out))
        self.register_buffer("target_std", torch.ones(self.n_out))

    def forward(self, chips):
        """Standardised parameter vectors (B, n_out) of chips (B, 3, S, S)."""
        S = self.config["chip_size"]
        if not isinstance(chips, torch.Tensor) or chips.ndim != 4 or tuple(chips.shape[1:]) != (3, S, S):
            raise ValueError(f"FastGANFit: chips must be a tensor of shape (B, 3, {S}, {S}), got "
                             f"{tuple(getattr(chips, 'shape', ()))}")
        x = self.features(chips * 2.0 - 1.0).mean(dim=(2, 3))
        return self.head(x)

    def predict(self, chips):
        """De-standardised parameter vectors (B, n_out)."""
        return self(chips) * self.target_std + self.target_mean

    # -- parameter vectors ---------------------------------------------------------------------
    def split(self, p):
        """dict of ``id, exp, w, log_s, t, sh, latent`` from parameter vectors (..., n_out) (NumPy)."""
        c = self.config
        K, E, T = c["n_id"], c["n_exp"], c["n_latent"]
        p = np.asarray(p)
        o = {"id": p[..., :K], "exp": p[..., K:K + E], "w": p[..., K + E:K + E + 3],
             "log_s": p[..., K + E + 3], "t": p[..., K + E + 4:K + E + 6] * c["chip_size"],
             "sh": p[..., K + E + 6:K + E + 33].reshape(*p.shape[:-1], 9, 3), "latent": p[..., K + E + 33:K + E + 33 + T]}
        return o

    def join(self, id_coeffs, exp_coeffs, Rc, sc, tc, sh, latent=None):
        """Parameter vector from a fit expressed in the chip frame."""
        c = self.config
        lat = np.zeros(c["n_latent"]) if latent is None else np.asarray(latent).ravel()
        return np.concatenate([np.asarray(id_coeffs)[:c["n_id"]], np.asarray(exp_coeffs)[:c["n_exp"]], matrix_to_rodrigues(Rc),
                               [np.log(sc)], np.asarray(tc) / c["chip_size"], np.asarray(sh).ravel(), lat])

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path):
        """Write a checkpoint (weights, sizes, target normalisation) to ``path`` (written atomically)."""
        with atomic_open(pathlib.Path(os.fspath(path))) as fh:
            torch.save({"format": "geomfit.FastGANFit/1", "config": self.config, "state_dict": self.state_dict()}, fh)

    @classmethod
    def load(cls, path, map_location="cpu") -> "FastGANFit":
        """Read a checkpoint written by :meth:`save`.

        Raises
        ------
        FileNotFoundError, ValueError
            Missing file, or not a FastGANFit checkpoint.
        """
        path = pathlib.Path(os.fspath(path))
        if not path.is_file():
            raise FileNotFoundError(f"FastGANFit checkpoint not found: {path}")
        try:
            ck = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip error means "not a checkpoint"
            raise ValueError(f"{path}: not a FastGANFit checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ck, dict) or ck.get("format") != "geomfit.FastGANFit/1":
            raise ValueError(f"{path}: not a FastGANFit checkpoint (format {ck.get('format') if isinstance(ck, dict) else None!r})")
        net = cls(**ck["config"])
        net.load_state_dict(ck["state_dict"])
        return net.eval()


# ------------------------------------------------------------------------------------------------
# data: photos, landmarks, targets from fits
# ------------------------------------------------------------------------------------------------
_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _photos(folder):
    folder = pathlib.Path(os.fspath(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"train_fastganfit: photo folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXT)
    if not files:
        raise ValueError(f"train_fastganfit: no images ({', '.join(_EXT)}) in {folder}")
    return files


def _landmarks_for(path, img_u8, detector):
    pts = path.with_suffix(".pts")
    if pts.is_file():
        from geomfit.io import read_pts

        return read_pts(pts)
    from geomfit.landmarks import detect_landmarks

    return detect_landmarks(img_u8, detector=detector)


def _chip_of(img_lin, L, size):
    t = torch.as_tensor(img_lin, dtype=torch.float32)
    return align_chip(linear_to_srgb_torch(t).permute(2, 0, 1), torch.as_tensor(L, dtype=torch.float32), size=size)


def collect_targets(model, folder, *, fit: str = "photometric", chip_size: int = 112, detector: str = "auto",
                    fit_kwargs: Optional[dict] = None, verbose: bool = False):
    """Fit every photo of a folder and return ``(chips, targets, names)`` for training.

    Landmarks come from ``<photo>.pts`` beside each photo where present, else from
    :func:`geomfit.detect_landmarks`. ``fit='photometric'`` uses :func:`fit_photometric` (camera,
    shape, expression, light); ``'landmarks'`` uses :func:`geomfit.fit_landmarks` (fast; light
    targets are ambient).
    """
    from geomfit.fitting import fit_landmarks
    from geomfit.photo import as_uint8_rgb, read_image, srgb_to_linear

    from .photometric import fit_photometric

    if fit not in ("photometric", "landmarks"):
        raise ValueError(f"fit must be 'photometric' or 'landmarks', got {fit!r}")
    tmp = FastGANFit(model.n_id, model.n_exp, chip_size=chip_size)
    chips, targets, names = [], [], []
    for p in _photos(folder):
        srgb = read_image(p)
        img = srgb_to_linear(srgb)
        L = _landmarks_for(p, as_uint8_rgb(srgb), detector)
        h = img.shape[0]
        if fit == "photometric":
            r = fit_photometric(model, img, L, **(fit_kwargs or {}))
            sh = r.sh
        else:
            r = fit_landmarks(model, L, img.shape[:2], **(fit_kwargs or {}))
            sh = np.zeros((9, 3))
            sh[0] = 1.0 / 0.282095
        Lc = np.where(np.isfinite(L), L, np.nan)
        M, off = _chip_similarity(Lc, chip_size)
        Rc, sc, tc = to_chip_camera(np.asarray(r.rotation), float(r.scale), np.asarray(r.translation), h, M, off,
                                    chip_size)
        targets.append(tmp.join(r.id_coeffs, r.exp_coeffs, Rc, sc, tc, sh))
        with torch.no_grad():
            chips.append(_chip_of(img, Lc, chip_size))
        names.append(p.name)
        if verbose:
            print(f"collect_targets: {p.name} fitted")
    return torch.stack(chips), torch.as_tensor(np.stack(targets), dtype=torch.float32), names


def train_fastganfit(model, folder, *, epochs: int = 100, batch_size: int = 8, lr: float = 1e-3,
                     fit: str = "photometric", chip_size: int = 112, width: int = 16, checkpoint=None,
                     fit_kwargs: Optional[dict] = None, detector: str = "auto", seed: int = 0,
                     verbose: bool = False):
    """Train a :class:`FastGANFit` regressor on a folder of photos, with fits as the targets.

    Parameters
    ----------
    model : MorphableModel
    folder : path
        Photos (png/jpg/...), each with an optional ``.pts`` of 68 landmarks beside it (else the
        landmarks are detected).
    epochs, batch_size, lr : training schedule (Adam).
    fit : {'photometric', 'landmarks'}
        Which fit provides the targets (see :func:`collect_targets`).
    chip_size, width : network input size and width (:class:`FastGANFit`).
    checkpoint : path, optional
        Where to save the trained network (:meth:`FastGANFit.save`).
    fit_kwargs : dict, optional
        Passed to the fitting function.

    Returns
    -------
    (FastGANFit, dict)
        The trained network (eval mode) and a log: ``loss`` per epoch, ``names``, ``seconds``.

    Notes
    -----
    Gecer et al., Fast-GANFIT, TPAMI 2021, Sec. 4 trains the regressor end-to-end through the
    renderer with the fitting losses (Eq. 15). Here the regressor learns the fits' parameters
    (standardised mean squared error), which are the minimisers of those losses; the fits then
    start from its output in :func:`ganfit_plus_plus`.
    """
    torch.manual_seed(seed)
    chips, targets, names = collect_targets(model, folder, fit=fit, chip_size=chip_size, detector=detector,
                                            fit_kwargs=fit_kwargs, verbose=verbose)
    net = FastGANFit(model.n_id, model.n_exp, chip_size=chip_size, width=width, model_name=getattr(model, "name", ""))
    mean = targets.mean(0)
    std = targets.std(0, unbiased=False) if len(targets) > 1 else torch.ones_like(mean)
    net.target_mean.copy_(mean)
    net.target_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    z = (targets - net.target_mean) / net.target_std
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    log = {"loss": [], "names": names}
    t0 = time.perf_counter()
    n = len(chips)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for ep in range(int(epochs)):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2 and n >= 2:  # batch norm needs two samples
                idx = perm[max(0, i - 1):i + 1]
            opt.zero_grad(set_to_none=True)
            loss = ((net(chips[idx]) - z[idx]) ** 2).mean()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        log["loss"].append(tot / n)
        if verbose and (ep % 10 == 0 or ep == epochs - 1):
            print(f"train_fastganfit epoch {ep}: loss {tot / n:.5f}")
    log["seconds"] = time.perf_counter() - t0
    net.eval()
    if checkpoint is not None:
        net.save(checkpoint)
    return net, log


def regress(net: FastGANFit, model, image, landmarks):
    """Regressed parameters of one photo in its pixels: dict ``id, exp, rotation, scale, translation, sh``."""
    from geomfit.photo import as_float_rgb, srgb_to_linear

    img = np.asarray(image)
    img = srgb_to_linear(img / 255.0) if img.dtype == np.uint8 else as_float_rgb(img)
    L = np.asarray(landmarks, dtype=np.float64)
    S = net.config["chip_size"]
    with torch.no_grad():
        p = net.predict(_chip_of(img, L, S)[None])[0].numpy().astype(np.float64)
    o = net.split(p)
    M, off = _chip_similarity(L, S)
    Rc = rodrigues(torch.as_tensor(o["w"])).numpy()
    R, s, t = from_chip_camera(Rc, float(np.exp(o["log_s"])), o["t"], img.shape[0], M, off, S)
    return {"id": o["id"], "exp": o["exp"], "rotation": R, "scale": s, "translation": t, "sh": o["sh"]}


def ganfit_plus_plus(net: FastGANFit, model, image, landmarks, **fit_kwargs):
    """GANFit++: regress the parameters with FastGANFit, then :func:`fit_photometric` from there.

    Parameters
    ----------
    net : FastGANFit
    model : MorphableModel
        The model the network was trained for.
    image, landmarks : as :func:`geomfit.learned.fit_photometric`.
    **fit_kwargs
        Passed to :func:`fit_photometric` (e.g. ``iterations``: fewer are needed from a good start).

    Returns
    -------
    PhotometricFit
        ``landmark_fit`` holds the regressed start (a :class:`geomfit.LandmarkFit` built from it).

    References
    ----------
    Gecer et al., Fast-GANFIT, TPAMI 2021, Sec. 4 (GANFit++).
    """
    from geomfit.fitting import LandmarkFit

    from .photometric import fit_photometric

    if net.config["n_id"] > model.n_id or net.config["n_exp"] > model.n_exp:
        raise ValueError(f"ganfit_plus_plus: the network regresses {net.config['n_id']} identity and "
                         f"{net.config['n_exp']} expression coefficients, the model has {model.n_id} and {model.n_exp}")
    r = regress(net, model, image, landmarks)
    keys, vid = model.landmark_arrays()
    lv = np.full(68, -1, dtype=np.int64)
    lv[keys - 1] = vid
    idc = np.zeros(model.n_id)
    idc[:len(r["id"])] = r["id"]
    exc = np.zeros(model.n_exp)
    exc[:len(r["exp"])] = r["exp"]
    img = np.asarray(image)
    start = LandmarkFit(id_coeffs=idc, exp_coeffs=exc, rotation=r["rotation"], scale=float(r["scale"]),
                        translation=np.asarray(r["translation"]), rmse_px=np.nan, iterations=0, converged=False,
                        cost_history=np.zeros(0), landmark_vertices=lv, contour_vertices=np.full(16, -1),
                        image_size=np.array(img.shape[:2]), model=model)
    fit_kwargs.setdefault("sh_init", r["sh"])
    return fit_photometric(model, image, landmarks, landmark_fit=start, **fit_kwargs)
