#!/usr/bin/env bash
# Every benchmark of the project, each against its reference in the same run, into one
# markdown report: benchmarks/REPORT.md (the README links it).
#   scripts/bench_all.sh [--size 1G] [--repeat 3]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
SIZE=1G; REPEAT=3
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2;;
        --repeat) REPEAT=$2; shift 2;;
        *) echo "usage: $0 [--size 1G] [--repeat 3]" >&2; exit 2;;
    esac
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PY=.venv/bin/python
echo "core throughput..." >&2
$PY scripts/bench_throughput.py --size "$SIZE" --repeat "$REPEAT" --json > "$out/throughput.json"
echo "snapshots..." >&2
$PY scripts/bench_snapshot.py --size "$SIZE" --repeat "$REPEAT" --json > "$out/snapshot.json"
echo "postcopy..." >&2
$PY scripts/bench_postcopy.py --size "$SIZE" --repeat "$REPEAT" --json > "$out/postcopy.json"
echo "QEMU extract..." >&2
command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
$PY scripts/bench_extract.py --size 512M --repeat "$REPEAT" --json > "$out/extract.json" \
    || echo '{"skipped": "analyze-migration.py or QEMU unavailable"}' > "$out/extract.json"
mkdir -p benchmarks
$PY - "$out" "$SIZE" "$REPEAT" > benchmarks/REPORT.md <<'PY'
import json, os, platform, sys, time
out, size, repeat = sys.argv[1], sys.argv[2], sys.argv[3]
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
tp, sn, pc, ex = load("throughput"), load("snapshot"), load("postcopy"), load("extract")
print("# qfram benchmark report\n")
print(f"`scripts/bench_all.sh --size {size} --repeat {repeat}` on {platform.node()} "
      f"({os.cpu_count()} CPUs, Linux {platform.release()}), "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.  Medians; every ratio is "
      f"against a reference run in the same run.  These 2-core VMs vary 2x run to run.\n")
print("## Core: page records into a sink (ratio to the C reference, QEMU's algorithm)\n")
print(f"Streams identical across writers: {tp['identical_streams']}\n")
print("| placement | sink | writer | GB/s | ratio |\n|---|---|---|---|---|")
for r in tp["rows"]:
    print(f"| {r['placement']} | {r['sink']} | {r['writer']} | {r['gbps']} | {r['ratio']} |")
print("\n## Snapshots (tmpfs; ratio to the C writer/reader, or to cp)\n")
print("| group | what | GB/s | ratio | reference |\n|---|---|---|---|---|")
for r in sn["rows"]:
    print(f"| {r['group']} | {r['what']} | {r['gbps']} | {r['ratio']} | {r['reference']} |")
print("\nLazy restore, first touch of a missing page:\n")
print("| background fill | spin | touch p50 µs | p99 | max | handler p99 |\n|---|---|---|---|---|---|")
for r in sn["lazy"]:
    t, h = r["touch"], r["handler"]
    print(f"| {r['background']} | {r['spin_us']} | {t['p50_us']} | {t['p99_us']} | "
          f"{t['max_us']} | {h['p99_us']} |")
sys.path.insert(0, "scripts")
from bench_postcopy import markdown as postcopy_section
print()
print(postcopy_section(pc))
print("\n## Extracting RAM from a real QEMU stream\n")
if "skipped" in ex:
    print(f"skipped: {ex['skipped']}")
else:
    print(f"{ex['memory'] >> 20} MiB guest, {ex['stream_bytes'] >> 20} MiB stream: qfram "
          f"{ex['seconds']['qfram']} s, analyze-migration.py {ex['seconds']['analyze-migration']}"
          f" s: **{ex['speedup']}x**, pc.ram identical.")
PY
echo "restoring like a sandbox platform..." >&2
{ echo; $PY scripts/bench_restore.py --size "$SIZE" --repeat "$REPEAT" --markdown; } \
    >> benchmarks/REPORT.md
echo "benchmarks/REPORT.md" >&2
