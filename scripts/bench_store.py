#!/usr/bin/env python3
"""Snapshots for a fleet, measured against a local SeaweedFS (started here by
scripts/store.sh, or --endpoint): pushes, deduplication, restores, in the same run.

The demo RAM (--size, 1 GiB) is saved chunked, and a lazy restore of it records its
working set (a program with a stable hot set of --hot pages).  Then, for each store
chunk size (--chunk-sizes: the trade-off between deduplication, requests and restore
time):

* push: time, bytes uploaded, requests; a second snapshot with 1% of the pages
  changed in a few runs (as a guest's writes cluster) — bytes uploaded against the
  first push (target <= 10%) — and one with 1% scattered single pages (reported);
* eager restore from the store (a cold chunk cache), against the local chunked file's
  eager restore and against the client's own parallel GET of every chunk object,
  measured in the same run (target: restore time <= 2x that GET time, i.e. >= 0.5x of
  its throughput);
* lazy restore from the store (a private page server per restore): time from the
  start until the program is done, cold and warm chunk cache, with and without the
  recorded working set; the program's first-touch p50/p99; chunk objects and bytes
  fetched; against the local lazy restore of the chunked file (target with a working
  set: <= 2x).

Medians of --repeat runs with the lowest and highest.

    scripts/bench_store.py [--size 1G] [--repeat 5] [--chunk-sizes 256K,1M,2M] [--json]
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import ROOT, arguments, emit, note, parse_size  # noqa: E402

from qfram import snapshot  # noqa: E402
from qfram.format import manifest as mf  # noqa: E402
from qfram.lab import workloads  # noqa: E402
from qfram.lab.demo import demo_ram  # noqa: E402
from qfram.lazy import LazyRestore  # noqa: E402
from qfram.ram import RAMBlock, RAMList  # noqa: E402
from qfram.store import push  # noqa: E402
from qfram.store import restore as store_restore  # noqa: E402
from qfram.store.chunks import LocalCache  # noqa: E402
from qfram.store.client import ObjectStore  # noqa: E402
from qfram.store.url import Endpoint  # noqa: E402

PAGE = 4096


def summary(values: List[float], digits: int = 3) -> Dict[str, float]:
    return {"median": round(statistics.median(values), digits),
            "low": round(min(values), digits), "high": round(max(values), digits)}


def snapshots(size: int, work: str, hot: int) -> Dict[str, str]:
    """The base snapshot (chunked, with a recorded working set) and two changed ones."""
    region = demo_ram(size)
    ram = RAMList([RAMBlock("pc.ram", region, kind="anonymous")])
    paths = {}
    paths["base"] = os.path.join(work, "base.chk")
    snapshot.save(ram, paths["base"], layout="chunked")
    with LazyRestore(paths["base"], window_pages=1, background=False, prefetch=False) as lazy:
        workloads.hot_set_workload(lazy.ram, hot)           # records base.chk.ws
        lazy.wait()
    npages = size // PAGE
    rng = random.Random(7)
    view = memoryview(region)
    for _ in range(4):                      # 1% of the pages, in 4 runs
        first = rng.randrange(npages - npages // 400)
        for p in range(first, first + npages // 400):
            view[p * PAGE] = (view[p * PAGE] + 1) & 0xFF or 1
    paths["clustered"] = os.path.join(work, "clustered.chk")
    snapshot.save(ram, paths["clustered"], layout="chunked")
    region[:] = demo_ram(size)              # the base again, then scattered single pages
    for p in rng.sample(range(npages), npages // 100):
        view[p * PAGE] = (view[p * PAGE] + 1) & 0xFF or 1
    paths["scattered"] = os.path.join(work, "scattered.chk")
    snapshot.save(ram, paths["scattered"], layout="chunked")
    del view
    ram.close()
    return paths


def raw_get_seconds(store: ObjectStore, manifest: mf.Manifest, threads: int) -> float:
    """The client's own throughput: every chunk object GET in parallel, nothing else."""
    keys = sorted(manifest.digests())
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda d: store.get(mf.chunk_key(d), 64 << 20), keys))
    return time.perf_counter() - t0


