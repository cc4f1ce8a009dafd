"""Analysis-by-synthesis fitting of a morphable model to a photo through the differentiable renderer.

Gecer, Ploumpis, Kotsia and Zafeiriou, "Fast-GANFIT: Generative Adversarial Network for High Fidelity
3D Face Reconstruction" (IEEE TPAMI 2021), Sec. 3: shape and expression of a 3DMM (Eq. 2), a texture
(a GAN generator, Eq. 6, or here by default a per-vertex albedo with a smoothness prior), a camera and
spherical-harmonics light are optimised so that the rendered face (Eq. 7) matches the photo, with

* the pixel loss ``L_pix = |I0 - IR|_1`` (Eq. 11, mean over the rendered face),
* the landmark loss ``L_lan`` (Eq. 12) between the photo's landmarks and the projected model
  landmarks (normalised by the landmarks' RMS radius, as :func:`geomfit.fit_landmarks`),
* the identity loss ``L_id = 1 - cos(F(I0), F(IR))`` (Eq. 9) and content loss
  ``L_con = sum_j |F_j(I0) - F_j(IR)|_2 / (H_j W_j C_j)`` (Eq. 10) when an identity network
  (:class:`geomfit.learned.FaceIdentity`) is given,
* the priors ``Reg`` on shape, expression and light coefficients (Eq. 4/13),

minimised with Adam (the paper's solver) from the landmark fit (:func:`geomfit.fit_landmarks`, the
paper's "rough alignment" step). Several photos of one person share identity and texture (Eq. 14):
:func:`fit_photometric_multi`.

Image formation (geomfit's conventions)
---------------------------------------
Camera as :class:`geomfit.LandmarkFit`: ``x = s (R v)_x + t_x``, ``y_row = h - (s (R v)_y + t_y)``,
depth ``s (R v)_z`` (larger = closer). Lambertian shading with second-order SH irradiance
coefficients ``sh`` (9, 3) in geomfit's convention (:mod:`geomfit.sh`) evaluated at the rotated
vertex normals (camera frame, y up), colour ``albedo * shading`` per vertex, interpolated by
:func:`geomfit.learned.render`. Images are linear RGB; uint8 input is taken as sRGB and linearised.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..sh import SH_CONSTANTS
from .diffrender import render

__all__ = ["fit_photometric", "fit_photometric_multi", "PhotometricFit", "VertexAlbedo", "TorchModel"]

# geomfit.sh's constants (Ramamoorthi & Hanrahan), exactly: c0, c1, c2, c3, c4
_SH_C = tuple(float(c) for c in SH_CONSTANTS[[0, 1, 4, 6, 8]])


# ------------------------------------------------------------------------------------------------
# torch building blocks
# ------------------------------------------------------------------------------------------------
class TorchModel:
    """A :class:`geomfit.MorphableModel` as torch tensors (mean, bases, faces), for evaluation with grads."""

    def __init__(self, model, n_id=None, n_exp=None, dtype=torch.float32, device="cpu"):
        K = model.n_id if n_id is None else min(int(n_id), model.n_id)
        E = model.n_exp if n_exp is None else min(int(n_exp), model.n_exp)
        self.model = model
        self.mean = torch.as_tensor(np.asarray(model.mean), dtype=dtype, device=device)
        self.id_basis = torch.as_tensor(np.asarray(model.id_basis[:, :, :K]), dtype=dtype, device=device)
        self.exp_basis = torch.as_tensor(np.asarray(model.exp_basis[:, :, :E]), dtype=dtype, device=device)
        self.faces = torch.as_tensor(np.asarray(model.faces), dtype=torch.int64, device=device)
        self.n_id, self.n_exp = K, E

    def shape(self, id_coeffs, exp_coeffs):
        """Vertices ``(..., N, 3)`` for coefficients ``(..., K)`` and ``(..., E)`` (seed-model Eq. 2)."""
        v = self.mean + torch.einsum("nck,...k->...nc", self.id_basis, id_coeffs)
        if self.n_exp:
            v = v + torch.einsum("nck,...k->...nc", self.exp_basis, exp_coeffs)
        return v


def vertex_normals(v, faces):
    """Area-weighted unit vertex normals of ``v`` (..., N, 3) in torch."""
    a, b, c = v[..., faces[:, 0], :], v[..., faces[:, 1], :], v[..., faces[:, 2], :]
    fn = torch.cross(b - a, c - a, dim=-1)
    n = torch.zeros_like(v)
    for k in range(3):
        n = n.index_add(-2, faces[:, k], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sh_basis_torch(n, dim: int = -1):
    """geomfit's nine SH basis functions (:func:`geomfit.sh.sh_basis`) at unit normals ``n`` whose
    axis ``dim`` holds (x, y, z); the nine values replace that axis."""
    x, y, z = n.unbind(dim)
    c0, c1, c2, c3, c4 = _SH_C
    return torch.stack([torch.full_like(x, c0), c1 * y, c1 * z, c1 * x, c2 * x * y, c2 * y * z,
                        c3 * (3 * z * z - 1), c2 * x * z, c4 * (x * x - y * y)], dim)


def rodrigues(w):
    """Rotation matrices ``exp([w]_x)`` of axis-angle vectors ``w`` (..., 3)."""
    z = torch.zeros_like(w[..., 0])
    K = torch.stack([z, -w[..., 2], w[..., 1], w[..., 2], z, -w[..., 0], -w[..., 1], w[..., 0], z], -1)
    return torch.linalg.matrix_exp(K.reshape(*w.shape[:-1], 3, 3))


def linear_to_srgb_torch(x):
    """Linear RGB -> sRGB (IEC 61966-2-1), differentiable (clamped to [0, 1])."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8) ** (1 / 2.4) - 0.055)


