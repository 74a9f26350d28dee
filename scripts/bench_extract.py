#!/usr/bin/env python3
"""Extraction speed: ``qfram extract`` against QEMU's own ``analyze-migration.py -x`` on
the migration stream of a real guest, in the same run.

A QEMU guest (``-machine pc -m 512M``, TCG, stopped) gets a demo image (zero, text and
random pages) loaded into its RAM with ``-device loader`` and is migrated to a file; both
tools then extract the RAM blocks from that file (each as a whole command, startup
included) and the ``pc.ram`` files they write are compared.  analyze-migration.py comes
from $QEMU_ANALYZE_MIGRATION, or is fetched from Debian's qemu source package by
scripts/fetch_analyze_migration.sh (never vendored).

    scripts/bench_extract.py [--memory 512M] [--repeat 3] [--json]
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

from benchlib import arguments, emit, parse_size  # noqa: E402

from qfram._testing.qmp import Guest, find_qemu  # noqa: E402
from qfram.lab.demo import fill_demo  # noqa: E402


def analyzer() -> str:
    path = os.environ.get("QEMU_ANALYZE_MIGRATION")
    if path:
        return path
    out = subprocess.run([str(HERE / "fetch_analyze_migration.sh")], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"analyze-migration.py unavailable: {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]


def timed(cmd, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = arguments(__doc__, size="512M")
    args = parser.parse_args()
    if find_qemu() is None:
        raise SystemExit("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    script = analyzer()
    memory = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="qfram-extract-") as tmp:
        work = Path(tmp)
        image = bytearray(memory - (32 << 20))           # leave the low 16 MiB and some room
        fill_demo(image)
        (work / "image.bin").write_bytes(image)
        with Guest(memory=args.size, extra=["-device", f"loader,file={work / 'image.bin'},"
                                                         f"addr={16 << 20},force-raw=on"]) as g:
            g.migrate_to_file(str(work / "stream.bin"), timeout=600)
        stream_bytes = os.path.getsize(work / "stream.bin")
        times = {"qfram": [], "analyze-migration": []}
        for i in range(args.repeat):
            out_q = work / f"q{i}"
            out_a = work / f"a{i}"
            out_a.mkdir()
            times["qfram"].append(timed([sys.executable, "-m", "qfram", "extract",
                                         str(work / "stream.bin"), str(out_q)], cwd=work))
            times["analyze-migration"].append(timed([sys.executable, script, "-x", "-f",
                                                     str(work / "stream.bin")], cwd=out_a))
            same = (out_q / "pc.ram").read_bytes() == (out_a / "pc.ram").read_bytes()
            if not same:
                raise SystemExit("qfram and analyze-migration.py extracted different pc.ram")
        med = {k: statistics.median(v) for k, v in times.items()}
    report = {"memory": memory, "stream_bytes": stream_bytes, "repeat": args.repeat,
              "seconds": {k: round(v, 3) for k, v in med.items()},
              "speedup": round(med["analyze-migration"] / med["qfram"], 1),
              "same_pc_ram": True, "analyze_migration": script}
    emit(args, report, [
        f"guest RAM {memory >> 20} MiB, stream {stream_bytes / 2**20:.0f} MiB, median of "
        f"{args.repeat}, whole commands:",
        f"  qfram extract               {med['qfram']:8.3f} s",
        f"  analyze-migration.py -x     {med['analyze-migration']:8.3f} s",
        f"  speedup {report['speedup']}x; pc.ram identical"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
