#!/usr/bin/env python3
"""A real Linux guest restored into QEMU: QEMU's own eager load against `qfram
restore-qemu`, from the same saved VM, in the same run.

For each size, a guest with that much RAM (Debian's kernel, TCG) fills half of it with
a pattern and walks it for ever (qfram._testing.linux); QEMU saves it (`migrate
exec:cat`), qfram makes the mapped snapshot (`qfram rewrite --layout mapped`).  Then,
--repeat times each, into a fresh QEMU started with -incoming defer:

* eager: `migrate-incoming exec:cat STREAM` (QEMU 7.2 cannot load anything else), then
  `cont` (the saved VM was stopped: an eager load keeps that run state);
* qfram (API): `qfram.qemu.restore.restore(SNAPSHOT, qmp=...)` in this process;
* qfram (CLI): `qfram restore-qemu SNAPSHOT --qmp ...` started as a new process, as a
  user runs it — its time includes the interpreter's start and the command's imports.

Reported: time to running (eager: completed; qfram: postcopy-active), time to
completed, and the guest's own time to finish its next walk of the filled memory (the
first QFRAM SUM line on its serial port after the restore began).  Medians and spreads.

    scripts/bench_qemu_restore.py [--size 1G,4G] [--repeat 5] [--json]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchlib import arguments, emit, note, parse_size  # noqa: E402

from qfram._testing import linux  # noqa: E402
from qfram._testing.qmp import Guest  # noqa: E402
from qfram.errors import NoGuest  # noqa: E402
from qfram.qemu import restore  # noqa: E402

PY = sys.executable
QFRAM = str(HERE.parent / ".venv" / "bin" / "qfram")


def saved_guest(work: str, size: int):
    """Boot, fill half the RAM, save: (QEMU arguments, stream path, snapshot path)."""
    fill = size // 2 >> 20
    args = linux.guest_arguments(work, fill)
    memory = f"{size >> 20}M"
    serial = os.path.join(work, "serial-save.log")
    with Guest(memory=memory, running=True, extra=args + ["-serial", f"file:{serial}"],
               timeout=600) as guest:
        linux.wait_line(serial, "QFRAM READY", timeout=1200)
        linux.wait_line(serial, "QFRAM SUM", timeout=600)
        guest.cmd("stop")
        stream_path = os.path.join(work, "vm.stream")
        guest.migrate_to_file(stream_path, timeout=1200)
    snap = os.path.join(work, "vm.mapped")
    subprocess.run([PY, "-m", "qfram", "rewrite", stream_path, snap, "--layout", "mapped"],
                   check=True, capture_output=True)
    return args, memory, stream_path, snap


def next_walk(serial: str, t0: float) -> float:
    linux.wait_line(serial, "QFRAM SUM", timeout=600)
    return time.perf_counter() - t0


def eager(work: str, args, memory: str, stream_path: str, run: int) -> dict:
    serial = os.path.join(work, f"serial-eager-{run}.log")
    with Guest(memory=memory, running=True, incoming="defer", timeout=600,
               extra=args + ["-serial", f"file:{serial}"]) as guest:
        t0 = time.perf_counter()
        guest.cmd("migrate-incoming", uri=f"exec:cat {stream_path}")
        while guest.cmd("query-migrate").get("status") != "completed":
            time.sleep(0.001)
        # the saved VM was stopped, and an eager load keeps the saved run state (a
        # postcopy RUN starts the guest): resume it, as its user would
        if guest.cmd("query-status")["status"] != "running":
            guest.cmd("cont")
        done = time.perf_counter() - t0
        walk = next_walk(serial, t0)
    return {"running_s": done, "completed_s": done, "walk_s": walk}


def lazy(work: str, args, memory: str, snap: str, run: int) -> dict:
    serial = os.path.join(work, f"serial-qfram-{run}.log")
    with Guest(memory=memory, running=True, incoming="defer", timeout=600,
               extra=args + ["-serial", f"file:{serial}"]) as guest:
        t0 = time.perf_counter()
        stats = restore.restore(snap, qmp=guest.spare_qmp_path, timeout=600)
        walk = next_walk(serial, t0)
    return {"running_s": stats.postcopy_active_ms / 1000, "completed_s": stats.completed_s,
            "walk_s": walk, "requested": stats.pages_requested,
            "service_p99_us": stats.request_service.p99_us}


def cli(work: str, args, memory: str, snap: str, run: int) -> dict:
    """`qfram restore-qemu` as a new process; running = QEMU says postcopy-active (polled
    on the guest's own monitor, 1 ms apart)."""
    serial = os.path.join(work, f"serial-cli-{run}.log")
    with Guest(memory=memory, running=True, incoming="defer", timeout=600,
               extra=args + ["-serial", f"file:{serial}"]) as guest:
        t0 = time.perf_counter()
        proc = subprocess.Popen([QFRAM, "restore-qemu", snap, "--qmp", guest.spare_qmp_path,
                                 "--timeout", "600", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running = None
        while running is None and proc.poll() is None:
            if guest.cmd("query-migrate").get("status") in ("postcopy-active", "completed"):
                running = time.perf_counter() - t0
            else:
                time.sleep(0.001)
        out, err = proc.communicate(timeout=600)
        done = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"qfram restore-qemu failed: {err.strip()[-500:]}")
        walk = next_walk(serial, t0)
    return {"running_s": running if running is not None else done, "completed_s": done,
            "walk_s": walk}


def describe(text: str, size: int, repeat: int, row: dict) -> str:
    return (f"{text} guest ({size // 2 >> 20} MiB filled), median of {repeat}: QEMU's "
            f"eager load {row['eager_completed_s']} s to running; qfram running after "
            f"{row['qfram_running_s'] * 1000:.1f} ms ({row['running_ratio']}x), complete "
            f"after {row['qfram_completed_s']} s ({row['completed_ratio']}x); from the "
            f"command line running after {row['cli_running_s'] * 1000:.1f} ms "
            f"({row['cli_running_ratio']}x); the guest's "
            f"next walk done after {row['eager_walk_s']} s (eager) vs "
            f"{row['qfram_walk_s']} s (qfram)")


def main() -> int:
    parser = arguments(__doc__, size="1G,4G", repeat=5)
    args = parser.parse_args()
    if not os.path.exists(linux.KERNEL):            # as the tests do: fetch it once
        subprocess.run([str(HERE / "fetch_guest_kernel.sh")], check=False)
    try:
        return measure(args)
    except NoGuest as exc:
        print(f"bench_qemu_restore: {exc}; run scripts/fetch_guest_kernel.sh (it needs "
              f"Debian's package mirror) and try again", file=sys.stderr)
        return 1


def measure(args) -> int:
    med = statistics.median
    report = {"repeat": args.repeat, "accel": "tcg", "sizes": {}}
    lines = []
    for text in args.size.split(","):
        size = parse_size(text)
        with tempfile.TemporaryDirectory(prefix="qfram-bench-qemu-") as work:
            note(f"{text}: booting and filling the guest, saving it")
            qargs, memory, stream_path, snap = saved_guest(work, size)
            runs = {"eager": [], "qfram": [], "cli": []}
            for run in range(args.repeat):
                runs["eager"].append(eager(work, qargs, memory, stream_path, run))
                runs["qfram"].append(lazy(work, qargs, memory, snap, run))
                runs["cli"].append(cli(work, qargs, memory, snap, run))
                note(f"  run {run}: eager {runs['eager'][-1]}, qfram {runs['qfram'][-1]}, "
                     f"cli {runs['cli'][-1]}")
        row = {}
        for kind, rs in runs.items():
            for key in ("running_s", "completed_s", "walk_s"):
                values = [r[key] for r in rs]
                row[f"{kind}_{key}"] = round(med(values), 4)
                row[f"{kind}_{key}_spread"] = [round(min(values), 4), round(max(values), 4)]
        row["qfram_requested_pages"] = med(r["requested"] for r in runs["qfram"])
        row["qfram_service_p99_us"] = med(r["service_p99_us"] for r in runs["qfram"])
        row["running_ratio"] = round(row["qfram_running_s"] / row["eager_running_s"], 3)
        row["completed_ratio"] = round(row["qfram_completed_s"] / row["eager_completed_s"], 3)
        row["cli_running_ratio"] = round(row["cli_running_s"] / row["eager_running_s"], 3)
        report["sizes"][text] = row
        lines.append(describe(text, size, args.repeat, row))
    emit(args, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
