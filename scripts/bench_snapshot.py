#!/usr/bin/env python3
"""Snapshot save and restore against references, in the same run.

A 1 GiB demo RAM (30% zero pages, the rest text and random) is saved to and restored
from a tmpfs file, each measurement in a fresh process with the RAM pre-faulted:

  save     c         the C reference writer (QEMU's algorithm) -> stream file
           stream    qfram.snapshot.save, stream layout (checksums included)
           mapped    qfram.snapshot.save, mapped layout, 2 writer threads
           cp        cp of the raw RAM image (the bar for the mapped layout)
           stream+release, mapped+release   the same, giving pages back once durable
                     (each 32 MiB written, fdatasync'd, then released): ratio to the
                     same layout without release
  restore  c         the C reader: stream file -> fresh memory (4 KiB / THP)
           stream    qfram.snapshot.load of the stream file (verify off; +verify row)
           mapped    qfram.snapshot.load of the mapped file (verify off; +verify row)
  lazy     first-touch latency of pages not yet placed (one touching thread, every
           touch a real fault) with and without the background fill; p50/p99/max

Every destination file is new (tmpfs allocation included, as a real save has it).
Medians of --repeat runs; ratios against the reference of the same row group.

    scripts/bench_snapshot.py [--size 1G] [--repeat 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import (arguments, build_cref, emit, load_image, median_gbps, note,  # noqa: E402
                      parse_size, run_json, spread)

PAGE = mmap.PAGESIZE


# -- children --------------------------------------------------------------------------------


def child_save(layout: str, image: str, path: str) -> dict:
    from qfram import snapshot
    from qfram.ram import RAMBlock, RAMList
    layout, _, release = layout.partition("+")
    region = load_image(image)
    ram = RAMList([RAMBlock.from_buffer("pc.ram", region)])
    t0 = time.perf_counter()
    result = snapshot.save(ram, path, layout=layout, release=release == "release")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": result.ram_bytes, "released": result.released_bytes}


def child_load(path: str, huge: bool, verify: bool) -> dict:
    from qfram import snapshot
    t0 = time.perf_counter()
    ram, result = snapshot.load(path, verify=verify, huge=huge)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": result.ram_bytes, "verified": result.verified}


def child_lazy(path: str, background: bool, touches: int, spin_us: float) -> dict:
    from qfram.lazy import LazyRestore
    from qfram._util.latency import percentiles
    with LazyRestore(path, background=background, spin_us=spin_us) as lazy:
        block = next(iter(lazy.ram))
        windows = list(range(block.npages // 16))
        random.Random(7).shuffle(windows)
        region = block.region
        lat = []
        for w in windows[:touches]:
            off = (w * 16 + 5) * PAGE
            if background and lazy.complete:
                break
            t0 = time.perf_counter_ns()
            region[off]
            lat.append(time.perf_counter_ns() - t0)
        stats = lazy.wait()
    return {"touch": percentiles(lat).as_dict(), "handler": stats.handler_latency.as_dict(),
            "faults": stats.faults, "verified": stats.verified, "seconds": stats.seconds}


# -- the parent ------------------------------------------------------------------------------


def fresh(path: Path) -> None:
    if path.exists():
        path.unlink()


def main() -> int:
    parser = arguments(__doc__, repeat=5)
    parser.add_argument("--touches", type=int, default=2000)
    parser.add_argument("--dir", default="/dev/shm",
                        help="where the files go (default tmpfs; a disk shows what the "
                             "syncs of a release save cost)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "save":
            print(json.dumps(child_save(*rest)))
        elif kind == "load":
            print(json.dumps(child_load(rest[0], rest[1] == "1", rest[2] == "1")))
        else:
            print(json.dumps(child_lazy(rest[0], rest[1] == "1", int(rest[2]),
                                        float(rest[3]))))
        return 0

    size = parse_size(args.size)
    size -= size % PAGE
    cref = build_cref()
    me = [sys.executable, __file__, "--child"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qfram-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "image"
        from qfram.lab.demo import fill_demo
        with open(image, "wb") as f:
            f.truncate(size)
        with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            fill_demo(m)
        out = {"c": work / "c.stream", "stream": work / "snap.stream",
               "mapped": work / "snap.mapped", "cp": work / "copy",
               "stream+release": work / "released.stream",
               "mapped+release": work / "released.mapped"}

        # -- save: writers take turns in random order, each into a new file
        runs = {k: [] for k in out}
        for _ in range(args.repeat):
            for kind in random.sample(list(out), len(out)):
                fresh(out[kind])
                if kind == "c":
                    fd = os.open(out[kind], os.O_WRONLY | os.O_CREAT, 0o600)
                    try:
                        r = run_json([str(cref), "write", str(image), str(fd), "64", "32768"],
                                     pass_fds=(fd,))
                    finally:
                        os.close(fd)
                    r["bytes"] = r["ram_bytes"]
                elif kind == "cp":
                    t0 = time.perf_counter()
                    subprocess.run(["cp", str(image), str(out[kind])], check=True)
                    r = {"seconds": time.perf_counter() - t0, "bytes": size}
                else:
                    r = run_json(me + ["save", kind, str(image), str(out[kind])])
                runs[kind].append(r)
        refs = {"c": "c", "stream": "c", "mapped": "cp", "cp": "cp",
                "stream+release": "stream", "mapped+release": "mapped"}
        gbps = {k: median_gbps(v) for k, v in runs.items()}
        for kind in ("c", "stream", "cp", "mapped", "stream+release", "mapped+release"):
            rows.append({"group": "save", "what": kind, "gbps": gbps[kind],
                         "ratio": round(gbps[kind] / gbps[refs[kind]], 3),
                         "reference": refs[kind], "spread": spread(runs[kind])})
            note(f"  save {kind:14} {gbps[kind]:.3f} GB/s (spread {spread(runs[kind])})")

        # -- restore into fresh memory, 4 KiB pages and transparent huge pages
        for huge in (False, True):
            target = "thp" if huge else "4k"
            cases = {"c": [str(cref), "read", str(out["c"]), str(size), "1" if huge else "0"],
                     "stream": me + ["load", str(out["stream"]), "1" if huge else "0", "0"],
                     "mapped": me + ["load", str(out["mapped"]), "1" if huge else "0", "0"],
                     "stream+verify": me + ["load", str(out["stream"]), "1" if huge else "0", "1"],
                     "mapped+verify": me + ["load", str(out["mapped"]), "1" if huge else "0", "1"]}
            runs = {k: [] for k in cases}
            for _ in range(args.repeat):
                for kind in random.sample(list(cases), len(cases)):
                    r = run_json(cases[kind])
                    if kind == "c":
                        r["bytes"] = size
                    runs[kind].append(r)
            gbps = {k: median_gbps(v) for k, v in runs.items()}
            for kind in cases:
                rows.append({"group": f"restore-{target}", "what": kind, "gbps": gbps[kind],
                             "ratio": round(gbps[kind] / gbps["c"], 3), "reference": "c"})
                note(f"  restore {target} {kind:14} {gbps[kind]:.3f} GB/s")

        # -- lazy restore: first-touch latency
        lazy = []
        for background in (False, True):
            for spin in (0.0, 50.0):
                r = run_json(me + ["lazy", str(out["mapped"]), "1" if background else "0",
                                   str(args.touches), str(spin)])
                r.update(background=background, spin_us=spin)
                lazy.append(r)
                note(f"  lazy background={background} spin={spin}: touch {r['touch']}, "
                     f"handler {r['handler']}")

    report = {"size": size, "repeat": args.repeat, "dir": args.dir, "rows": rows,
              "lazy": lazy}
    lines = [f"RAM {size >> 20} MiB (30% zero pages), files in {args.dir}, median of "
             f"{args.repeat}", f"{'group':12} {'what':15} {'GB/s':>7} {'ratio':>6}  reference"]
    lines += [f"{r['group']:12} {r['what']:15} {r['gbps']:7.3f} {r['ratio']:6.2f}  "
              f"{r['reference']}" for r in rows]
    lines.append("lazy restore, first touch of a missing page (us):")
    for r in lazy:
        t, h = r["touch"], r["handler"]
        lines.append(f"  background={str(r['background']):5} spin={r['spin_us']:4.0f}us  "
                     f"touch p50 {t['p50_us']:6.1f} p99 {t['p99_us']:6.1f} max "
                     f"{t['max_us']:8.1f}   handler p50 {h['p50_us']:6.1f} p99 "
                     f"{h['p99_us']:6.1f}  verified {r['verified']}")
    emit(args, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
