#!/usr/bin/env python3
"""Restoring like a sandbox platform: working-set prefetch, dirty-only reset and the
chunked layout, each against what it replaces, in the same run.

The demo RAM (--size, 1 GiB by default) is saved mapped and chunked (lz4, zstd).  Then,
--repeat times each (medians, with the lowest and highest):

* working set: a program with a stable hot set (qfram.lazy.restore.hot_set_workload, --hot
  pages) restored lazily without prefetch and with the working set an earlier restore
  recorded (recorded once, with 1-page windows and no background fill); faults the
  program waited for, and the time from the restore's start until the program is done;
  again from a cold page cache when run as root (the snapshot read from the disk);
* reset: a copy-on-write mapping of the mapped snapshot (qfram.lazy.reset.Resettable) after
  1 / 100 / 10,000 pages were written, against an eager reload of the whole snapshot
  into fresh memory; and a resettable lazy restore (anonymous memory) after 1 / 100;
* chunked: bytes on disk against the mapped file's, the fault service p99 of a lazy
  restore of each (a random-touch workload), and the eager restore rate of each.

    scripts/bench_restore.py [--size 1G] [--repeat 5] [--hot 8192] [--json | --markdown]

--markdown prints the section scripts/bench_all.sh puts in benchmarks/REPORT.md.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import arguments, emit, note, parse_size  # noqa: E402

from qfram import snapshot  # noqa: E402
from qfram.lab import workloads
from qfram.lazy import LazyRestore, Resettable
from qfram.lab.demo import demo_ram  # noqa: E402
from qfram.ram import RAMBlock, RAMList  # noqa: E402


def summary(values: List[float], digits: int = 3) -> Dict[str, float]:
    return {"median": round(statistics.median(values), digits),
            "low": round(min(values), digits), "high": round(max(values), digits)}


def on_disk(path: str) -> int:
    return os.stat(path).st_blocks * 512


def save_all(size: int, work: str) -> Dict[str, dict]:
    """The demo RAM in every layout compared: path, save rate, bytes on disk."""
    ram = RAMList([RAMBlock("pc.ram", demo_ram(size), kind="anonymous")])
    files = {}
    for name, layout, codec in (("stream", "stream", None), ("mapped", "mapped", None),
                                ("chunked-lz4", "chunked", "lz4"),
                                ("chunked-zstd", "chunked", "zstd")):
        path = os.path.join(work, name)
        result = snapshot.save(ram, path, layout=layout, compress=codec)
        files[name] = {"path": path, "save_gbps": round(size / result.seconds / 1e9, 3),
                       "disk_bytes": on_disk(path)}
        note(f"saved {name}: {files[name]}")
    ram.close()
    return files


def lazy_run(path: str, workload: Callable, **options) -> dict:
    """One lazy restore with a workload: faults it waited for, its time to done."""
    t0 = time.perf_counter()
    with LazyRestore(path, **options) as lazy:
        workload(lazy.ram)
        done = time.perf_counter() - t0
        during = lazy.server.counters["faults"]
        stats = lazy.wait()
    return {"faults": during, "done_s": done, "p99_us": stats.handler_latency.p99_us,
            "complete_s": stats.seconds, "prefetch_pages": stats.prefetch_pages}


def drop_caches() -> bool:
    """Empty the page cache (root only): the snapshot is read from the disk again."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def working_set(path: str, hot: int, repeat: int) -> dict:
    def program(ram):
        workloads.hot_set_workload(ram, hot)

    ws = path + ".ws"
    if os.path.exists(ws):
        os.unlink(ws)
    lazy_run(path, program, window_pages=1, background=False, prefetch=False)  # records
    runs: Dict[str, List[dict]] = {"without": [], "with": []}
    for _ in range(repeat):
        runs["without"].append(lazy_run(path, program, prefetch=False, record=False))
        runs["with"].append(lazy_run(path, program, record=False))
    out = {}
    for key, rs in runs.items():
        out[f"ws_faults_{key}"] = statistics.median(r["faults"] for r in rs)
        out[f"ws_time_{key}_s"] = summary([r["done_s"] for r in rs])["median"]
        out[f"ws_time_{key}_spread"] = summary([r["done_s"] for r in rs])
        out[f"ws_complete_{key}_s"] = summary([r["complete_s"] for r in rs])["median"]
    out["ws_prefetch_pages"] = runs["with"][0]["prefetch_pages"]
    out["ws_hot_pages"] = hot
    # the same from a cold page cache (the snapshot on the disk): where it counts most
    if drop_caches():
        cold: Dict[str, List[float]] = {"without": [], "with": []}
        for _ in range(repeat):
            for key, prefetch in (("without", False), ("with", None)):
                drop_caches()
                cold[key].append(lazy_run(path, program, prefetch=prefetch,
                                          record=False)["done_s"])
        for key, times in cold.items():
            out[f"ws_cold_time_{key}_s"] = summary(times)["median"]
            out[f"ws_cold_time_{key}_spread"] = summary(times)
    return out


