"""The ``qfram`` command.  Results go to stdout (``--json`` for scripts), progress and
notes to stderr.

Each command family lives in its own module (snapshots, migration, qemu, lab) and
imports the subsystem it drives only when one of its commands runs: building the parser
loads nothing but argparse, so ``qfram --help`` starts in a blink.
"""
from __future__ import annotations

import argparse
import sys

from qfram._util.text import printable
from qfram.cli import lab, migration, qemu, server, snapshots, store
from qfram.errors import QFramError

# typing is not imported at run time: it costs every command ~2 ms (see
# scripts/bench_cli_start.py); annotations are strings (PEP 563)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

FAMILIES = (snapshots, store, server, migration, qemu, lab)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser, or, with ``only``, every command's name and help but only that
    command's arguments: building all of them is most of what ``qfram --help`` costs."""
    parser = argparse.ArgumentParser(prog="qfram", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        for name, (help_text, add_arguments) in family.COMMANDS.items():
            p = sub.add_parser(name, help=help_text, description=help_text)
            if only is None or only == name:
                add_arguments(p)
    return parser


def _command_in(argv: List[str]) -> Optional[str]:
    """The command argv names (its first word that is not an option), if it names one."""
    for word in argv:
        if not word.startswith("-"):
            known = any(word in family.COMMANDS for family in FAMILIES)
            return word if known else None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, run the command, and say why it failed in one line (exit 1): every failure
    qfram expects is a QFramError or an OSError with its errno."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    args = build_parser(only=command or "").parse_args(argv)
    try:
        return args.func(args)
    except (QFramError, OSError) as exc:
        print(f"qfram {args.command}: {printable(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