def edge_list(faces, n_vertices):
    """Unique undirected edges (E, 2) of a triangle list (NumPy)."""
    f = np.asarray(faces)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.sort(e, 1)
    return np.unique(e, axis=0)


class VertexAlbedo(torch.nn.Module):
    """Default texture: a free per-vertex linear RGB albedo with a smoothness prior.

    ``prior()`` is ``sum_edges |a_i - a_j|^2 / n_edges`` (graph-Laplacian smoothness), which
    keeps the albedo from absorbing the shading that the geometry and the light must explain.
    """

    def __init__(self, init, faces):
        super().__init__()
        self.albedo = torch.nn.Parameter(torch.as_tensor(init).clone())
        e = edge_list(faces, init.shape[0])
        self.register_buffer("edges", torch.as_tensor(e, dtype=torch.int64))

    def forward(self):
        return self.albedo

    def prior(self):
        d = self.albedo[self.edges[:, 0]] - self.albedo[self.edges[:, 1]]
        return (d * d).sum() / self.edges.shape[0]


class _GANTexture(torch.nn.Module):
    """Wrap a user's texture generator ``G(z) -> (1, 3, Ht, Wt)`` UV map, sampled at the model's texcoords."""

    def __init__(self, generator, texcoords, latent_dim):
        super().__init__()
        self.generator = generator
        for p in generator.parameters():
            p.requires_grad_(False)
        self.latent = torch.nn.Parameter(torch.zeros(1, int(latent_dim)))
        uv = torch.as_tensor(np.asarray(texcoords), dtype=torch.float32)
        # texture coordinates (u right, v up, in [0, 1]) -> grid_sample's [-1, 1] with y down
        grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], -1)
        self.register_buffer("grid", grid.view(1, 1, -1, 2))

    def forward(self):
        tex = self.generator(self.latent)
        if tex.ndim != 4 or tex.shape[:2] != (1, 3):
            raise ValueError(f"fit_photometric: texture(latent) must return (1, 3, Ht, Wt), got {tuple(tex.shape)}")
        a = F.grid_sample(tex, self.grid.to(tex.dtype), mode="bilinear", align_corners=False)
        return a[0, :, 0].T  # (N, 3)

    def prior(self):
        return (self.latent * self.latent).mean()


