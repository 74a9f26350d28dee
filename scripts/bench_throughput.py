#!/usr/bin/env python3
"""Throughput of qfram's core against a C reference, in the same run.

A pre-faulted demo RAM (30% zero pages, the rest text and random) is streamed as RAM page
records into (a) a pipe with a draining reader, (b) a unix socketpair with a draining
reader, (c) a tmpfs file.  Writers, each given a fresh sink of the system's default size:

  c      the C reference: QEMU's algorithm (32 KiB buffer, 64-iovec writev), cc -O2
  batch  qfram's save_pages with the seed's parameters (64 iovecs, 32 KiB, sinks as given)
  tuned  qfram's save_pages with qfram's defaults (1024 iovecs, pipe grown to 1 MiB,
         socket buffers grown to 4 MiB)
  loop   a Python loop: is_zero + put_be64 + put_buffer_async per page (qfram defaults)
         (offset/length arguments: no slicing, one buffer export for the region)
  pure   the pure-Python twin's save_pages (on at most 128 MiB: it is slow by nature)

The file sink is overwritten in place (allocated by a warm-up run): the writers are
measured, not tmpfs's page allocation.  Then restore: the C reader and qfram's load_pages parse the tmpfs stream into fresh
memory, with 4 KiB pages and with transparent huge pages.

Each configuration runs --repeat times; the table shows medians, and each row's ratio to
the C reference on the same sink and placement.  Placement: "split" pins the writer to
CPU 0 and the reader to CPU 1; "free" lets the scheduler choose (noisy: cross-core
wake-ups vary 2-4x here).  Absolute GB/s on these shared machines are noise; ratios are
the result.

    scripts/bench_throughput.py [--size 1G] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import (arguments, build_cref, emit, load_image, note, parse_size,  # noqa: E402
                      pinner, run_json)

PAGE = mmap.PAGESIZE
PURE_LIMIT = 128 << 20


def child_write(writer: str, image: str, fd: int) -> dict:
    import qfram
    from qfram import _pyfast
    from qfram.io import channel
    from qfram import backend
    region = load_image(image, PURE_LIMIT if writer == "pure" else 0)
    if writer == "batch":
        f = channel.fdopen(fd, "wb", pipe_size=None, socket_buffer=None, **backend.SEED_PARAMS)
    elif writer == "pure":
        f = channel.fdopen(fd, "wb", file_class=_pyfast.QEMUFile)
    else:
        f = channel.fdopen(fd, "wb")
    t0 = time.perf_counter()
    if writer == "loop":
        is_zero = qfram.is_zero
        put_be64, put_byte, put_async = f.put_be64, f.put_byte, f.put_buffer_async
        for off in range(0, len(region), PAGE):
            zero = is_zero(region, off, PAGE)
            header = off | (0x02 if zero else 0x08)
            if off == 0:
                put_be64(header)
                f.put_counted_string("pc.ram")
            else:
                put_be64(header | 0x20)
            if zero:
                put_byte(0)
            else:
                put_async(region, False, off, PAGE)
    else:
        f.save_pages(region, idstr="pc.ram")
    f.put_be64(0x10)
    f.close()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": f.tell(), "ram_bytes": len(region)}


def child_read(stream: str, size: int, huge: bool) -> dict:
    from qfram import wire
    from qfram.io import channel
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        region.madvise(mmap.MADV_HUGEPAGE)
    touched = bytearray((size // PAGE + 7) // 8)
    f = channel.fdopen(os.open(stream, os.O_RDONLY), "rb")
    t0 = time.perf_counter()
    header = f.get_be64()
    f.get_counted_string()
    header, pages, zeros = f.load_pages(region, header, touched=touched)
    seconds = time.perf_counter() - t0
    assert header == wire.RAM_SAVE_FLAG_EOS, hex(header)
    f.close()
    return {"seconds": seconds, "bytes": os.path.getsize(stream), "pages": pages,
            "zeros": zeros}


# --------------------------------------------------------------------------------------
# the parent: sinks, placement, repeats, table
# --------------------------------------------------------------------------------------


def writer_cmd(cref: Path, writer: str, image: Path, fd: int):
    if writer == "c":
        return [str(cref), "write", str(image), str(fd), "64", "32768"]
    return [sys.executable, __file__, "--child-write", writer, "--image", str(image),
            "--fd", str(fd)]


def run_writer(cref, writer, sink, image, workdir, placement) -> dict:
    wcpu, rcpu = (0, 1) if placement == "split" else (None, None)
    drain = None
    if sink == "file":
        # Overwritten in place: its tmpfs pages were allocated by a warm-up run, so the
        # measure is the writer, not the kernel's page allocator (which varies 2x from
        # run to run here).  Every writer writes the same bytes (checked by hash).
        path = workdir / "stream"
        wfd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    else:
        if sink == "pipe":
            rfd, wfd = os.pipe()
        else:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            rfd, wfd = os.dup(b.fileno()), os.dup(a.fileno())
            a.close()
            b.close()
        drain = subprocess.Popen([str(cref), "drain", str(rfd)], pass_fds=(rfd,),
                                 preexec_fn=pinner(rcpu))
        os.close(rfd)
    try:
        result = run_json(writer_cmd(cref, writer, image, wfd), pass_fds=(wfd,), cpu=wcpu)
    finally:
        os.close(wfd)
        if drain:
            drain.wait(timeout=300)
    if sink == "file":
        result["sha256"] = digest(str(workdir / "stream"))
    return result


def median_row(results, **labels) -> dict:
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in results]
    return {**labels, "gbps": round(statistics.median(rates), 3),
            "runs_gbps": [round(x, 3) for x in rates]}


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--writers", default="c,batch,tuned,loop,pure")
    parser.add_argument("--sinks", default="pipe,socket,file")
    parser.add_argument("--placements", default="split,free")
    parser.add_argument("--no-read", action="store_true", help="skip the restore rows")
    parser.add_argument("--child-write", help=argparse.SUPPRESS)
    parser.add_argument("--child-read", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--huge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ram-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_write:
        print(json.dumps(child_write(args.child_write, args.image, args.fd)))
        return 0
    if args.child_read:
        print(json.dumps(child_read(args.child_read, args.ram_size, args.huge)))
        return 0

    size = parse_size(args.size)
    cref = build_cref()
    writers = args.writers.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qfram-bench-", dir="/dev/shm") as tmp:
        workdir = Path(tmp)
        image = workdir / "image"
        from qfram.lab.demo import fill_demo
        with open(image, "wb") as f:
            f.truncate(size - size % PAGE)
        with open(image, "r+b") as f:
            with mmap.mmap(f.fileno(), 0) as m:
                fill_demo(m)
        run_writer(cref, "c", "file", image, workdir, "free")      # the warm-up
        for placement in args.placements.split(","):
            for sink in args.sinks.split(","):
                # writers take turns in a new random order each round, so that no one
                # always runs right after another (page cache and allocator state)
                results = {w: [] for w in writers}
                for rnd in range(args.repeat):
                    order = [w for w in writers if w != "pure" or rnd == 0]
                    random.shuffle(order)
                    for writer in order:
                        results[writer].append(
                            run_writer(cref, writer, sink, image, workdir, placement))
                for writer in writers:
                    row = median_row(results[writer], sink=sink, writer=writer,
                                     placement=placement)
                    if sink == "file":
                        row["sha256"] = results[writer][-1]["sha256"]
                    rows.append(row)
                    note(f"  {placement:5} {sink:6} {writer:6} {row['gbps']:.3f} GB/s")
        # every writer must have written the same bytes (pure: a prefix of the RAM)
        sums = {r["writer"]: r["sha256"] for r in rows if "sha256" in r and r["writer"] != "pure"}
        identical = len(set(sums.values())) <= 1
        if not args.no_read:
            stream = workdir / "stream"
            ram = size - size % PAGE
            os.truncate(stream, 0)                 # a clean stream from the C writer
            run_writer(cref, "c", "file", image, workdir, "free")
            for huge in (False, True):
                target = "fresh-thp" if huge else "fresh-4k"
                for reader in ("c", "batch"):
                    results = []
                    for _ in range(args.repeat):
                        if reader == "c":
                            cmd = [str(cref), "read", str(stream), str(ram), "1" if huge else "0"]
                        else:
                            cmd = [sys.executable, __file__, "--child-read", str(stream),
                                   "--ram-size", str(ram)]
                            cmd += ["--huge"] if huge else []
                        results.append(run_json(cmd, cpu=0))
                    row = median_row(results, sink=f"restore:{target}", writer=reader,
                                     placement="pinned")
                    rows.append(row)
                    note(f"  restore {target:9} {reader:6} {row['gbps']:.3f} GB/s")

    refs = {(r["sink"], r["placement"]): r["gbps"] for r in rows if r["writer"] == "c"}
    for r in rows:
        ref = refs.get((r["sink"], r["placement"]))
        r["ratio"] = round(r["gbps"] / ref, 3) if ref else None
    report = {"size": size, "repeat": args.repeat, "identical_streams": identical,
              "cpu": os.cpu_count(), "rows": rows}
    lines = [f"RAM {size >> 20} MiB, median of {args.repeat}; streams identical across "
             f"writers: {identical}",
             f"{'placement':10} {'sink':18} {'writer':7} {'GB/s':>7} {'ratio':>6}"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"{r['placement']:10} {r['sink']:18} {r['writer']:7} {r['gbps']:7.3f} "
                     f"{ratio:>6}")
    emit(args, report, lines)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
