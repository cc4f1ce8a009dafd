"""Triangle-mesh utilities: normals, adjacency, Laplacians, curvature, trimesh I/O, subdivision.

Meshes are plain arrays: ``vertices`` (N, 3) float (or a batch (B, N, 3)) and ``faces`` (F, 3) int.
Functions that produce per-vertex arrays work on NumPy or CuPy input (chosen by
:func:`geomfit.backend.get_array_module`); the sparse operators are SciPy CSR matrices (pass them
through ``geomfit.backend.sparse_module(xp)`` / ``cupyx`` yourself when a solver needs them on the
GPU).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp

from .backend import asnumpy, get_array_module, sparse_module, to_device

__all__ = [
    "vertex_normals",
    "face_normals",
    "vertex_adjacency",
    "uniform_laplacian",
    "cotangent_laplacian",
    "mass_matrix",
    "mean_curvature",
    "to_trimesh",
    "from_trimesh",
    "save_mesh",
    "subdivide",
    "Mesh",
    "displace_mesh",
]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _check_faces(faces, n: Optional[int] = None, name: str = "faces"):
    xp = get_array_module(faces)
    f = xp.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{name} must have shape (F, 3), got {tuple(f.shape)}")
    if not (f.dtype.kind in "iu"):
        if f.dtype.kind == "f" and f.size and bool(xp.all(f == xp.round(f))):
            f = f.astype(xp.int64)
        else:
            raise TypeError(f"{name} must be an integer array, got dtype {f.dtype}")
    if f.size:
        lo, hi = int(f.min()), int(f.max())
        if lo < 0:
            raise ValueError(f"{name} contains a negative vertex index ({lo})")
        if n is not None and hi >= n:
            raise ValueError(f"{name} refers to vertex {hi} but there are only {n} vertices")
    return f


def _check_vertices(vertices, batched: bool = False, name: str = "vertices"):
    xp = get_array_module(vertices)
    v = xp.asarray(vertices)
    ok = (v.ndim == 2 or (batched and v.ndim == 3)) and v.shape[-1] == 3
    if not ok:
        want = "(N, 3) or (B, N, 3)" if batched else "(N, 3)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {v.dtype}")
    v = v.astype(xp.float64, copy=False)
    if v.size and not bool(xp.all(xp.isfinite(v))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


# ----------------------------------------------------------------------------------------------
# normals
# ----------------------------------------------------------------------------------------------

def face_normals(vertices, faces, normalize: bool = True):
    """Per-face normals ``(v1 - v0) x (v2 - v0)`` (right-hand rule on the face's vertex order).

    Parameters
    ----------
    vertices : array, shape (N, 3) or (B, N, 3)
    faces : int array, shape (F, 3)
    normalize : bool
        Unit length when True (degenerate faces give 0); otherwise the length is twice the area.

    Returns
    -------
    array, shape (F, 3) or (B, F, 3), on the device of ``vertices``.
    """
    v = _check_vertices(vertices, batched=True)
    f = _check_faces(faces, v.shape[-2])
    xp = get_array_module(v)
    f = xp.asarray(f)
    v0, v1, v2 = v[..., f[:, 0], :], v[..., f[:, 1], :], v[..., f[:, 2], :]
    n = xp.cross(v1 - v0, v2 - v0)
    if normalize:
        ln = xp.linalg.norm(n, axis=-1, keepdims=True)
        n = n / xp.where(ln > 0, ln, 1.0)
    return n


def _incidence(faces, n: int, xp):
    """Sparse (N, F) vertex-face incidence matrix (ones) on the device ``xp``."""
    F = faces.shape[0]
    rows = faces.reshape(-1)
    cols = xp.repeat(xp.arange(F), 3)
    data = xp.ones(3 * F, dtype=xp.float64)
    return sparse_module(xp).csr_matrix((data, (rows, cols)), shape=(n, F))


def vertex_normals(vertices, faces):
    """Area-weighted unit vertex normals.

    Each vertex normal is the normalised sum of the (unnormalised) normals ``(v1-v0) x (v2-v0)``
    of its incident faces, i.e. face normals weighted by twice the face area.

    Parameters
    ----------
    vertices : array, shape (N, 3) or (B, N, 3)
        NumPy or CuPy; the result lives on the same device.
    faces : int array, shape (F, 3)
        Counter-clockwise faces (seen from outside) give outward normals.

    Returns
    -------
    array, shape like ``vertices``
        Unit normals; vertices not used by any face (or only by degenerate faces) get 0.

    Raises
    ------
    ValueError
        Wrong shapes, out-of-range face indices, non-finite vertices.
    """
    v = _check_vertices(vertices, batched=True)
    N = v.shape[-2]
    f = _check_faces(faces, N)
    xp = get_array_module(v)
    f = xp.asarray(f)
    fn = face_normals(v, f, normalize=False)  # (..., F, 3)
    M = _incidence(f, N, xp)
    if v.ndim == 2:
        acc = M @ fn
    else:  # (B, F, 3) -> (F, B*3): one sparse product for the whole batch
        B = v.shape[0]
        acc = (M @ fn.transpose(1, 0, 2).reshape(f.shape[0], B * 3)).reshape(N, B, 3).transpose(1, 0, 2)
    acc = xp.asarray(acc)
    ln = xp.linalg.norm(acc, axis=-1, keepdims=True)
    return acc / xp.where(ln > 0, ln, 1.0)


# ----------------------------------------------------------------------------------------------
# adjacency and Laplacians
# ----------------------------------------------------------------------------------------------

def vertex_adjacency(faces, n: Optional[int] = None) -> sp.csr_matrix:
    """1-ring adjacency of a triangle mesh as a symmetric SciPy CSR pattern.

    Parameters
    ----------
    faces : int array, shape (F, 3)
    n : int, optional
        Number of vertices (default ``faces.max() + 1``); isolated vertices get empty rows.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, n), dtype float64
        ``A[i, j] = 1`` iff ``i != j`` share an edge; zero diagonal, sorted indices.
    """
    f = np.asarray(asnumpy(_check_faces(faces, n)), dtype=np.int64)
    if n is None:
        n = int(f.max()) + 1 if f.size else 0
    i = f[:, [0, 1, 2, 1, 2, 0]].reshape(-1)
    j = f[:, [1, 2, 0, 0, 1, 2]].reshape(-1)
    keep = i != j
    A = sp.csr_matrix((np.ones(int(keep.sum())), (i[keep], j[keep])), shape=(n, n))
    A.data[:] = 1.0  # duplicates (edges shared by two faces) summed to 2: reset to a pattern
    A.sort_indices()
    return A


def uniform_laplacian(faces, n: Optional[int] = None) -> sp.csr_matrix:
    """Uniform (umbrella) Laplacian ``L = I - D^-1 A`` of Jin et al. 2021, Eq. (2).

    ``L(v_i) = v_i - sum_j w_ij v_j`` over the ``N_i`` 1-ring neighbours with ``w_ij = 1 / N_i``.

    Parameters
    ----------
    faces : int array, shape (F, 3)
    n : int, optional
        Number of vertices (default ``faces.max() + 1``).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, n)
        Rows sum to zero; an isolated vertex gets the identity row.

    References
    ----------
    Jin et al., "High-fidelity 3D face reconstruction with multi-scale details", Pattern
    Recognition Letters 2021, Eq. (2); Sorkine et al., "Laplacian surface editing", 2004.
    """
    A = vertex_adjacency(faces, n)
    deg = np.asarray(A.sum(axis=1)).ravel()
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    L = sp.identity(A.shape[0], format="csr") - sp.diags(inv) @ A
    L = sp.csr_matrix(L)
    L.sort_indices()
    return L


def _cotangents(v, f):
    """Cotangent of the angle at each corner of each face, (F, 3); corner k is opposite edge k."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    out = np.empty((f.shape[0], 3))
    for k, (p, q, r) in enumerate(((a, b, c), (b, c, a), (c, a, b))):
        e1, e2 = q - p, r - p
        cr = np.linalg.norm(np.cross(e1, e2), axis=1)
        dot = np.einsum("ij,ij->i", e1, e2)
        out[:, k] = np.divide(dot, cr, out=np.zeros_like(dot), where=cr > 0)
    return out


