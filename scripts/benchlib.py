"""What every benchmark script shares: the C reference, its children's JSON, the image
in memory, medians with their spread, and the common command line."""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUILD = ROOT / "scripts" / ".build"


def build_cref() -> Path:
    """Compile the C reference (cc -O2) into scripts/.build, once per source change."""
    src = ROOT / "scripts" / "cref_writer.c"
    exe = BUILD / "cref_writer"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def parse_size(text: str) -> int:
    from qfram._util.text import parse_size as parse
    return parse(text)


def load_image(path: str, limit: int = 0) -> mmap.mmap:
    """The image in private anonymous memory, every page faulted in (outside timing)."""
    size = os.path.getsize(path)
    if limit:
        size = min(size, limit)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with open(path, "rb") as f:
        f.readinto(memoryview(region))
    return region


def pinner(cpu):
    """A preexec_fn pinning the child to ``cpu`` (None: the scheduler chooses)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run_json(cmd, pass_fds=(), cpu=None) -> dict:
    """Run a measuring child; its last stdout line is its JSON result."""
    out = subprocess.run(cmd, pass_fds=pass_fds, capture_output=True, text=True,
                         preexec_fn=pinner(cpu), timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gbps(run: dict) -> float:
    return run["bytes"] / run["seconds"] / 1e9


def median_gbps(runs: Iterable[dict]) -> float:
    return round(statistics.median(gbps(r) for r in runs), 3)


def spread(runs: Iterable[dict]) -> str:
    """The lowest and highest rate of the runs (these machines vary 2x run to run)."""
    rates = sorted(gbps(r) for r in runs)
    return f"{rates[0]:.2f}-{rates[-1]:.2f}"


def note(*parts) -> None:
    """Progress on stderr (stdout is the result)."""
    print(*parts, file=sys.stderr, flush=True)


def arguments(doc: str, size: str = "1G", repeat: int = 3) -> argparse.ArgumentParser:
    """The command line every benchmark takes: --size, --repeat, --json."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=size)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def emit(args: argparse.Namespace, report: dict, lines: List[str]) -> None:
    """The result on stdout: the JSON object with --json, else the text."""
    print(json.dumps(report) if args.json else "\n".join(lines))