def resets(path: str, repeat: int) -> dict:
    out = {}
    with Resettable(path) as box:
        for dirty in (1, 100, 10000):
            took = []
            for k in range(max(repeat, 5) * (4 if dirty < 10000 else 1)):
                workloads.scribble(box.ram, dirty, seed=k + 1)
                took.append(box.reset().seconds * 1e6)
            out[f"reset_us_{dirty}"] = summary(took, 1)["median"]
            out[f"reset_us_{dirty}_spread"] = summary(took, 1)
        out["reset_verified"] = box.verify()
    # the same for anonymous memory a userfaultfd restore filled (every page present)
    with LazyRestore(path, resettable=True, record=False, prefetch=False) as lazy:
        lazy.wait(verify=False)
        for dirty in (1, 100):
            took = []
            for k in range(max(repeat, 5) * 2):
                workloads.scribble(lazy.ram, dirty, seed=k + 1)
                took.append(lazy.reset().seconds * 1e6)
            out[f"lazy_reset_us_{dirty}"] = summary(took, 1)["median"]
            out[f"lazy_reset_us_{dirty}_spread"] = summary(took, 1)
        out["lazy_reset_verified"] = lazy.verify()
    reloads = []
    for k in range(repeat + 1):
        ram, result = snapshot.load(path, verify=False)
        ram.close()
        if k:                           # the first one warms the machine up
            reloads.append(result.seconds * 1000)
    out["full_reload_ms"] = summary(reloads, 1)["median"]
    out["full_reload_ms_spread"] = summary(reloads, 1)
    out["reset_100_vs_reload"] = round(out["full_reload_ms"] * 1000 / out["reset_us_100"], 1)
    return out


def chunked_figures(files: Dict[str, dict], repeat: int) -> dict:
    out = {"chunked_size_ratio": round(files["chunked-lz4"]["disk_bytes"]
                                       / files["mapped"]["disk_bytes"], 3),
           "chunked_zstd_size_ratio": round(files["chunked-zstd"]["disk_bytes"]
                                            / files["mapped"]["disk_bytes"], 3)}

    def program(ram):
        workloads.touch_workload(ram, 4000)

    for name, key in (("mapped", "mapped"), ("chunked-lz4", "chunked"),
                      ("chunked-zstd", "chunked_zstd")):
        p99s, rates = [], []
        for _ in range(repeat):
            p99s.append(lazy_run(files[name]["path"], program, prefetch=False,
                                 record=False)["p99_us"])
            ram, result = snapshot.load(files[name]["path"], verify=False)
            ram.close()
            rates.append(result.ram_bytes / result.seconds / 1e9)
        out[f"{key}_fault_p99_us"] = summary(p99s, 1)["median"]
        out[f"{key}_fault_p99_spread"] = summary(p99s, 1)
        out[f"{key}_restore_gbps"] = summary(rates)["median"]
        out[f"{key}_restore_spread"] = summary(rates)
    out["chunked_fault_p99_vs_mapped"] = round(out["chunked_fault_p99_us"]
                                               / out["mapped_fault_p99_us"], 2)
    return out


