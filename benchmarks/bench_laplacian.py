"""Benchmark: landmark-driven Laplacian deformation (Jin et al., "High-fidelity 3D face reconstruction
with multi-scale details", Pattern Recognition Letters 2021, Sec. 3.3, Eqs. 2-3) on a ~50k-vertex face.

The Surrey reference mesh (GEOMFIT_DATA/sfm/sfm_reference.obj, 845 vertices) is subdivided three
times by midpoints (trimesh) to 51,840 vertices; 1,000 random vertices are handles. Compared in the
same run, all solving the same normal equations (L^T L + W) V' = L^T L V + W mu:

* geomfit.LaplacianDeformer: CHOLMOD through geomfit.backend.factorize_spd, default layout and
  ``handles_last=True`` (handles eliminated last: a deform is one backward solve), plus a table of
  factor layouts / orderings (factorisation time, solve time, nnz of the factor);
* SciPy: ``scipy.sparse.linalg.factorized`` (SuperLU) of the same matrix;
* libigl: ``igl.min_quad_with_fixed_precompute`` / ``_solve`` (Eigen) on the same quadratic.

Also the cotangent bi-Laplacian energy (``energy="biharmonic"``, the robust medium stage's) against
SciPy ``factorized`` of the same matrix, and the pipeline's size (Surrey mesh, 3,448 vertices, 68 handles).

Timed: set-up (assembly + factorisation) + first solve; each further solve with new targets (3
right-hand sides); a batch of 16 target sets; a weight change of 10 handles by low-rank update vs
a refactorisation. Medians over repeats; results in benchmarks/results/laplacian.json.

Run: GEOMFIT_DATA=/path/to/data python benchmarks/bench_laplacian.py [--quick] [--out PATH]
(``--quick``: one repeat of everything, a check that the script runs; writes laplacian_quick.json.)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import numpy as np
import scipy
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from _harness import RESULTS, Timer, ratio, write_results  # noqa: E402  (sibling module)

from geomfit.laplacian import LaplacianDeformer, _laplacian  # noqa: E402
from geomfit.backend import factorize_spd  # noqa: E402

QUICK = False  # --quick: every median over one call (set by main)


def median_time(fn, repeats):
    """(median seconds, result of the last call) of ``repeats`` calls (the shared harness timer)."""
    t = Timer(1 if QUICK else repeats).run(fn)
    return t.median, t.result


def load_mesh():
    import trimesh

    data = os.environ.get("GEOMFIT_DATA")
    path = pathlib.Path(data or "") / "sfm" / "sfm_reference.obj"
    if not data or not path.is_file():
        sys.exit(f"bench_laplacian: {path} not found; set GEOMFIT_DATA to the data folder")
    m = trimesh.load(path, process=False)
    v, f = np.asarray(m.vertices, float), np.asarray(m.faces, np.int64)
    try:
        from geomfit.mesh import subdivide
        v, f = subdivide(v, f, iterations=3)
    except ImportError:
        for _ in range(3):
            v, f = trimesh.remesh.subdivide(v, f)
    return np.asarray(v, float), np.asarray(f, np.int64)


def time_deformer(make, targets, batch, rep_setup, rep_solve):
    """Median set-up + first solve of ``make()``, then further solves cycling through ``targets`` and a
    batch solve. Returns ``(setup_s, deformer, first_result, further_solve_s, batch_s)``."""
    def setup_first():
        d = make()
        return d, d.deform(targets[0])

    t_setup, (d, x0) = median_time(setup_first, rep_setup)
    k = [0]

    def further():
        k[0] = (k[0] + 1) % len(targets)
        return d.deform(targets[k[0]])

    t_solve, _ = median_time(further, rep_solve)
    t_batch, _ = median_time(lambda: d.deform(batch), 3)
    return t_setup, d, x0, t_solve, t_batch


def main():
    global QUICK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat of every timing (writes laplacian_quick.json)")
    ap.add_argument("--out", default=None, help="results path (default benchmarks/results/laplacian.json)")
    args = ap.parse_args()
    QUICK = args.quick
    v, f = load_mesh()
    n = len(v)
    rng = np.random.default_rng(0)
    m = 1000
    h = rng.choice(n, m, replace=False)
    w = rng.choice([0.6, 0.1], m)
    n_targets = 12
    targets = [v[h] + rng.normal(scale=2.0, size=(m, 3)) for _ in range(n_targets)]
    rep_setup, rep_solve = 3, 10
    res = {"mesh": {"vertices": n, "faces": len(f), "handles": m}, "machine": {
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}}

    # ---------------- geomfit --------------------------------------------------------------------
    def gf_setup_first():
        d = LaplacianDeformer(v, f, h, w)
        return d, d.deform(targets[0])

    _warm = LaplacianDeformer(v, f, h[:5], 0.6, handles_last=True)  # loads/compiles the Numba kernels once
    _warm.deform(v[h[:5]])
    del _warm
    t_gf_setup, (d, x_gf0) = median_time(gf_setup_first, rep_setup)
    # breakdown: assembly vs factorisation
    L = _laplacian(v, f, "uniform")
    W = sp.csc_matrix((w, (h, h)), shape=(n, n))
    t_asm, A = median_time(lambda: (L.T @ L + W).tocsc(), rep_setup)
    t_fac, _ = median_time(lambda: factorize_spd(A), rep_setup)
    k = [0]

    def gf_solve():
        k[0] = (k[0] + 1) % n_targets
        return d.deform(targets[k[0]])

    t_gf_solve, _ = median_time(gf_solve, rep_solve)
    batch = np.stack(targets[:16] if n_targets >= 16 else (targets * 2)[:16])
    t_gf_batch, xb = median_time(lambda: d.deform(batch), 3)
    # factor layouts, measured in the same run: the plain CHOLMOD factor of A (two triangular solves per
    # deform, the layout before this change) vs the handles eliminated last (one backward solve)
    variants = {}
    for name, kw in (("plain_default", dict()), ("plain_metis", dict(ordering="metis")),
                     ("handles_last_default", dict(handles_last=True)),
                     ("handles_last_metis", dict(ordering="metis", handles_last=True)),
                     ("handles_last_nesdis", dict(ordering="nesdis", handles_last=True))):
        last = h if kw.get("handles_last") else None
        t_f, _ = median_time(lambda: factorize_spd(A, ordering=kw.get("ordering"), last=last), rep_setup)
        dv = LaplacianDeformer(v, f, h, w, **kw)
        dv.deform(targets[0])
        t_s, _ = median_time(lambda: dv.deform(targets[1]), rep_solve)
        fac = dv.factor._f
        variants[name] = {"factorisation_s": t_f, "further_solve_s": t_s,
                          "factor_nnz": int(fac.L().nnz)}  # L() last: it converts the factor in place
        del dv, fac
    res["geomfit_factor_layouts"] = variants

    res["geomfit"] = {"factor_method": d.factor.method, "handles_last": d.factor.last is not None,
                      "ordering": d.factor.ordering, "setup_plus_first_solve_s": t_gf_setup,
                      "assembly_LtL_plus_W_s": t_asm, "factorisation_s": t_fac,
                      "further_solve_s": t_gf_solve, "batch16_solve_s": t_gf_batch,
                      "batch16_per_target_s": t_gf_batch / 16}

    # the solve-many layout (handles eliminated last), same targets, same run
    t_gfl_setup, dl, x_gfl0, t_gfl_solve, t_gfl_batch = time_deformer(
        lambda: LaplacianDeformer(v, f, h, w, handles_last=True), targets, batch, rep_setup, rep_solve)
    t_gfl_fac, _ = median_time(lambda: factorize_spd(A, last=h), rep_setup)
    res["geomfit_handles_last"] = {"setup_plus_first_solve_s": t_gfl_setup, "factorisation_s": t_gfl_fac,
                                   "further_solve_s": t_gfl_solve, "batch16_solve_s": t_gfl_batch,
                                   "batch16_per_target_s": t_gfl_batch / 16,
                                   "rel_diff_vs_default": float(np.linalg.norm(x_gfl0 - x_gf0)
                                                                / np.linalg.norm(x_gf0))}
    del dl

    # low-rank update of 10 handle weights vs refactorisation
    idx = np.arange(10)
    new_up = d.handle_weights[idx] * 3.0
    t_upd, _ = median_time(lambda: d.set_weights(idx, new_up if d.handle_weights[0] != new_up[0]
                                                 else new_up / 3.0), 4)
    w_now = d.handle_weights.copy()
    t_refac, _ = median_time(lambda: LaplacianDeformer(v, f, h, w_now), 3)
    x_upd = d.deform(targets[1])
    x_ref = LaplacianDeformer(v, f, h, w_now).deform(targets[1])
    res["weight_update"] = {"handles_changed": 10, "low_rank_update_s": t_upd, "refactor_setup_s": t_refac,
                            "speedup": ratio(t_refac, t_upd),
                            "max_abs_diff_vs_refactor": float(np.abs(x_upd - x_ref).max())}
    d.set_weights(np.arange(m), w)  # back to the benchmark weights

    # ---------------- SciPy SuperLU ----------------------------------------------------------------
    def rhs(mu):
        b = L.T @ (L @ v)
        b[h] += w[:, None] * mu
        return b

    def scipy_setup_first():
        Ls = _laplacian(v, f, "uniform")
        As = (Ls.T @ Ls + sp.csc_matrix((w, (h, h)), shape=(n, n))).tocsc()
        solve = spla.factorized(As)
        return solve, solve(rhs(targets[0]))

    t_sp_setup, (sp_solve, x_sp0) = median_time(scipy_setup_first, 2)
    k[0] = 0

    def sp_further():
        k[0] = (k[0] + 1) % n_targets
        return sp_solve(rhs(targets[k[0]]))

    t_sp_solve, _ = median_time(sp_further, rep_solve)
    res["scipy_superlu"] = {"setup_plus_first_solve_s": t_sp_setup, "further_solve_s": t_sp_solve}

    # ---------------- libigl min_quad_with_fixed ------------------------------------------------------
    try:
        import igl

        empty_k = np.zeros(0, np.int64)
        Aeq = sp.csc_matrix((0, n))

        def igl_setup_first():
            Li = _laplacian(v, f, "uniform")
            Q = (2.0 * (Li.T @ Li + sp.csc_matrix((w, (h, h)), shape=(n, n)))).tocsc()
            data = igl.min_quad_with_fixed_data()
            igl.min_quad_with_fixed_precompute(Q, empty_k, Aeq, True, data)
            return data, igl.min_quad_with_fixed_solve(data, -2.0 * rhs(targets[0]), np.zeros((0, 3)),
                                                         np.zeros((0, 3)))

        t_igl_setup, (igl_data, x_igl0) = median_time(igl_setup_first, 2)
        k[0] = 0

        def igl_further():
            k[0] = (k[0] + 1) % n_targets
            return igl.min_quad_with_fixed_solve(igl_data, -2.0 * rhs(targets[k[0]]), np.zeros((0, 3)),
                                                 np.zeros((0, 3)))

        t_igl_solve, _ = median_time(igl_further, rep_solve)
        res["libigl_min_quad_with_fixed"] = {"setup_plus_first_solve_s": t_igl_setup,
                                             "further_solve_s": t_igl_solve,
                                             "rel_diff_vs_geomfit": float(np.linalg.norm(x_igl0 - x_gf0)
                                                                          / np.linalg.norm(x_gf0))}
    except ImportError:
        res["libigl_min_quad_with_fixed"] = None

    # ---------------- energy="biharmonic" (medium_stage's robust default) vs SciPy on the same matrix ---
    from geomfit.mesh import cotangent_laplacian, mass_matrix

    t_bi_setup, db, x_bi0, t_bi_solve, t_bi_batch = time_deformer(
        lambda: LaplacianDeformer(v, f, h, w, energy="biharmonic"), targets, batch, rep_setup, rep_solve)

    def bi_rhs(mu):
        b = np.zeros((n, 3))
        b[h] = w[:, None] * (mu - v[h])
        return b

    def sp_bi_setup_first():
        C = sp.csc_matrix(cotangent_laplacian(v, f))
        mm = mass_matrix(v, f, "voronoi").diagonal()
        Ab = (C.T @ sp.diags(mm.mean() / mm) @ C + sp.csc_matrix((w, (h, h)), shape=(n, n))).tocsc()
        solve = spla.factorized(Ab)
        return solve, v + solve(bi_rhs(targets[0]))

    t_spb_setup, (spb_solve, x_spb0) = median_time(sp_bi_setup_first, 2)
    k[0] = 0

    def spb_further():
        k[0] = (k[0] + 1) % n_targets
        return v + spb_solve(bi_rhs(targets[k[0]]))

    t_spb_solve, _ = median_time(spb_further, rep_solve)
    res["biharmonic"] = {
        "geomfit_setup_plus_first_solve_s": t_bi_setup, "geomfit_further_solve_s": t_bi_solve,
        "geomfit_batch16_per_target_s": t_bi_batch / 16,
        "scipy_setup_plus_first_solve_s": t_spb_setup, "scipy_further_solve_s": t_spb_solve,
        "setup_ratio_vs_scipy": ratio(t_spb_setup, t_bi_setup), "solve_ratio_vs_scipy": ratio(t_spb_solve, t_bi_solve),
        "rel_diff_vs_scipy": float(np.linalg.norm(x_bi0 - x_spb0) / np.linalg.norm(x_spb0)),
        "targets": {"setup_s_max": 0.6, "further_solve_s_max": 0.03}}
    del db

    # the pipeline's size: the Surrey model mesh (3,448 vertices) with 68 handles
    try:
        from geomfit.data import resolve_model

        mdl = resolve_model("sfm")
        vs, fs = np.asarray(mdl.mean, float), np.asarray(mdl.faces, np.int64)
        hs = np.array(sorted(mdl.landmarks.values()) + list(rng.choice(len(vs), 18, replace=False)))
        hs = np.unique(hs)[:68]
        ws = np.full(hs.size, 0.6)
        tg = vs[hs] + rng.normal(scale=1.0, size=(hs.size, 3))
        t_small_setup, (dsm, _) = median_time(
            lambda: (lambda dd: (dd, dd.deform(tg)))(LaplacianDeformer(vs, fs, hs, ws, energy="biharmonic")), 5)
        t_small_solve, _ = median_time(lambda: dsm.deform(tg), 20)
        res["biharmonic_pipeline_size"] = {"vertices": len(vs), "handles": int(hs.size),
                                           "setup_plus_first_solve_s": t_small_setup,
                                           "further_solve_s": t_small_solve}
    except Exception as e:  # the model is optional for this benchmark
        res["biharmonic_pipeline_size"] = {"skipped": str(e)}

    res["rel_diff_geomfit_vs_scipy"] = float(np.linalg.norm(x_gf0 - x_sp0) / np.linalg.norm(x_sp0))
    res["ratios"] = {
        "setup_plus_first_vs_scipy": ratio(t_sp_setup, t_gf_setup),
        "further_solve_vs_scipy_further_solve": ratio(t_sp_solve, t_gf_solve),
        "further_solve_vs_scipy_setup_plus_first": ratio(t_sp_setup, t_gf_solve),
        "batch16_per_target_vs_scipy_further_solve": ratio(t_sp_solve, t_gf_batch / 16),
    }
    res["ratios"]["handles_last_setup_plus_first_vs_scipy"] = ratio(t_sp_setup, t_gfl_setup)
    res["ratios"]["handles_last_further_solve_vs_scipy_further_solve"] = ratio(t_sp_solve, t_gfl_solve)
    if res["libigl_min_quad_with_fixed"]:
        res["ratios"]["setup_plus_first_vs_libigl"] = ratio(t_igl_setup, t_gf_setup)
        res["ratios"]["further_solve_vs_libigl"] = ratio(t_igl_solve, t_gf_solve)
    res["targets"] = {"setup_plus_first_vs_scipy_min": 2.5, "further_solve_vs_scipy_min": 30,
                      "aim_factorisation_s": 0.3, "aim_solve_s": 0.01}
    res["machine"]["load_avg_end"] = os.getloadavg()[0]
    out = write_results("laplacian", res, args.out or RESULTS / ("laplacian_quick.json" if QUICK else "laplacian.json"))
    print(json.dumps(res, indent=2, default=float))
    print("wrote", out)


if __name__ == "__main__":
    main()
