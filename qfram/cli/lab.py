"""The lab's command: footprint (what moving RAM costs in memory)."""
from __future__ import annotations

import argparse
import sys

from qfram._util.text import human
from qfram.cli.common import add_output_options, emit, parse_size
from qfram.errors import OptionError


def arguments_footprint(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="+",
                   help="scenario(s), or all: snapshot-release, snapshot-keep, "
                        "postcopy-release, postcopy-keep, memfd-release, file-release, "
                        "thp-release, zero-heavy, random, lazy-restore, eager-restore")
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario (the spread)")
    p.add_argument("--out", default="footprint-out", help="directory for the results")
    add_output_options(p)
    p.set_defaults(func=cmd_footprint)



def cmd_footprint(args: argparse.Namespace) -> int:
    """Run memory-footprint scenarios and write series, plots and a report."""
    from qfram.lab import footprint
    names = list(footprint.SCENARIOS) if args.scenario == ["all"] else args.scenario
    unknown = [n for n in names if n not in footprint.SCENARIOS]
    if unknown:
        raise OptionError(f"unknown scenario {unknown[0]!r}; try: "
                         f"{', '.join(footprint.SCENARIOS)} or all")
    note = (lambda line: print(line, file=sys.stderr)) if sys.stderr.isatty() else \
        (lambda line: None)
    rows = footprint.run_experiments(names, args.size, args.out, args.repeat,
                                     "qfram footprint " + " ".join(sys.argv[2:]), note)
    emit(args, {"out": args.out, "rows": rows},
         "\n".join(f"{r['scenario']} run {r['run']}: source USS peak "
                   f"{human(r['source_peak_uss'])} final {human(r['source_final_uss'])}; "
                   f"destination peak {human(r['destination_peak_uss'])} final "
                   f"{human(r['destination_final_uss'])}" for r in rows)
         + f"\nseries, plots and report.md in {args.out}")
    return 0


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "footprint": ("measure what moving RAM costs in memory", arguments_footprint),
}