def cotangent_laplacian(vertices, faces) -> sp.csr_matrix:
    """Cotangent Laplacian (libigl's ``cotmatrix`` convention: negative semi-definite).

    ``L[i, j] = (cot a_ij + cot b_ij) / 2`` for an edge (i, j) with opposite angles ``a_ij, b_ij``,
    ``L[i, i] = -sum_j L[i, j]``. Then ``M^-1 L x`` approximates the Laplace-Beltrami operator of
    the coordinate functions (``M``: :func:`mass_matrix`), which is zero for affine functions at
    interior vertices of a planar mesh.

    Parameters
    ----------
    vertices : array, shape (N, 3)
    faces : int array, shape (F, 3)

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, N), symmetric.

    References
    ----------
    Pinkall & Polthier 1993; Meyer et al., "Discrete differential-geometry operators", 2003.
    """
    v = np.asarray(asnumpy(_check_vertices(vertices)))
    f = np.asarray(asnumpy(_check_faces(faces, v.shape[0])), dtype=np.int64)
    n = v.shape[0]
    cot = _cotangents(v, f)  # corner k opposite edge (k+1, k+2)
    i = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    j = np.concatenate([f[:, 2], f[:, 0], f[:, 1]])
    w = 0.5 * np.concatenate([cot[:, 0], cot[:, 1], cot[:, 2]])
    W = sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n))
    L = W - sp.diags(np.asarray(W.sum(axis=1)).ravel())
    L = sp.csr_matrix(L)
    L.sort_indices()
    return L


