#!/usr/bin/env bash
# The main job on an embedded default: stream a 1 GiB demo guest RAM (zero, text and
# random pages) to a file with page release on, and show throughput and RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
out=$(mktemp -d /dev/shm/qfram-demo.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "== qfram stream --demo 1G $out/ram.stream --release"
.venv/bin/python -m qfram stream --demo 1G "$out/ram.stream" --release
echo "== the same without release: RSS stays"
.venv/bin/python -m qfram stream --demo 1G "$out/ram.stream"