# ------------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------------
@dataclass
class PhotometricFit:
    """Result of :func:`fit_photometric` (and, with a leading photo axis, :func:`fit_photometric_multi`).

    Attributes
    ----------
    id_coeffs : ndarray (K,)
        Identity coefficients (standard-deviation units), shared by all photos in the multi fit.
    exp_coeffs : ndarray (E,) or (P, E)
    rotation : ndarray (3, 3) or (P, 3, 3)
        Model to camera, :class:`geomfit.LandmarkFit`'s convention.
    scale : float or ndarray (P,)
        Pixels per model unit **in the input image's pixels**.
    translation : ndarray (2,) or (P, 2)
        ``(t_x, t_y)`` in input-image pixels, bottom-left origin (as ``LandmarkFit``).
    albedo : ndarray (N, 3)
        Per-vertex linear RGB albedo (from the texture module when one is given).
    sh : ndarray (9, 3) or (P, 9, 3)
        SH irradiance coefficients per colour channel (:mod:`geomfit.sh` convention).
    rendered : ndarray (h, w, 3) or (P, h, w, 3)
        Final rendering (linear RGB, the photo outside the face) at the working resolution.
    mask : ndarray of bool (h, w) or (P, h, w)
        Pixels covered by the face.
    loss_history : ndarray (T,)
        Total objective after each iteration.
    photometric_error : float or ndarray (P,)
        Mean absolute difference (linear RGB, over the mask) of the final rendering and the photo.
    landmark_fit : LandmarkFit
        The start point (:func:`geomfit.fit_landmarks`).
    working_scale : float
        Working resolution / input resolution.
    seconds : float
        Wall time of the optimisation (excluding the landmark fit).
    """

    id_coeffs: Any
    exp_coeffs: Any
    rotation: Any
    scale: Any
    translation: Any
    albedo: Any
    sh: Any
    rendered: Any
    mask: Any
    loss_history: Any
    photometric_error: Any
    landmark_fit: Any = None
    working_scale: float = 1.0
    seconds: float = 0.0
    losses: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False)

    @property
    def vertices(self):
        """Fitted shape(s) in model space, (N, 3) or (P, N, 3)."""
        idc, exc = self.id_coeffs, self.exp_coeffs
        if exc.ndim == 2:
            idc = np.broadcast_to(idc, (exc.shape[0], idc.shape[0]))
        return self.model.shape(idc, exc)


# ------------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------------
def _prep_image(image, max_side):
    from geomfit.photo import as_float_rgb, srgb_to_linear

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"fit_photometric: image must have shape (H, W, 3), got {img.shape}")
    if img.dtype == np.uint8:
        img = srgb_to_linear(img[..., :3] / 255.0)
    else:
        if img.dtype.kind not in "fiu":
            raise TypeError(f"fit_photometric: image must be numeric, got dtype {img.dtype}")
        img = as_float_rgb(img[..., :3], name="image")
        if not np.all(np.isfinite(img)):
            raise ValueError("fit_photometric: image contains NaN or infinite values")
    H, W = img.shape[:2]
    f = 1.0
    if max_side is not None and max(H, W) > max_side:
        import cv2

        f = max_side / max(H, W)
        w2, h2 = max(1, round(W * f)), max(1, round(H * f))
        img = cv2.resize(img, (w2, h2), interpolation=cv2.INTER_AREA)
        f = h2 / H  # exact row factor (the y flip uses the height)
    return img, f


def _prep_landmarks(landmarks, shape):
    L = np.asarray(landmarks, dtype=np.float64)
    if L.shape != (68, 2):
        raise ValueError(f"fit_photometric: landmarks must have shape (68, 2), got {L.shape}")
    return L


# ------------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------------
class _Scene:
    """Per-photo state of the optimisation (image, landmarks, camera, light)."""

    def __init__(self, img, L, lf_i, f, device, dtype, sh_init=None):
        self.h, self.w = img.shape[:2]
        self.photo = torch.as_tensor(img, dtype=dtype, device=device)
        Lw = L * f
        ok = np.all(np.isfinite(Lw), 1)
        self.lm_ok = torch.as_tensor(ok, device=device)
        self.lm = torch.as_tensor(np.where(ok[:, None], Lw, 0.0), dtype=dtype, device=device)
        c = Lw[ok].mean(0)
        self.lm_norm = float(np.sqrt(((Lw[ok] - c) ** 2).sum(1).mean()))
        self.R0 = torch.as_tensor(np.asarray(lf_i["rotation"]), dtype=dtype, device=device)
        self.w_rot = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
        self.log_s = torch.tensor(math.log(float(lf_i["scale"]) * f), dtype=dtype, device=device, requires_grad=True)
        self.t = torch.as_tensor(np.asarray(lf_i["translation"]) * f, dtype=dtype, device=device).clone().requires_grad_(True)
        self.exp = torch.as_tensor(np.asarray(lf_i["exp_coeffs"]), dtype=dtype, device=device).clone().requires_grad_(True)
        sh = torch.zeros(9, 3, dtype=dtype, device=device)
        sh[0] = 1.0 / _SH_C[0]
        if sh_init is not None:
            sh = torch.as_tensor(np.asarray(sh_init, dtype=np.float64).reshape(9, 3), dtype=dtype, device=device)
        self.sh = sh.clone().requires_grad_(True)
        self.lv = torch.as_tensor(np.asarray(lf_i["landmark_vertices"]), dtype=torch.int64, device=device)
        self.chip_T = None
        self.id_target = None

    def rotation(self):
        return rodrigues(self.w_rot) @ self.R0

    def screen(self, v):
        R = self.rotation()
        s = torch.exp(self.log_s)
        q = s * (v @ R.T)
        x = q[:, 0] + self.t[0]
        y = self.h - (q[:, 1] + self.t[1])
        return torch.stack([x, y, q[:, 2]], 1), R