def mass_matrix(vertices, faces, kind: str = "voronoi") -> sp.dia_matrix:
    """Lumped (diagonal) mass matrix: the area attributed to each vertex.

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    kind : {"voronoi", "barycentric"}
        ``"voronoi"``: Meyer et al.'s mixed Voronoi areas (Voronoi region inside non-obtuse
        triangles; half / quarter of the area at the obtuse / other corners of obtuse ones).
        ``"barycentric"``: a third of each incident face's area.

    Returns
    -------
    scipy.sparse.dia_matrix, shape (N, N); the diagonal sums to the surface area.

    References
    ----------
    Meyer, Desbrun, Schroeder, Barr, "Discrete differential-geometry operators for triangulated
    2-manifolds", 2003, Section 3.3 (mixed area).
    """
    v = np.asarray(asnumpy(_check_vertices(vertices)))
    f = np.asarray(asnumpy(_check_faces(faces, v.shape[0])), dtype=np.int64)
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    if kind == "barycentric":
        per = np.repeat(area[:, None] / 3.0, 3, axis=1)
    elif kind == "voronoi":
        cot = _cotangents(v, f)  # corner k
        # squared length of the edge opposite corner k
        l2 = np.stack([((v[f[:, (k + 1) % 3]] - v[f[:, (k + 2) % 3]]) ** 2).sum(1) for k in range(3)], 1)
        per = np.empty_like(cot)
        for k in range(3):  # corner k touches edges opposite corners k+1 and k+2
            k1, k2 = (k + 1) % 3, (k + 2) % 3
            per[:, k] = (l2[:, k1] * cot[:, k1] + l2[:, k2] * cot[:, k2]) / 8.0
        obtuse = cot < 0  # cot < 0 <=> angle > 90 degrees
        any_obt = obtuse.any(1)
        per[any_obt] = np.where(obtuse[any_obt], area[any_obt, None] / 2.0, area[any_obt, None] / 4.0)
    else:
        raise ValueError(f"mass_matrix: kind must be 'voronoi' or 'barycentric', got {kind!r}")
    m = np.bincount(f.reshape(-1), weights=per.reshape(-1), minlength=v.shape[0])
    return sp.diags(m)


