"""Benchmark: RTV (Xu et al. 2012) on a 1-megapixel colour image, 4 iterations.

geomfit.rtv_smooth (multigrid-preconditioned CG, relative residual 1e-8 per solve) against the
same algorithm with exact sparse direct solves in the same run:

* ``cholmod``: CHOLMOD (scikit-sparse) factorisation of ``I + lam L`` at every iteration,
* ``cholmod_reuse``: CHOLMOD with one symbolic analysis reused by all iterations
  (``analyze`` once, ``cholesky_inplace`` per iteration; the sparsity pattern never changes),
* ``superlu``: SciPy's SuperLU (``splu``), run on a smaller image by default and extrapolated
  to 1 MP by the measured CHOLMOD size ratio (``--superlu-full`` runs it at full size).

All peers use geomfit's ``rtv_weights`` (the weights are identical); the results are compared with
the CHOLMOD solution. Usage::

    python benchmarks/bench_rtv.py [--size 1000] [--repeats 3] [--superlu-size 500] [--superlu-full]

Writes benchmarks/results/rtv.json.
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse.linalg as spla

import geomfit.rtv as rtv
from _harness import Timer, ratio, write_results


def test_image(n):
    """scikit-image's astronaut, resized to n x n, float RGB in [0, 1] (synthetic texture if absent)."""
    try:
        from skimage import data, transform

        img = data.astronaut().astype(np.float64) / 255.0
        return transform.resize(img, (n, n), anti_aliasing=True), "skimage astronaut resized"
    except Exception:  # pragma: no cover
        rng = np.random.default_rng(0)
        i, j = np.mgrid[:n, :n]
        base = np.stack([(i // 64 + j // 64) % 3 / 3.0] * 3, axis=2)
        return base + 0.1 * np.sin(i * 1.3)[..., None] * np.sin(j * 1.7)[..., None] \
            + 0.02 * rng.standard_normal((n, n, 3)), "synthetic"


def rtv_direct(img, solver, lam=0.01, sigma=3.0, sharpness=0.02, iterations=4):
    """The same RTV iteration with exact sparse direct solves of (I + lam L) S = I."""
    H, W, C = img.shape
    ones = np.ones((H, W))
    S = img
    s = sigma
    analysis = None
    for _ in range(iterations):
        wx, wy = rtv.rtv_weights(S, s, sharpness)
        A = rtv.screened_poisson_matrix(ones, lam * wx, lam * wy).tocsc()
        b = img.reshape(H * W, C)
        if solver == "cholmod":
            from sksparse.cholmod import cholesky

            x = cholesky(A)(b)
        elif solver == "cholmod_reuse":
            from sksparse.cholmod import analyze

            if analysis is None:
                analysis = analyze(A)
            analysis.cholesky_inplace(A)
            x = analysis(b)
        elif solver == "superlu":
            x = spla.splu(A).solve(b)
        else:
            raise ValueError(solver)
        S = np.asarray(x).reshape(H, W, C)
        s = max(s / 2.0, 0.5)
    return S


def timed(fn, repeats):
    """(median seconds, all runs, last result) of ``repeats`` calls (the shared harness timer)."""
    t = Timer(repeats).run(fn)
    return t.median, t.runs, t.result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-repeats", type=int, default=1)
    ap.add_argument("--superlu-size", type=int, default=500)
    ap.add_argument("--superlu-full", action="store_true")
    args = ap.parse_args()

    import numba

    img, source = test_image(args.size)
    rtv.rtv_smooth(img[:64, :64])  # load the compiled kernels (Numba cache) before timing
    res = {"image": f"{source}, {args.size}x{args.size}x3", "iterations": 4,
           "params": {"lam": 0.01, "sigma": 3.0, "sharpness": 0.02, "sigma_schedule": "halve, min 0.5"},
           "numba_threads": numba.get_num_threads()}

    t_g, ts_g, (S, info) = timed(lambda: rtv.rtv_smooth(img, return_info=True), args.repeats)
    res["geomfit"] = {"median_s": t_g, "times_s": ts_g, "tol": 1e-8, "cg_iterations": info["iterations"],
                      "final_relative_residuals": [float(np.max(r)) for r in info["residual"]]}
    print(f"geomfit rtv_smooth: median {t_g:.3f} s  {['%.3f' % t for t in ts_g]}  CG its {info['iterations']}")
    # the same with one Numba thread, wall and CPU time (the CPU cost, less sensitive to other jobs)
    nthreads = numba.get_num_threads()
    numba.set_num_threads(1)
    one = Timer(args.repeats).run(lambda: rtv.rtv_smooth(img))
    numba.set_num_threads(nthreads)
    res["geomfit_1thread"] = {"median_s": one.median, "times_s": one.runs, "cpu_median_s": one.cpu_median}
    print(f"geomfit rtv_smooth, 1 thread: median {one.median:.3f} s (CPU {one.cpu_median:.3f} s)")

    peers = {}
    ref = None
    for name in ("cholmod", "cholmod_reuse"):
        t, ts, out = timed(lambda: rtv_direct(img, name), args.peer_repeats)
        peers[name] = {"median_s": t, "times_s": ts, "size": args.size}
        if ref is None:
            ref = out
        print(f"{name}: median {t:.3f} s")
    err = float(np.abs(S - ref).max())
    res["max_abs_diff_geomfit_vs_cholmod"] = err
    print(f"max |geomfit - cholmod| = {err:.2e}")

    if args.superlu_full:
        t, ts, _ = timed(lambda: rtv_direct(img, "superlu"), 1)
        peers["superlu"] = {"median_s": t, "times_s": ts, "size": args.size, "extrapolated": False}
    else:
        small, _ = test_image(args.superlu_size)
        t_s, _, _ = timed(lambda: rtv_direct(small, "superlu"), 1)
        t_c, _, _ = timed(lambda: rtv_direct(small, "cholmod"), 1)
        size_ratio = peers["cholmod"]["median_s"] / t_c
        peers["superlu"] = {"median_s": t_s * size_ratio, "measured_s": t_s, "size": args.superlu_size,
                            "extrapolated": True,
                            "note": f"measured at {args.superlu_size}^2 ({t_s:.2f} s; CHOLMOD {t_c:.2f} s there) "
                                    f"and scaled by CHOLMOD's measured {args.superlu_size}^2 -> {args.size}^2 "
                                    f"time ratio {size_ratio:.2f}"}
        print(f"superlu at {args.superlu_size}^2: {t_s:.3f} s -> extrapolated {t_s * size_ratio:.3f} s at {args.size}^2")
    res["peers"] = peers
    res["speedup_vs"] = {k: ratio(v["median_s"], t_g) for k, v in peers.items()}
    print("speed-up:", {k: round(v, 2) for k, v in res["speedup_vs"].items()})
    print("wrote", write_results("rtv", res))


if __name__ == "__main__":
    main()