def _fit(model, images, landmarks, lfs, *, texture, identity, n_id, n_exp, iterations, warmup, lr, w_pix, w_lan, w_id,
         w_con, w_shape, w_exp, w_light, w_albedo, max_side, fit_geometry, device, dtype, verbose):
    tm = TorchModel(model, n_id, n_exp, dtype=dtype, device=device)
    scenes = []
    fs = []
    for img, L, lf_i in zip(images, landmarks, lfs):
        im, f = _prep_image(img, max_side)
        scenes.append(_Scene(im, _prep_landmarks(L, im.shape), lf_i, f, device, dtype, lf_i.get("sh")))
        fs.append(f)
    idc = torch.as_tensor(np.asarray(lfs[0]["id_coeffs"])[:tm.n_id], dtype=dtype, device=device).clone()
    idc.requires_grad_(True)
    for sc in scenes:
        sc.exp = sc.exp.detach()[:tm.n_exp].clone().requires_grad_(True)

    # --- texture: GAN generator or per-vertex albedo initialised to the mean face colour
    if texture is not None:
        if model.texcoords is None or len(model.texcoords) != model.n_vertices:
            raise ValueError("fit_photometric: a texture module needs the model's per-vertex texcoords")
        latent_dim = getattr(texture, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("fit_photometric: the texture module must have an integer attribute latent_dim")
        tex = _GANTexture(texture, model.texcoords, latent_dim).to(device=device, dtype=dtype)
    else:
        with torch.no_grad():
            cols = []
            for sc in scenes:
                v = tm.shape(idc, sc.exp)
                scr, _ = sc.screen(v)
                _, m = render(scr, tm.faces, v[:, :1], (sc.h, sc.w))
                cols.append(sc.photo[m].median(0).values if m.any() else torch.full((3,), 0.5, dtype=dtype))
            base = torch.stack(cols).mean(0)
        tex = VertexAlbedo(base.expand(model.n_vertices, 3).to(dtype), model.faces).to(device)

    # --- identity targets (photo chips) once
    if identity is not None:
        identity = identity.to(device)
        for p in identity.parameters():
            p.requires_grad_(False)
        for sc, L, lf_i in zip(scenes, landmarks, lfs):
            Lc = np.asarray(L, dtype=np.float64).copy()
            proj = np.asarray(lf_i["projected_landmarks"])
            bad = ~np.all(np.isfinite(Lc), 1)
            Lc[bad] = proj[bad]
            f = sc.h / float(lf_i["image_size"][0])
            Lc = Lc * f
            sc.chip_L = torch.as_tensor(Lc, dtype=dtype, device=device)
            with torch.no_grad():
                sc.chip_grid = _chip_grid(sc.chip_L[None], (sc.h, sc.w), dtype, device)  # fixed landmarks: once
                sc.id_target, sc.con_target = identity.features(_chip(sc.photo, sc.chip_grid))

    params = [{"params": [tex.albedo] if isinstance(tex, VertexAlbedo) else [tex.latent], "lr": lr["albedo"]}]
    params.append({"params": [sc.sh for sc in scenes], "lr": lr["light"]})
    geometry = [idc] + [p for sc in scenes for p in (sc.exp, sc.w_rot, sc.log_s, sc.t)]
    if fit_geometry:
        params.append({"params": [idc], "lr": lr["shape"]})
        params.append({"params": [sc.exp for sc in scenes], "lr": lr["shape"]})
        params.append({"params": [sc.w_rot for sc in scenes], "lr": lr["rotation"]})
        params.append({"params": [sc.log_s for sc in scenes], "lr": lr["scale"]})
        params.append({"params": [sc.t for sc in scenes], "lr": lr["translation"]})
    opt = torch.optim.Adam(params)
    sh0 = scenes[0].sh.detach().clone()
    for sc in scenes:  # the landmarks that count, selected once (a boolean mask in the loop syncs with the GPU)
        ok = sc.lm_ok & (sc.lv >= 0)
        sc.lan_v, sc.lan_xy = sc.lv[ok], sc.lm[ok]
    # no host synchronisation per iteration for bookkeeping: losses stay 0-d device tensors until printed
    # or returned (float() on a CUDA tensor waits for the GPU)
    hist = []
    t0 = time.perf_counter()
    n_total = int(warmup) + int(iterations)

    def summed(parts_t):
        return {k: sum(float(x) for x in v) for k, v in parts_t.items()}

    for it in range(n_total + 1):
        final = it == n_total
        opt.zero_grad(set_to_none=True)
        albedo = tex()
        total = 0.0
        parts_t = {"pix": [], "lan": [], "id": [], "con": []}
        for sc in scenes:
            v = tm.shape(idc, sc.exp)
            scr, R = sc.screen(v)
            n = vertex_normals(v, tm.faces) @ R.T
            shading = sh_basis_torch(n) @ sc.sh  # (N, 3)
            col = albedo * shading
            img, m = render(scr, tm.faces, col, (sc.h, sc.w))
            diff = (img - sc.photo)[m].abs()  # the boolean mask syncs once; diff's size is then known on the host
            l_pix = diff.mean() if diff.numel() else img.sum() * 0
            l_lan = ((scr[sc.lan_v, :2] - sc.lan_xy) ** 2).sum(1).mean() / sc.lm_norm ** 2
            loss = w_pix * l_pix + w_lan * l_lan
            loss = loss + w_light * ((sc.sh - sh0) ** 2).sum() / 9.0
            loss = loss + w_exp * (sc.exp ** 2).sum() / max(1, tm.n_exp)
            if identity is not None and (w_id > 0 or w_con > 0):
                comp = torch.where(m[..., None], img, sc.photo)
                emb, feats = identity.features(_chip(comp, sc.chip_grid))
                l_id = (1.0 - F.cosine_similarity(emb, sc.id_target, dim=-1)).mean()
                l_con = sum((a - b).norm() / a.numel() for a, b in zip(feats, sc.con_target))
                loss = loss + w_id * l_id + w_con * l_con
                parts_t["id"].append(l_id.detach())
                parts_t["con"].append(l_con.detach())
            parts_t["pix"].append(l_pix.detach())
            parts_t["lan"].append(l_lan.detach())
            total = total + loss
            if final:
                sc.out_img, sc.out_mask = img.detach(), m
                sc.out_err = float(diff.detach().mean()) if diff.numel() else float("nan")
        total = total / len(scenes)
        total = total + w_shape * (idc ** 2).sum() / max(1, tm.n_id) + w_albedo * tex.prior()
        hist.append(total.detach())
        if verbose and (it % 50 == 0 or final):
            print(f"fit_photometric it {it}: total {float(hist[-1]):.5f} "
                  + " ".join(f"{k} {v:.4f}" for k, v in summed(parts_t).items()))
        if final:
            break
        total.backward()
        if it < int(warmup):  # texture and light first: geometry gradients against a flat albedo mislead
            for p in geometry:
                p.grad = None
        opt.step()
    parts = summed(parts_t)
    hist = torch.stack(hist).cpu().tolist()  # one transfer for the whole history
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        albedo = tex().detach().cpu().numpy().astype(np.float64)
    out = []
    for sc, f in zip(scenes, fs):
        R = sc.rotation().detach().cpu().numpy().astype(np.float64)
        out.append(dict(exp=sc.exp.detach().cpu().numpy().astype(np.float64), R=R,
                        s=float(torch.exp(sc.log_s.detach())) / f, t=sc.t.detach().cpu().numpy().astype(np.float64) / f,
                        sh=sc.sh.detach().cpu().numpy().astype(np.float64),
                        rendered=torch.where(sc.out_mask[..., None], sc.out_img, sc.photo).cpu().numpy(),
                        mask=sc.out_mask.cpu().numpy(), err=sc.out_err, f=f))
    idn = idc.detach().cpu().numpy().astype(np.float64)
    return idn, out, albedo, np.asarray(hist), seconds, parts


def _chip_grid(L, hw, dtype, device):
    """dlib's face-chip sampling grid for landmarks ``L`` (1, 68, 2) (:func:`geomfit.learned.identity.align_chip`)."""
    from .identity import _chip_grid as grid

    return grid(L.to(dtype), hw, dtype, device)


def _chip(img_hw3, grid):
    """The sRGB face chip (1, 3, 150, 150) of a linear image at a grid from :func:`_chip_grid`."""
    from .identity import _sample_chip

    return _sample_chip(linear_to_srgb_torch(img_hw3).permute(2, 0, 1)[None], grid)


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n is not None:
            if int(self.n) < 1:
                raise ValueError(f"num_threads must be >= 1, got {self.n}")
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


_DEFAULT_LR = {"albedo": 0.03, "light": 0.03, "shape": 0.02, "rotation": 0.002, "scale": 0.002, "translation": 0.2}


def _lf_dict(lf, i=None):
    pick = (lambda a: np.asarray(a)) if i is None else (lambda a: np.asarray(a)[i])
    proj = np.asarray(lf.projected) if i is None else np.asarray(lf.projected)[i]
    lv = pick(lf.landmark_vertices)
    P = np.full((68, 2), np.nan)
    P[lv >= 0] = proj[lv[lv >= 0]]
    return dict(id_coeffs=np.asarray(lf.id_coeffs), exp_coeffs=pick(lf.exp_coeffs), rotation=pick(lf.rotation),
                scale=pick(lf.scale), translation=pick(lf.translation), landmark_vertices=lv,
                image_size=pick(lf.image_size), projected_landmarks=P)


def fit_photometric(model, image, landmarks, *, texture=None, identity=None, n_id: Optional[int] = None,
                    n_exp: Optional[int] = None, iterations: int = 300, warmup: int = 100,
                    lr: Optional[dict] = None,
                    w_pix: float = 1.0, w_lan: float = 1.0, w_id: float = 0.2, w_con: float = 5.0,
                    w_shape: float = 1e-4, w_exp: float = 1e-3, w_light: float = 1e-3, w_albedo: float = 10.0,
                    max_side: Optional[int] = 256, fit_geometry: bool = True, landmark_fit=None,
                    sh_init=None, device: str = "cpu", dtype=torch.float32, num_threads: Optional[int] = None,
                    verbose: bool = False) -> PhotometricFit:
    """Fit shape, expression, pose, SH light and texture to a photo by analysis-by-synthesis.

    Parameters
    ----------
    model : MorphableModel
        With landmark mapping and contours (as for :func:`geomfit.fit_landmarks`).
    image : ndarray (H, W, 3)
        Linear RGB in [0, 1] (float), or uint8 taken as sRGB and linearised.
    landmarks : ndarray (68, 2)
        iBUG-68 points in pixels (top-left origin); NaN rows are missing (e.g. the jaw).
    texture : torch.nn.Module, optional
        A texture generator ``G(z) -> (1, 3, Ht, Wt)`` UV map in linear RGB with an integer
        attribute ``latent_dim`` (the GAN texture prior of the paper, Eq. 6; the user supplies it).
        The model's ``texcoords`` sample it per vertex; the latent starts at 0 with a prior
        ``|z|^2``. Default: a free per-vertex albedo with a smoothness prior (:class:`VertexAlbedo`)
        starting from the median colour of the face.
    identity : FaceIdentity, optional
        Identity network (e.g. ``FaceIdentity.from_dlib()``) for the identity (Eq. 9) and content
        (Eq. 10) losses between the photo's and the rendering's face chips.
    n_id, n_exp : int, optional
        Number of components (default all).
    iterations : int
        Adam iterations on all parameters (the paper's solver).
    warmup : int
        Adam iterations on light and texture alone before that (geometry held at the landmark
        fit): a flat initial albedo would otherwise push the geometry to explain its colours.
    lr : dict, optional
        Per-group learning rates overriding the defaults ``albedo 0.03, light 0.03, shape 0.02,
        rotation 0.002 (rad), scale 0.002 (log), translation 0.2 (px)``.
    w_pix, w_lan, w_id, w_con : float
        Weights of the pixel (Eq. 11), landmark (Eq. 12), identity (Eq. 9) and content (Eq. 10)
        losses. The landmark loss is normalised by the squared RMS landmark radius, the pixel
        loss is a mean over the face pixels. The paper's weights (2 and 50 for identity and
        content) belong to ArcFace and a texture GAN; with dlib's network and a free per-vertex
        albedo they let the albedo chase the identity network (on the shared photo: dlib distance
        of rendering and photo 0.42 -> 0.08, but pixel error 0.013 -> 0.043), hence 0.2 and 5
        (0.42 -> 0.10, pixel error 0.016).
    w_shape, w_exp, w_light : float
        Priors: mean squared identity/expression coefficients, squared deviation of the SH
        coefficients from an ambient light.
    w_albedo : float
        Weight of the texture prior (albedo smoothness, or the latent's norm).
    max_side : int or None
        The photo is resized (area interpolation) so that its longer side is at most this for
        the optimisation; results are returned in input-image pixels.
    fit_geometry : bool
        False keeps shape, expression and pose at the landmark fit and fits only light and
        texture (the photometric error of the landmark fit's geometry).
    landmark_fit : LandmarkFit, optional
        Start point; default ``fit_landmarks(model, landmarks, image.shape[:2])``.
    sh_init : ndarray (9, 3), optional
        Start light (default: ambient, shading 1).
    device, dtype
        Where and in which precision to optimise (``"cuda"`` renders with geomfit's CUDA kernel).
    num_threads : int, optional
        torch CPU threads during the fit (restored afterwards). The problem is small (a few
        thousand vertices, 256^2 pixels): on a busy machine one thread was 20x faster than two
        (32 ms against 670 ms per iteration at 128^2 under a load average of 12).
    verbose : bool

    Returns
    -------
    PhotometricFit

    Raises
    ------
    ValueError, TypeError
        Bad image or landmark shapes, non-finite pixels, a texture module without ``latent_dim``
        or a model without texcoords, too few landmarks (from :func:`geomfit.fit_landmarks`).

    Notes
    -----
    Gecer et al., "Fast-GANFIT", TPAMI 2021, Sec. 3 (Eqs. 7-13): rough alignment by the
    landmark fit, then all parameters together with Adam. Differences: geomfit's renderer
    gives no gradient at silhouettes (see :func:`geomfit.learned.render`); without a texture GAN
    the albedo is per-vertex with a smoothness prior; the identity network is dlib's ResNet
    rather than ArcFace; the random-pose identity term of Eq. 8 is not used.

    References
    ----------
    B. Gecer, S. Ploumpis, I. Kotsia, S. Zafeiriou. Fast-GANFIT: Generative Adversarial Network
    for High Fidelity 3D Face Reconstruction. IEEE TPAMI, 2021 (arXiv:2105.07474).
    """
    from geomfit.fitting import fit_landmarks

    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"fit_photometric: image must have shape (H, W, 3), got {img.shape}")
    L = _prep_landmarks(landmarks, img.shape)
    if landmark_fit is None:
        landmark_fit = fit_landmarks(model, L, img.shape[:2], n_id=n_id, n_exp=n_exp)
    lrs = dict(_DEFAULT_LR, **(lr or {}))
    start = _lf_dict(landmark_fit)
    if sh_init is not None:
        start["sh"] = sh_init
    with _threads(num_threads):
        idn, out, albedo, hist, seconds, parts = _fit(
            model, [img], [L], [start], texture=texture, identity=identity, n_id=n_id, n_exp=n_exp,
            iterations=iterations, warmup=warmup, lr=lrs, w_pix=w_pix, w_lan=w_lan, w_id=w_id, w_con=w_con, w_shape=w_shape,
            w_exp=w_exp, w_light=w_light, w_albedo=w_albedo, max_side=max_side, fit_geometry=fit_geometry,
            device=device, dtype=dtype, verbose=verbose)
    o = out[0]
    return PhotometricFit(id_coeffs=idn, exp_coeffs=o["exp"], rotation=o["R"], scale=o["s"], translation=o["t"],
                          albedo=albedo, sh=o["sh"], rendered=o["rendered"], mask=o["mask"], loss_history=hist,
                          photometric_error=o["err"], landmark_fit=landmark_fit, working_scale=o["f"],
                          seconds=seconds, losses=parts, model=model)