def mean_curvature(vertices, faces, normals=None):
    """Signed discrete mean curvature ``H = (k1 + k2) / 2`` per vertex.

    Uses ``M^-1 L x = -2 H n`` (cotangent Laplacian ``L``, mixed Voronoi mass ``M``, unit vertex
    normals ``n``): ``H = -<M^-1 L x, n> / 2``. Positive where the surface bends away from its
    normal, e.g. ``+1/r`` on a sphere with outward normals (counter-clockwise faces seen from
    outside).

    Parameters
    ----------
    vertices : array, shape (N, 3)
    faces : int array, shape (F, 3)
    normals : array, shape (N, 3), optional
        Vertex normals giving the sign (default :func:`vertex_normals`).

    Returns
    -------
    ndarray, shape (N,)
        In inverse model units. Vertices without area get 0. Boundary vertices are unreliable
        (the cotangent Laplacian is not a curvature estimate there).

    References
    ----------
    Meyer et al. 2003; Galteri et al. (CVIU 2019) use mean curvature as its second image
    channel.
    """
    xp = get_array_module(vertices)
    v = np.asarray(asnumpy(_check_vertices(vertices)))
    f = np.asarray(asnumpy(_check_faces(faces, v.shape[0])), dtype=np.int64)
    L = cotangent_laplacian(v, f)
    m = mass_matrix(v, f).diagonal()
    Lx = L @ v
    hn = np.divide(Lx, m[:, None], out=np.zeros_like(Lx), where=m[:, None] > 0)
    nrm = vertex_normals(v, f) if normals is None else np.asarray(asnumpy(normals), dtype=np.float64)
    if nrm.shape != v.shape:
        raise ValueError(f"normals must have shape {v.shape}, got {nrm.shape}")
    H = -0.5 * np.einsum("ij,ij->i", hn, nrm)
    return to_device(H, xp)


# ----------------------------------------------------------------------------------------------
# trimesh interop, export, subdivision
# ----------------------------------------------------------------------------------------------

def to_trimesh(vertices, faces, colors=None):
    """A ``trimesh.Trimesh`` with the given arrays, unprocessed (vertex order kept).

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    colors : array (N, 3) or (N, 4), optional
        Per-vertex colours, floats in [0, 1] or uint8.
    """
    import trimesh

    v = np.asarray(asnumpy(_check_vertices(vertices)))
    f = np.asarray(asnumpy(_check_faces(faces, v.shape[0])), dtype=np.int64)
    kw = {}
    if colors is not None:
        c = np.asarray(asnumpy(colors))
        if c.ndim != 2 or c.shape[0] != v.shape[0] or c.shape[1] not in (3, 4):
            raise ValueError(f"colors must have shape (N, 3) or (N, 4) with N={v.shape[0]}, got {c.shape}")
        if c.dtype.kind == "f":
            c = np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)
        kw["vertex_colors"] = c
    return trimesh.Trimesh(vertices=v, faces=f, process=False, **kw)


def from_trimesh(mesh) -> Tuple[np.ndarray, np.ndarray]:
    """``(vertices (N, 3) float64, faces (F, 3) int64)`` of a ``trimesh.Trimesh``."""
    if not hasattr(mesh, "vertices") or not hasattr(mesh, "faces"):
        raise TypeError(f"from_trimesh expects a trimesh.Trimesh, got {type(mesh).__name__}")
    return np.asarray(mesh.vertices, dtype=np.float64).copy(), np.asarray(mesh.faces, dtype=np.int64).copy()


def save_mesh(path, vertices, faces, colors=None) -> pathlib.Path:
    """Write a mesh as OBJ or PLY through trimesh, atomically (temporary file, then rename).

    Parameters
    ----------
    path : str or path-like
        Ends in ``.obj`` or ``.ply`` (case-insensitive).
    vertices, faces, colors :
        As in :func:`to_trimesh`.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    ValueError
        Unsupported extension or bad arrays.
    """
    path = pathlib.Path(path)
    ext = path.suffix.lower()
    if ext not in (".obj", ".ply"):
        raise ValueError(f"save_mesh: unsupported file type {path.suffix!r} for {path} (use .obj or .ply)")
    mesh = to_trimesh(vertices, faces, colors)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .atomic import write_bytes  # temp file beside it, umask-respecting mode, fsync, rename

    if ext == ".obj":
        data = mesh.export(file_type="obj", include_normals=False, include_texture=False)
    else:
        data = mesh.export(file_type="ply")
    write_bytes(path, data.encode() if isinstance(data, str) else data)
    return path