def main() -> int:
    parser = arguments(__doc__, size="1G", repeat=5)
    parser.add_argument("--hot", type=int, default=8192, help="pages in the hot set")
    parser.add_argument("--markdown", action="store_true",
                        help="print the report's markdown section")
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=os.environ.get("QFRAM_BENCH_DIR", "/var/tmp")) as work:
        files = save_all(size, work)
        # warm the machine up: the first touch of never-used memory is slow here
        ram, _ = snapshot.load(files["mapped"]["path"], verify=False)
        ram.close()
        report = {"size": size, "repeat": args.repeat,
                  "layouts": {k: {x: v[x] for x in ("save_gbps", "disk_bytes")}
                              for k, v in files.items()}}
        note("working set ...")
        report.update(working_set(files["mapped"]["path"], args.hot, args.repeat))
        note("reset ...")
        report.update(resets(files["mapped"]["path"], args.repeat))
        note("chunked ...")
        report.update(chunked_figures(files, args.repeat))
    lines = [
        f"demo RAM {size >> 20} MiB, medians of {args.repeat}",
        f"working set ({args.hot} hot pages): faults {report['ws_faults_without']} -> "
        f"{report['ws_faults_with']}, program done in {report['ws_time_without_s']} s -> "
        f"{report['ws_time_with_s']} s",
        f"reset after 1 / 100 / 10000 written pages: {report['reset_us_1']} / "
        f"{report['reset_us_100']} / {report['reset_us_10000']} us; a full reload "
        f"{report['full_reload_ms']} ms ({report['reset_100_vs_reload']}x the reset at 100)",
        f"chunked lz4: {report['chunked_size_ratio']} of the mapped file on disk (zstd "
        f"{report['chunked_zstd_size_ratio']}), fault p99 {report['chunked_fault_p99_us']} "
        f"us vs mapped {report['mapped_fault_p99_us']} us, eager restore "
        f"{report['chunked_restore_gbps']} GB/s (mapped {report['mapped_restore_gbps']})",
    ]
    if args.markdown:
        print(markdown(report, args))
    else:
        emit(args, report, lines)
    return 0


def markdown(r: dict, args) -> str:
    """The section of benchmarks/REPORT.md: each figure with its spread and target."""
    def spread(key: str, unit: str = "") -> str:
        s = r[key]
        return f"{s['low']}-{s['high']}{unit}"

    rows = [
        ("faults the program waited for, without / with the working set",
         f"{r['ws_faults_without']} / {r['ws_faults_with']}", "≥ 90% fewer"),
        ("program done after (s), without / with",
         f"{r['ws_time_without_s']} ({spread('ws_time_without_spread')}) / "
         f"{r['ws_time_with_s']} ({spread('ws_time_with_spread')})", "≥ 2x faster"),
        ("the same from a cold page cache (s), without / with",
         f"{r['ws_cold_time_without_s']} ({spread('ws_cold_time_without_spread')}) / "
         f"{r['ws_cold_time_with_s']} ({spread('ws_cold_time_with_spread')})"
         if "ws_cold_time_with_s" in r else "not measured (needs root)", "—"),
        ("reset after 1 written page (µs)", f"{r['reset_us_1']} ({spread('reset_us_1_spread')})",
         "≤ 50"),
        ("reset after 100 (µs)", f"{r['reset_us_100']} ({spread('reset_us_100_spread')})",
         "≤ 200"),
        ("reset after 10,000 (µs)",
         f"{r['reset_us_10000']} ({spread('reset_us_10000_spread')})", "—"),
        ("lazy restore (anonymous memory) reset after 1 / 100 (µs)",
         f"{r['lazy_reset_us_1']} ({spread('lazy_reset_us_1_spread')}) / "
         f"{r['lazy_reset_us_100']} ({spread('lazy_reset_us_100_spread')})", "—"),
        ("eager reload of the snapshot (ms); vs the reset at 100",
         f"{r['full_reload_ms']} ({spread('full_reload_ms_spread')}); "
         f"{r['reset_100_vs_reload']}x", "≥ 20x"),
        ("chunked lz4 / zstd on disk, of the mapped file",
         f"{r['chunked_size_ratio']} / {r['chunked_zstd_size_ratio']}", "≤ 0.5"),
        ("lazy fault p99 (µs): mapped / chunked lz4 / chunked zstd",
         f"{r['mapped_fault_p99_us']} / {r['chunked_fault_p99_us']} / "
         f"{r['chunked_zstd_fault_p99_us']}", "chunked ≤ 2x mapped"),
        ("eager restore (GB/s): mapped / chunked lz4 / chunked zstd",
         f"{r['mapped_restore_gbps']} / {r['chunked_restore_gbps']} "
         f"({spread('chunked_restore_spread')}) / {r['chunked_zstd_restore_gbps']}",
         "chunked ≥ 1"),
    ]
    layouts = "; ".join(f"{k} {v['disk_bytes'] / 2**20:.0f} MiB saved at {v['save_gbps']} GB/s"
                        for k, v in r["layouts"].items())
    return "\n".join(
        [f"## Restoring like a sandbox platform (`bench_restore.py --size {args.size} "
         f"--repeat {args.repeat}`)", "",
         f"Medians of {args.repeat} (lowest-highest); working set of {r['ws_hot_pages']} hot "
         f"pages.  Layouts: {layouts}.", "",
         "| measure | measured | target |", "|---|---|---|"]
        + [f"| {a} | {b} | {c} |" for a, b, c in rows])


if __name__ == "__main__":
    sys.exit(main())
