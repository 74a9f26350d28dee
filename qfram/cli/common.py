"""What every command shares: how results are printed (text, or one JSON object with
``--json``), progress on a terminal, and the options several commands take."""
from __future__ import annotations

import argparse
import sys
import time

from qfram._util.text import human
from qfram._util.text import parse_size as _parse_size
from qfram.errors import OptionError

# typing is not imported at run time: it costs every command ~2 ms (see
# scripts/bench_cli_start.py); annotations are strings (PEP 563)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional


def parse_size(text: str) -> int:
    """A size option: what _util.text.parse_size reads, its complaint in argparse's
    words."""
    try:
        return _parse_size(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rss() -> int:
    import psutil        # here, not at import: every command starts faster
    return psutil.Process().memory_info().rss


def emit(args: argparse.Namespace, result: dict, text: str, to=None) -> None:
    """Results go to stdout: one JSON object with --json, else the text; --json-out FILE
    also writes the JSON object to FILE (for scripts that show the text)."""
    import json
    if getattr(args, "json_out", None):
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result) if args.json else text, file=to or sys.stdout)


class Progress:
    """A progress bar on stderr, only when stderr is a terminal; it also samples RSS so
    that a save with --release shows the footprint falling."""

    def __init__(self, label: str, enabled: Optional[bool] = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0
        self.rss_trace: List[List[float]] = []

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if not self.rss_trace or fraction - self.rss_trace[-1][0] >= 0.1 or done == total:
            self.rss_trace.append([round(fraction, 2), rss()])
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or done == total):
            self.last = now
            bar = "#" * int(fraction * 30)
            print(f"\r{self.label} [{bar:<30}] {fraction * 100:5.1f}% "
                  f"{human(done)} / {human(total)}  RSS {human(rss())}", end="",
                  file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON object to FILE")


WORKING_SET_SWITCHES = (
    ("prefetch", "place the recorded working set (SNAPSHOT.ws) first, when there is one "
                 "that fits"),
    ("record", "once complete, record the pages touched first in SNAPSHOT.ws"),
)
LAZY_SWITCHES = WORKING_SET_SWITCHES + (
    ("background", "fill what is not touched in the background (--no-background "
                   "--window 1 records the exact working set)"),
)


def add_switches(p: argparse.ArgumentParser, switches, prefix: str = "") -> None:
    for name, what in switches:
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True,
                       help=prefix + what)


def source_ram(args: argparse.Namespace):
    """The RAM a command moves: the embedded demo (--demo SIZE), or memory files
    ('PATH' or 'NAME=PATH', mapped shared)."""
    from qfram.lab.demo import fill_demo
    from qfram.ram import RAMBlock, RAMList
    if args.demo:
        block = RAMBlock.anonymous(args.block, args.demo, huge=False)
        fill_demo(block.region)
        return RAMList([block])
    return RAMList.from_files(args.sources, args.block)