def subdivide(vertices, faces, iterations: int = 1):
    """Midpoint (1-to-4) subdivision, repeated ``iterations`` times; the surface is unchanged.

    New vertices (edge midpoints) are appended after the original ones, so original vertex
    indices (landmarks) stay valid. Face ``k`` becomes faces ``4k .. 4k+3``: each face ``(a, b, c)`` becomes ``(a, ab, ca)``,
    ``(ab, b, bc)``, ``(ca, bc, c)``, ``(ab, bc, ca)`` with the same orientation.

    Parameters
    ----------
    vertices : array (N, 3)
    faces : int array (F, 3)
    iterations : int >= 0

    Returns
    -------
    vertices (N', 3), faces (4**iterations * F, 3)
    """
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"subdivide: iterations must be a non-negative integer, got {iterations!r}")
    v = np.asarray(asnumpy(_check_vertices(vertices)))
    f = np.asarray(asnumpy(_check_faces(faces, v.shape[0])), dtype=np.int64)
    for _ in range(int(iterations)):
        uniq, _, f2 = _edge_split(f, v.shape[0])
        v = np.concatenate([v, 0.5 * (v[uniq[:, 0]] + v[uniq[:, 1]])])
        f = f2
    return v, f


def _edge_split(f, n):
    """The 1-to-4 split of faces ``f`` over ``n`` vertices: ``(edges, inverse, faces)``.

    ``edges`` (E, 2) are the unique edges (sorted pairs) in the order their new vertices ``n + k`` are
    appended; ``inverse`` (3F,) maps the face edges ``ab`` (all faces), then ``bc``, then ``ca`` to
    them; ``faces`` (4F, 3) are the children, those of face ``k`` at ``4k .. 4k+3``.
    """
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # (3F, 2): ab, bc, ca
    uniq, inv = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    F = f.shape[0]
    ab, bc, ca = (n + inv[:F]), (n + inv[F:2 * F]), (n + inv[2 * F:])
    a, b, c = f[:, 0], f[:, 1], f[:, 2]
    # children of a face are consecutive (keeps the input's spatial face order: cache-friendly
    # rasterisation)
    f2 = np.stack([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                   np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)], 1).reshape(-1, 3)
    return uniq, inv, f2


# ----------------------------------------------------------------------------------------------
# mesh object, displacement along the view
# ----------------------------------------------------------------------------------------------

@dataclass
class Mesh:
    """A triangle mesh in model space (model units, mm for the Surrey model)."""

    vertices: np.ndarray
    faces: np.ndarray

    def save(self, path, colors=None):
        """Write OBJ or PLY atomically (through :func:`geomfit.mesh.save_mesh`)."""
        return save_mesh(path, self.vertices, self.faces, colors)

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])


def _bilinear(img, x, y):
    """Sample (H, W) ``img`` at continuous pixel coords (x right, y down, centres at +0.5); NaN-aware."""
    h, w = img.shape
    fx = np.clip(x - 0.5, 0, w - 1)
    fy = np.clip(y - 0.5, 0, h - 1)
    x0 = np.floor(fx).astype(np.int64)
    y0 = np.floor(fy).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = fx - x0, fy - y0
    vals = np.stack([img[y0, x0], img[y0, x1], img[y1, x0], img[y1, x1]])
    wts = np.stack([(1 - ax) * (1 - ay), ax * (1 - ay), (1 - ax) * ay, ax * ay])
    ok = np.isfinite(vals)
    wts = np.where(ok, wts, 0.0)
    s = wts.sum(0)
    out = np.where(ok, vals, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 1e-9, (wts * out).sum(0) / s, np.nan)


def _phong_subdivide(v, f, alpha: float = 0.75):
    """One level of :func:`subdivide` whose new (edge) vertices lie on the Phong tessellation of
    the mesh instead of its flat faces (Boubekeur & Alexa, "Phong Tessellation", ACM Transactions on
    Graphics 27(5), 2008, Eq. 2 at the edge midpoint, shape factor ``alpha``): the midpoint ``m`` of
    edge ``ab`` moves to ``(1 - alpha) m + alpha (pi_a(m) + pi_b(m)) / 2``, ``pi_a`` the projection
    onto the tangent plane of ``a`` (vertex normal).  Original vertices are unchanged, planes stay
    planes, and a coarse curved mesh no longer shows its facets once it is finely subdivided."""
    nv = np.asarray(vertex_normals(v, f))
    uniq, _, f2 = _edge_split(f, v.shape[0])
    a, b = uniq[:, 0], uniq[:, 1]
    m = 0.5 * (v[a] + v[b])
    pa = m - ((m - v[a]) * nv[a]).sum(1, keepdims=True) * nv[a]
    pb = m - ((m - v[b]) * nv[b]).sum(1, keepdims=True) * nv[b]
    return np.concatenate([v, (1.0 - alpha) * m + alpha * 0.5 * (pa + pb)]), f2


