#!/usr/bin/env python3
"""How long the qfram command takes to start, against the interpreter's own start, in the
same run: `python -c pass`, `python -c "import qfram"`, `qfram --help`, and
`qfram load --help` (a command's own arguments).  Medians of --repeat runs (after one
warm-up run each, so that every .pyc exists) with the spread; the target is
`qfram --help` within 2x `python -c pass`.  Also which qfram subsystems `import qfram`
loads (it should load none of postcopy, qemu, lab, snapshot, nor matplotlib).

    scripts/bench_cli_start.py [--repeat 7] [--json]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, arguments, emit, note  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
QFRAM = str(ROOT / ".venv" / "bin" / "qfram")
HEAVY = ("qfram.postcopy", "qfram.qemu", "qfram.lab", "qfram.snapshot", "qfram.lazy",
         "matplotlib", "qfram._fast", "qfram._uffd")


def timed(cmd, env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    args = arguments(__doc__, repeat=7).parse_args()
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)      # a user's shell writes .pyc files
    cases = {
        "python_pass": [PYTHON, "-c", "pass"],
        "import_qfram": [PYTHON, "-c", "import qfram"],
        "qfram_help": [QFRAM, "--help"],
        "qfram_load_help": [QFRAM, "load", "--help"],
    }
    runs = {name: [] for name in cases}
    for cmd in cases.values():
        timed(cmd, env)                           # warm-up: .pyc files, page cache
    for _ in range(args.repeat):
        for name, cmd in cases.items():           # interleaved: noise hits all alike
            runs[name].append(timed(cmd, env))
    loaded = subprocess.run(
        [PYTHON, "-c", "import sys, qfram, json; print(json.dumps(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, check=True)
    modules = json.loads(loaded.stdout)
    heavy = sorted(m for m in modules if m.startswith(HEAVY))
    ms = {name: round(statistics.median(v) * 1000, 1) for name, v in runs.items()}
    spread = {name: f"{min(v) * 1000:.1f}-{max(v) * 1000:.1f}" for name, v in runs.items()}
    report = {
        "median_ms": ms, "spread_ms": spread, "repeat": args.repeat,
        "help_vs_python": round(ms["qfram_help"] / ms["python_pass"], 2),
        "target_help_vs_python": 2.0,
        "import_qfram_loads_heavy": heavy,
        "qfram_modules_on_import": sorted(m for m in modules if m.startswith("qfram")),
    }
    note(f"{args.repeat} runs each")
    emit(args, report, [
        *(f"{name:16} {ms[name]:6.1f} ms  ({spread[name]})" for name in cases),
        f"qfram --help = {report['help_vs_python']}x python -c pass (target <= 2x)",
        "import qfram loads: " + (", ".join(report["qfram_modules_on_import"])),
        "heavy modules on import qfram: " + (", ".join(heavy) or "none"),
    ])


if __name__ == "__main__":
    main()
