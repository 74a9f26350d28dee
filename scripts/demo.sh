#!/usr/bin/env bash
# The main job on an embedded default: save a 1 GiB demo guest RAM (zero, text and
# random pages) with page release on — RSS falls while it saves — in the stream and
# mapped layouts, restore it eagerly and lazily (userfaultfd), verify the checksums;
# save it chunked (compressed, still random-access) and restore that lazily; reset a
# copy-on-write mapping 100 times; print a table of sizes, times and throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
SIZE=${QFRAM_DEMO_SIZE:-1G}
out=$(mktemp -d /dev/shm/qfram-demo.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$out"' EXIT
qfram() { .venv/bin/python -m qfram "$@"; }
step() { echo; echo "== qfram $*"; }

step save --demo "$SIZE" ram.stream --release
qfram save --demo "$SIZE" "$out/ram.stream" --release --json-out "$out/1-save-stream.json"
step save --demo "$SIZE" ram.mapped --layout mapped --release
qfram save --demo "$SIZE" "$out/ram.mapped" --layout mapped --release \
    --json-out "$out/2-save-mapped.json"
step info ram.mapped
qfram info "$out/ram.mapped"
step load ram.stream
qfram load "$out/ram.stream" --json-out "$out/3-load-stream.json"
step load ram.mapped
qfram load "$out/ram.mapped" --json-out "$out/4-load-mapped.json"
step load ram.mapped --lazy
qfram load "$out/ram.mapped" --lazy --json-out "$out/5-load-lazy.json"
step save --demo "$SIZE" ram.chunked --layout chunked --codec lz4
qfram save --demo "$SIZE" "$out/ram.chunked" --layout chunked \
    --json-out "$out/6-save-chunked.json"
step load ram.chunked --lazy
qfram load "$out/ram.chunked" --lazy --json-out "$out/7-load-chunked-lazy.json"
step load ram.mapped --reset-loop 100 --dirty-pages 100
qfram load "$out/ram.mapped" --reset-loop 100 --dirty-pages 100

echo
.venv/bin/python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
mib = lambda n: f"{n / 2**20:,.0f} MiB"
print(f"{'step':28} {'file':>10} {'seconds':>8} {'GB/s':>6} {'RSS before':>11} {'after':>9}  check")
for name in sorted(os.listdir(out)):
    if not name.endswith(".json"):
        continue
    r = json.load(open(os.path.join(out, name)))
    step = name[2:-5]
    layout = next(k for k in ("stream", "chunked", "mapped") if k in step or k == "mapped")
    file_bytes = r.get("file_bytes") or os.path.getsize(os.path.join(out, "ram." + layout))
    gbps = r.get("gbps") or round(r["ram_bytes"] / r["seconds"] / 1e9, 3)
    check = "verified" if r.get("verified") else ""
    if "faults" in r:
        check += f", {r['faults']} faults, p99 {r['handler_latency']['p99_us']} us"
    before, after = r.get("rss_before"), r.get("rss_after")
    print(f"{step:28} {mib(file_bytes):>10} {r['seconds']:8.3f} {gbps:6.2f} "
          f"{mib(before) if before else '':>11} {mib(after) if after else '':>9}  {check}")
PY