def _loop_subdivide(v, f):
    """One level of Loop subdivision (C. Loop, "Smooth subdivision surfaces based on triangles",
    M.S. thesis, University of Utah, 1987), with the same connectivity as :func:`subdivide`.

    Interior edge points are ``3/8 (a + b) + 1/8 (c + d)`` (``c, d`` the vertices opposite the edge),
    boundary (and non-manifold) edge points the midpoint; an interior vertex of valence ``k`` moves to
    ``(1 - k beta) v + beta sum(neighbours)`` with Loop's ``beta = (5/8 - (3/8 + cos(2 pi / k) / 4)^2) / k``,
    a boundary vertex to ``3/4 v + 1/8 (b1 + b2)`` (its two boundary neighbours; the cubic B-spline
    rule).  The limit surface is C2 except at extraordinary vertices (C1 there), so a coarse mesh
    refined to pixel-sized edges shows neither facets nor the creases that Phong tessellation leaves
    along the original edges.  Loop is approximating: the original vertices move (by about the local
    curvature times the squared edge length), planes stay planes.
    """
    n = v.shape[0]
    uniq, inv, f2 = _edge_split(f, n)
    opp = np.concatenate([f[:, 2], f[:, 0], f[:, 1]])  # the vertex opposite each face edge ab, bc, ca
    cnt = np.bincount(inv, minlength=len(uniq))
    a, b = uniq[:, 0], uniq[:, 1]
    osum = np.zeros((len(uniq), 3))
    np.add.at(osum, inv, v[opp])
    interior_edge = cnt == 2
    ept = np.where(interior_edge[:, None], 0.375 * (v[a] + v[b]) + 0.125 * osum, 0.5 * (v[a] + v[b]))
    # vertex rule
    nsum = np.zeros((n, 3))
    np.add.at(nsum, a, v[b])
    np.add.at(nsum, b, v[a])
    k = np.bincount(np.concatenate([a, b]), minlength=n).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(k > 0, (0.625 - (0.375 + 0.25 * np.cos(2 * np.pi / np.maximum(k, 1))) ** 2) / k, 0.0)
    vnew = (1.0 - k * beta)[:, None] * v + beta[:, None] * nsum
    bd = ~interior_edge
    if bd.any():
        ba, bb = a[bd], b[bd]
        bsum = np.zeros((n, 3))
        np.add.at(bsum, ba, v[bb])
        np.add.at(bsum, bb, v[ba])
        bk = np.bincount(np.concatenate([ba, bb]), minlength=n)
        rim = bk == 2  # a regular boundary vertex (corner / non-manifold vertices stay put)
        vnew[rim] = 0.75 * v[rim] + 0.125 * bsum[rim]
        odd = bk > 0
        vnew[odd & ~rim] = v[odd & ~rim]
    used = np.zeros(n, bool)
    used[f.reshape(-1)] = True
    vnew[~used] = v[~used]
    return np.concatenate([vnew, ept]), f2