def fit_photometric_multi(model, images: Sequence, landmarks_list: Sequence, *, texture=None, identity=None,
                          n_id: Optional[int] = None, n_exp: Optional[int] = None, iterations: int = 300,
                          warmup: int = 100, lr: Optional[dict] = None, w_pix: float = 1.0, w_lan: float = 1.0, w_id: float = 0.2,
                          w_con: float = 5.0, w_shape: float = 1e-4, w_exp: float = 1e-3, w_light: float = 1e-3,
                          w_albedo: float = 10.0, max_side: Optional[int] = 256, fit_geometry: bool = True,
                          device: str = "cpu", dtype=torch.float32, num_threads: Optional[int] = None,
                          verbose: bool = False) -> PhotometricFit:
    """Fit several photos of one person with one shared identity and texture (Fast-GANFIT Eq. 14).

    Identity coefficients and the texture (per-vertex albedo or GAN latent) are shared; each
    photo has its own expression, pose and SH light. The objective is the mean over photos of
    :func:`fit_photometric`'s per-photo terms plus the shared priors. The start point is
    :func:`geomfit.fit_landmarks_multi` (shared identity from landmarks). Parameters as
    :func:`fit_photometric`; ``images`` and ``landmarks_list`` are sequences of equal length
    (photos may differ in size).

    Returns
    -------
    PhotometricFit
        ``id_coeffs`` (K,) and ``albedo`` (N, 3) shared; ``exp_coeffs`` (P, E), ``rotation``
        (P, 3, 3), ``scale`` (P,), ``translation`` (P, 2), ``sh`` (P, 9, 3),
        ``photometric_error`` (P,); ``rendered`` and ``mask`` are lists (sizes may differ).

    References
    ----------
    Gecer et al., "Fast-GANFIT", TPAMI 2021, Eq. 14 (multi-image fitting with shared identity).
    """
    from geomfit.fitting import fit_landmarks_multi

    if len(images) != len(landmarks_list) or len(images) == 0:
        raise ValueError(f"fit_photometric_multi: {len(images)} images but {len(landmarks_list)} landmark sets")
    imgs = [np.asarray(im) for im in images]
    for im in imgs:
        if im.ndim != 3:
            raise ValueError(f"fit_photometric_multi: every image must have shape (H, W, 3), got {im.shape}")
    Ls = [_prep_landmarks(L, im.shape) for L, im in zip(landmarks_list, imgs)]
    sizes = np.array([im.shape[:2] for im in imgs])
    lf = fit_landmarks_multi(model, np.stack(Ls), sizes, n_id=n_id, n_exp=n_exp)
    lrs = dict(_DEFAULT_LR, **(lr or {}))
    lfs = [_lf_dict(lf, i) for i in range(len(imgs))]
    for d in lfs:
        d["id_coeffs"] = np.asarray(lf.id_coeffs)
    with _threads(num_threads):
        idn, out, albedo, hist, seconds, parts = _fit(
            model, imgs, Ls, lfs, texture=texture, identity=identity, n_id=n_id, n_exp=n_exp, iterations=iterations, warmup=warmup,
            lr=lrs, w_pix=w_pix, w_lan=w_lan, w_id=w_id, w_con=w_con, w_shape=w_shape, w_exp=w_exp, w_light=w_light,
            w_albedo=w_albedo, max_side=max_side, fit_geometry=fit_geometry, device=device, dtype=dtype, verbose=verbose)
    return PhotometricFit(id_coeffs=idn, exp_coeffs=np.stack([o["exp"] for o in out]),
                          rotation=np.stack([o["R"] for o in out]), scale=np.array([o["s"] for o in out]),
                          translation=np.stack([o["t"] for o in out]), albedo=albedo,
                          sh=np.stack([o["sh"] for o in out]), rendered=[o["rendered"] for o in out],
                          mask=[o["mask"] for o in out], loss_history=hist,
                          photometric_error=np.array([o["err"] for o in out]), landmark_fit=lf,
                          working_scale=out[0]["f"], seconds=seconds, losses=parts, model=model)
