"""The ``qfram`` command.  Results go to stdout (``--json`` for scripts), progress and
notes to stderr."""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from typing import List, Optional

import psutil

from qfram import channel, core
from qfram.demo import demo_ram

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4096', '512M', '4G', '1.5G' (binary units; a trailing 'B' or 'iB' is allowed)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[:-1] if unit else s
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 4G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return int(value * _UNITS[unit])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def rss() -> int:
    return psutil.Process().memory_info().rss


def map_source(path: str) -> mmap.mmap:
    """A memory file (e.g. /dev/shm/..., a VMM's mem-path) mapped shared, so that
    releasing sent pages frees them for its owner too."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def open_output(path: str) -> int:
    if path == "-":
        return os.dup(sys.stdout.fileno())
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream RAM as page records (QEMU's RAM record format) into a file or pipe."""
    if args.demo:
        region = demo_ram(args.demo)
    else:
        region = map_source(args.source)
    params = core.SEED_PARAMS if args.seed_params else {}
    rss_before = rss()
    out = channel.fdopen(open_output(args.output), "wb", **params)
    t0 = time.perf_counter()
    pages, zeros, _ = out.save_pages(region, may_free=args.release, idstr=args.block)
    out.put_be64(core.RAM_SAVE_FLAG_EOS)
    out.close()
    seconds = time.perf_counter() - t0
    rss_after = rss()
    result = {
        "ram_bytes": len(region), "stream_bytes": out.tell(), "pages": pages,
        "zero_pages": zeros, "seconds": round(seconds, 4),
        "gbps": round(len(region) / seconds / 1e9, 3),
        "released_bytes": out.released_bytes, "rss_before": rss_before,
        "rss_after": rss_after,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"streamed {human(len(region))} of RAM ({pages} pages, {zeros} zero) as "
              f"{human(out.tell())} in {seconds:.3f} s: {result['gbps']} GB/s")
        print(f"released {human(out.released_bytes)}; RSS {human(rss_before)} -> "
              f"{human(rss_after)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfram", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stream", help="stream RAM as page records into a file or pipe")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("source", nargs="?", help="a memory file to stream (mapped shared)")
    src.add_argument("--demo", type=parse_size, metavar="SIZE",
                     help="stream an embedded demo RAM of SIZE (e.g. 1G)")
    p.add_argument("output", help="output file, or - for stdout")
    p.add_argument("--release", action="store_true",
                   help="give each page back to the kernel once it is written")
    p.add_argument("--block", default="pc.ram", help="block name in the records")
    p.add_argument("--seed-params", action="store_true",
                   help="QEMU's flush points (64 iovecs, release every flush)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stream)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:
        print(f"qfram {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