def subdivide_for_view(vertices, faces, camera, image_height, target_edge_px: float = 1.0,
                       max_subdivisions: int = 3, smooth="loop"):
    """Subdivide (1-to-4) until the median projected length of front-facing edges is at most
    ``target_edge_px`` (at most ``max_subdivisions`` levels).  ``smooth``: ``"loop"`` (or True,
    the default) Loop subdivision (:func:`_loop_subdivide`: a smooth limit surface; the original
    vertices move slightly), ``"phong"`` the new vertices on the Phong tessellation (Boubekeur &
    Alexa 2008; original vertices fixed, creases along the original edges remain), False flat
    midpoints.  The level chosen depends only on the inputs, so a depth rendered from this mesh and
    :func:`displace_mesh` with the same arguments see the same surface.

    Returns
    -------
    vertices (N', 3), faces (F', 3), level : int
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    schemes = {"loop": _loop_subdivide, True: _loop_subdivide, "phong": _phong_subdivide,
               False: lambda a, b: subdivide(a, b, 1)}
    if not any(smooth is k or (isinstance(smooth, str) and smooth == k) for k in schemes):
        raise ValueError(f"smooth must be 'loop', 'phong', True or False, got {smooth!r}")
    step = schemes[smooth]
    level = 0
    while level < max_subdivisions:
        scr = np.asarray(camera.to_screen(v, image_height))
        front = _front_facing(scr, f)
        e = scr[f[front]][:, [0, 1, 2, 0], :2]
        lens = np.linalg.norm(np.diff(e, axis=1), axis=-1)
        if lens.size == 0 or np.median(lens) <= target_edge_px:
            break
        v, f = step(v, f)
        level += 1
    return v, f, level


def displace_mesh(vertices, faces, camera, delta, image_height, target_edge_px: float = 1.0,
                  max_subdivisions: int = 3, visibility_tol: float = 1.0, smooth="loop", subdivided=None):
    """Carry a depth change map onto a mesh: subdivide, then move visible vertices along the view.

    Parameters
    ----------
    vertices : ndarray (N, 3)
        Model-space mesh (the medium mesh).
    faces : ndarray (F, 3)
    camera : ScaledOrthographic
        The camera the depth maps were rendered with.
    delta : ndarray (H, W)
        Refined depth minus the mesh's own rendered depth, pixels; 0 or NaN where there is no
        refinement.
    image_height : int
    target_edge_px : float
        Subdivide (1-to-4, scheme ``smooth``) until the median projected length of visible edges is at most
        this many pixels, so that one vertex samples about one pixel of detail.
    max_subdivisions : int
        Cap on the subdivision level (each level multiplies the face count by 4).
    visibility_tol : float
        A vertex is visible when its depth is within this many pixels of the z-buffer at its pixel.
    smooth : {"loop", "phong", True, False}
        The subdivision scheme (:func:`subdivide_for_view`): Loop (default; True means the same),
        new vertices on the Phong tessellation, or flat midpoints (False).  A coarse mesh subdivided
        to pixel-sized edges by midpoints shows its facets as a fine, even bumpiness, and Phong
        tessellation still shows creases along the original edges.  ``delta`` is applied on top.
    subdivided : tuple (vertices, faces, level), optional
        The result of :func:`subdivide_for_view` with the same arguments, when the caller already has
        it (the pipeline renders the medium depth from it); skips subdividing again.

    Returns
    -------
    vertices (N', 3), faces (F', 3), info : dict
        ``subdivisions`` (level used) and ``displaced`` (vertices moved).  The first N vertices
        are the input vertices (moved where visible; with Loop subdivision, also repositioned by its
        vertex rule).

    Notes
    -----
    A vertex ``v`` with depth ``d = s (R v)_z`` moves to ``v + (delta / s) R^T e_z``, which
    changes its depth by exactly ``delta`` and leaves its image position unchanged.
    """
    from .render import rasterize

    H, W = delta.shape
    if subdivided is None:
        subdivided = subdivide_for_view(vertices, faces, camera, image_height, target_edge_px, max_subdivisions,
                                        smooth)
    v, f, level = subdivided
    scr = np.asarray(camera.to_screen(v, image_height))
    ras = rasterize(scr, f, H, W)
    zbuf = np.asarray(ras.depth)
    x, y, z = scr[:, 0], scr[:, 1], scr[:, 2]
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    zi = np.full(len(v), np.nan)
    zi[inside] = _bilinear(zbuf, x[inside], y[inside])
    visible = inside & np.isfinite(zi) & (z >= zi - visibility_tol)
    d = np.where(np.isfinite(delta), delta, 0.0)
    dv = np.zeros(len(v))
    dv[visible] = _bilinear(d, x[visible], y[visible])
    dv = np.nan_to_num(dv)
    R = np.asarray(camera.rotation, dtype=np.float64)
    s = float(np.asarray(camera.scale))
    out = v + (dv / s)[:, None] * R[2][None, :]
    return out, f, {"subdivisions": level, "displaced": int((np.abs(dv) > 0).sum()),
                    "visible": int(visible.sum())}


def _front_facing(scr, f):
    a, b, c = scr[f[:, 0], :2], scr[f[:, 1], :2], scr[f[:, 2], :2]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    return cross < 0  # counter-clockwise in y-up = clockwise in y-down rows