def lazy_run(url: str, hot: int, cache: str, endpoint: Endpoint, prefetch) -> dict:
    before = cache_bytes(cache)
    t0 = time.perf_counter()
    with LazyRestore(url, prefetch=prefetch, record=False,
                     store={"endpoint": endpoint, "cache": cache}) as lazy:
        running = time.perf_counter() - t0
        touched = workloads.hot_set_workload(lazy.ram, hot)
        done = time.perf_counter() - t0
        lazy.wait()
    after = cache_bytes(cache)
    return {"running_s": running, "done_s": done, "p50_us": touched.p50_us,
            "p99_us": touched.p99_us,
            "fetched_objects": after[0] - before[0], "fetched_bytes": after[1] - before[1]}


def cache_bytes(cache: str):
    n = size = 0
    for folder, _, files in os.walk(cache):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(folder, f))
    return n, size


def local_lazy(path: str, hot: int):
    """(time to running, time to done) of a local lazy restore with the working set."""
    t0 = time.perf_counter()
    with LazyRestore(path, record=False) as lazy:
        running = time.perf_counter() - t0
        workloads.hot_set_workload(lazy.ram, hot)
        done = time.perf_counter() - t0
        lazy.wait()
    return running, done


def bench_chunk_size(chunk: int, paths: Dict[str, str], endpoint: Endpoint, bucket: str,
                     work: str, args) -> dict:
    row: Dict[str, object] = {"chunk_bytes": chunk}
    url = f"s3://{bucket}/base-{chunk}"
    t0 = time.perf_counter()
    first = push(paths["base"], url, endpoint=endpoint, chunk_bytes=chunk)
    row["push_s"] = round(time.perf_counter() - t0, 3)
    row["push_bytes"] = first.bytes_uploaded
    row["push_requests"] = first.chunks_total
    for kind in ("clustered", "scattered"):
        again = push(paths[kind], f"s3://{bucket}/{kind}-{chunk}", endpoint=endpoint,
                     chunk_bytes=chunk)
        row[f"{kind}_bytes"] = again.bytes_uploaded
        row[f"{kind}_ratio"] = round(again.bytes_uploaded / first.bytes_uploaded, 4)
    store, manifest = store_restore.open_manifest(url, endpoint)
    gets, eager = [], []
    for _ in range(args.repeat):
        gets.append(raw_get_seconds(store, manifest, 16))
        cache = tempfile.mkdtemp(dir=work)
        t0 = time.perf_counter()
        ram, _, _ = store_restore.load(url, endpoint=endpoint, cache=LocalCache(cache),
                                       threads=16)
        eager.append(time.perf_counter() - t0)
        ram.close()
        shutil.rmtree(cache)
    row["get_all_s"] = summary(gets)
    row["eager_s"] = summary(eager)
    row["eager_vs_get"] = round(statistics.median(gets) / statistics.median(eager), 3)
    row["get_gbps"] = round(sum(1 for _ in manifest.digests()) and
                            first.bytes_uploaded / statistics.median(gets) / 1e9, 3)
    row["eager_gbps"] = round(manifest.ram_bytes / statistics.median(eager) / 1e9, 3)
    lazy: Dict[str, List[dict]] = {k: [] for k in ("cold_without", "cold_with",
                                                   "warm_without", "warm_with")}
    for _ in range(args.repeat):
        for ws, prefetch in (("without", False), ("with", None)):
            cache = tempfile.mkdtemp(dir=work)
            lazy[f"cold_{ws}"].append(lazy_run(url, args.hot, cache, endpoint, prefetch))
            lazy[f"warm_{ws}"].append(lazy_run(url, args.hot, cache, endpoint, prefetch))
            shutil.rmtree(cache)
    for key, runs in lazy.items():
        row[f"lazy_{key}_s"] = summary([r["done_s"] for r in runs])
        row[f"lazy_{key}_running_s"] = summary([r["running_s"] for r in runs])
        row[f"lazy_{key}_p50_us"] = statistics.median(r["p50_us"] for r in runs)
        row[f"lazy_{key}_p99_us"] = statistics.median(r["p99_us"] for r in runs)
        row[f"lazy_{key}_objects"] = statistics.median(r["fetched_objects"] for r in runs)
        row[f"lazy_{key}_bytes"] = statistics.median(r["fetched_bytes"] for r in runs)
    store.close()
    return row


