#!/usr/bin/env python3
"""Every memory-footprint scenario in one batch: time series (CSV/JSON), a plot per run
and a markdown report in --out.

    scripts/experiments/footprint.py --quick --out DIR      # 64 MiB, one run each
    scripts/experiments/footprint.py --out DIR              # 1 GiB, three runs each
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qfram.lab import footprint  # noqa: E402
from qfram._util.text import parse_size  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run each")
    parser.add_argument("--size", type=parse_size, help="RAM per scenario (default 1G)")
    parser.add_argument("--repeat", type=int, help="runs per scenario (default 3)")
    parser.add_argument("--scenarios", default="all")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    size = args.size or parse_size("64M" if args.quick else "1G")
    repeat = args.repeat or (1 if args.quick else 3)
    names = list(footprint.SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    footprint.run_experiments(names, size, args.out, repeat,
                              "scripts/experiments/footprint.py " + " ".join(sys.argv[1:]),
                              lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
