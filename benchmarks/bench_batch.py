"""Benchmark batches (photos per minute: in-process vs a Dask LocalCluster of 1 and 2 worker processes),
the first run of the README's job (cold vs warm Numba cache) and the peak memory of one photo.

Run: GEOMFIT_DATA=../shared/data python benchmarks/bench_batch.py [--photos 8] [--skip-cold] [--skip-memory]
Writes benchmarks/results/batch.json.  Times are wall-clock; the machine's load average is recorded
with them (on a shared machine, compare numbers of the same run only).
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _harness import ROOT, RESULTS, environment, ratio, write_results


def _photos(data, folder, n, scale=0.5):
    import cv2

    img = cv2.imread(str(data / "images" / "image_0010.png"))
    q = np.array(open(data / "images" / "image_0010.pts").read().split("{")[1].split("}")[0].split(),
                 float).reshape(68, 2)
    folder.mkdir(parents=True, exist_ok=True)
    small = cv2.resize(img, (int(1280 * scale), int(1024 * scale)), interpolation=cv2.INTER_AREA)
    for i in range(n):
        cv2.imwrite(str(folder / f"p{i:03d}.png"), small)
        (folder / f"p{i:03d}.pts").write_text("version: 1\nn_points: 68\n{\n" + "\n".join(
            f"{x * scale:.3f} {y * scale:.3f}" for x, y in q) + "\n}\n")
    return sorted(folder.glob("*.png"))


def bench_batch(data, n_photos, max_side=256):
    from distributed import Client, LocalCluster

    from geomfit import reconstruct_many

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="geomfit-bench-batch-"))
    out = {"photos": n_photos, "photo_size": [640, 512], "max_side": max_side, "fine": True}
    try:
        photos = _photos(data, tmp / "in", n_photos)
        warm = _photos(data, tmp / "warm", 2)
        kw = dict(max_side=max_side, fine=True, progress=False)
        reconstruct_many(warm[:1], None, outdir=tmp / "w0", **kw)  # JIT caches loaded, model read
        t = time.perf_counter()
        recs = reconstruct_many(photos, None, outdir=tmp / "serial", **kw)
        dt = time.perf_counter() - t
        assert all(r["status"] == "ok" for r in recs), recs
        out["in_process"] = {"seconds": dt, "photos_per_minute": 60 * n_photos / dt}
        for workers in (1, 2):
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
            client = Client(cluster)
            try:
                startup = time.perf_counter() - t0
                reconstruct_many(warm[:workers], client, outdir=tmp / f"w{workers}", **kw)  # one per worker
                t = time.perf_counter()
                recs = reconstruct_many(photos, client, outdir=tmp / f"dask{workers}", **kw)
                dt = time.perf_counter() - t
                assert all(r["status"] == "ok" for r in recs), recs
                out[f"dask_{workers}_workers"] = {"seconds": dt, "photos_per_minute": 60 * n_photos / dt,
                                                  "cluster_start_s": startup,
                                                  "workers_used": len({r["worker"] for r in recs})}
            finally:
                client.close()
                cluster.close()
        out["speedup_2_vs_1_workers"] = ratio(out["dask_2_workers"]["photos_per_minute"],
                                              out["dask_1_workers"]["photos_per_minute"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readme_job(env, repeats):
    """Wall and CPU (user + system) seconds of the README's job, each run in a fresh process.  On a
    loaded machine the wall time grows with the load; the CPU time is what an idle machine pays."""
    import resource

    ts, cpu = [], []
    for _ in range(repeats):
        d = tempfile.mkdtemp(prefix="geomfit-bench-first-")
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "geomfit", "reconstruct", "skimage:astronaut", "-o",
                            os.path.join(d, "astronaut"), "-q"], env=env, capture_output=True, text=True)
        ts.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        shutil.rmtree(d, ignore_errors=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
    return ts, cpu


def bench_first_run(repeats=3, cold=True):
    """The README's job in a fresh process: with an empty Numba cache (NUMBA_CACHE_DIR pointing to an
    empty folder: what a fresh install without warming pays) and with the cache setup.sh fills."""
    out = {}
    env = dict(os.environ)
    env.pop("NUMBA_CACHE_DIR", None)
    warm, warm_cpu = _readme_job(env, repeats)
    out["warm_cache_s"] = {"runs": warm, "median": statistics.median(warm), "cpu_runs": warm_cpu,
                           "cpu_median": statistics.median(warm_cpu)}
    if cold:
        d = tempfile.mkdtemp(prefix="geomfit-numba-cold-")
        try:
            cold_runs, cold_cpu = _readme_job(dict(env, NUMBA_CACHE_DIR=d), 1)
            second, second_cpu = _readme_job(dict(env, NUMBA_CACHE_DIR=d), 1)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        out["cold_cache_first_run_s"] = {"wall": cold_runs[0], "cpu": cold_cpu[0]}
        out["cold_cache_second_run_s"] = {"wall": second[0], "cpu": second_cpu[0]}
    return out


_RSS = r"""
import resource, sys, time, cv2, numpy as np
from geomfit.pipeline import reconstruct
img = cv2.imread(sys.argv[1]); q = np.array(open(sys.argv[2]).read().split("{")[1].split("}")[0].split(),
    float).reshape(68, 2)
s = float(sys.argv[3])
big = cv2.resize(img, (int(1280 * s), int(1024 * s)), interpolation=cv2.INTER_CUBIC)
cv2.imwrite(sys.argv[4], big); del big, img
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
rec = reconstruct(sys.argv[4], model="sfm", landmarks=q * s, max_side=512)
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base, time.perf_counter() - t)
"""


def bench_memory(data):
    """Peak RSS of one reconstruction (max side 512) of a 1.3 MP and a 24.6 MP photo."""
    out = {}
    for s in (1.0, 4.8):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "big.png")
            r = subprocess.run([sys.executable, "-c", _RSS, str(data / "images" / "image_0010.png"),
                                str(data / "images" / "image_0010.pts"), str(s), p], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            kb, base, sec = r.stdout.split("RSS")[-1].split()
            w, h = int(1280 * s), int(1024 * s)
            out[f"{w}x{h}"] = {"megapixels": w * h / 1e6, "peak_rss_gb": int(kb) / 2 ** 20,
                               "seconds": float(sec)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    a = ap.parse_args()
    data = pathlib.Path(os.environ.get("GEOMFIT_DATA", ROOT.parent / "shared" / "data"))
    dest = RESULTS / "batch.json"
    res = json.loads(dest.read_text()) if dest.is_file() else {}  # sections skipped now keep their numbers
    res.pop("machine", None)
    def section(name, fn):
        load0 = os.getloadavg()
        res[name] = fn()
        res[name]["load_avg"] = {"start": load0, "end": os.getloadavg()}
        print(json.dumps(res[name], indent=1))

    if not a.skip_batch:
        section("batch", lambda: bench_batch(data, a.photos))
    section("first_run", lambda: bench_first_run(cold=not a.skip_cold))
    if not a.skip_memory:
        section("memory", lambda: bench_memory(data))
    res["environment"] = environment()
    print(f"written {write_results('batch', res)}")


if __name__ == "__main__":
    main()