def main() -> int:
    parser = arguments(__doc__, size="1G", repeat=5)
    parser.add_argument("--chunk-sizes", default="256K,1M,2M")
    parser.add_argument("--hot", type=int, default=8192)
    parser.add_argument("--endpoint", help="a store to use (default: start SeaweedFS)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="qfram-bench-store-", dir=os.environ.get("QFRAM_BENCH_DIR"))
    store_dir = os.path.join(work, "store")
    try:
        if args.endpoint:
            endpoint = Endpoint(args.endpoint)
            bucket = "qfram"
        else:
            out = subprocess.run([str(ROOT / "scripts" / "store.sh"), "start", store_dir],
                                 capture_output=True, text=True, check=True)
            endpoint = Endpoint(out.stdout.strip().splitlines()[-1], "qfram", "qfram-secret")
            bucket = "bench"
            subprocess.run([str(ROOT / "scripts" / "store.sh"), "bucket", bucket, store_dir],
                           check=True, capture_output=True)
        note(f"saving the demo RAM ({args.size}) chunked, recording its working set")
        paths = snapshots(size, work, args.hot)
        report: Dict[str, object] = {"ram_bytes": size, "repeat": args.repeat,
                                     "hot_pages": args.hot, "endpoint": endpoint.url}
        local_eager, local_running, local_done = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ram, _ = snapshot.load(paths["base"])
            local_eager.append(time.perf_counter() - t0)
            ram.close()
            running, done = local_lazy(paths["base"], args.hot)
            local_running.append(running)
            local_done.append(done)
        report["local_eager_s"] = summary(local_eager)
        report["local_lazy_with_ws_running_s"] = summary(local_running)
        report["local_lazy_with_ws_s"] = summary(local_done)
        rows = []
        for text in args.chunk_sizes.split(","):
            chunk = parse_size(text)
            note(f"chunk size {text}")
            rows.append(bench_chunk_size(chunk, paths, endpoint, bucket, work, args))
            note(f"  {rows[-1]}")
        report["chunk_sizes"] = rows
        local = statistics.median(local_running)
        for row in rows:
            row["lazy_ws_vs_local"] = round(row["lazy_cold_with_running_s"]["median"] / local, 2)
            row["lazy_ws_done_vs_local"] = round(row["lazy_cold_with_s"]["median"]
                                                 / statistics.median(local_done), 2)
            row["targets"] = {"clustered <= 10% of the first push": row["clustered_ratio"] <= 0.10,
                              "eager >= 0.5x the client's GET": row["eager_vs_get"] >= 0.5,
                              "lazy with working set <= 2x local":
                                  row["lazy_ws_vs_local"] <= 2.0}
    finally:
        if not args.endpoint:
            subprocess.run([str(ROOT / "scripts" / "store.sh"), "stop", store_dir],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"local: eager {report['local_eager_s']['median']} s, lazy (working set) "
             f"running after {report['local_lazy_with_ws_running_s']['median']} s, done "
             f"after {report['local_lazy_with_ws_s']['median']} s"]
    for r in rows:
        lines.append(
            f"{r['chunk_bytes'] >> 10:5d} KiB chunks: push {r['push_s']} s "
            f"({r['push_bytes'] / 2**20:.1f} MiB, {r['push_requests']} chunks); 1% "
            f"clustered {r['clustered_ratio'] * 100:.1f}%, scattered "
            f"{r['scattered_ratio'] * 100:.1f}% of it; eager {r['eager_s']['median']} s vs "
            f"GET all {r['get_all_s']['median']} s ({r['eager_vs_get']}x); lazy running "
            f"after (cold, with ws) {r['lazy_cold_with_running_s']['median']} s "
            f"({r['lazy_ws_vs_local']}x local); done after: cold "
            f"{r['lazy_cold_without_s']['median']} / with ws "
            f"{r['lazy_cold_with_s']['median']} s, warm "
            f"{r['lazy_warm_without_s']['median']} / {r['lazy_warm_with_s']['median']} s")
    emit(args, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
