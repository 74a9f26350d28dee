#!/usr/bin/env bash
# Fetch QEMU's scripts/analyze-migration.py from Debian's qemu source package into
# .cache/qemu-src (for scripts/bench_extract.py; not vendored, not committed).  Prints the
# script's path.  Set QEMU_ANALYZE_MIGRATION to use another copy instead.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/qemu-src
found=$(find "$dest" -path '*/scripts/analyze-migration.py' 2>/dev/null | head -n 1 || true)
if [ -z "$found" ]; then
    mkdir -p "$dest/lists/partial"
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    echo "deb-src http://deb.debian.org/debian $codename main" > "$dest/sources.list"
    opts=(-o "Dir::Etc::SourceList=$PWD/$dest/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$PWD/$dest/lists" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" update -qq >&2
    (cd "$dest" && apt-get "${opts[@]}" source --download-only -qq qemu >&2)
    (cd "$dest" && tar -xJf qemu_*.orig.tar.xz --wildcards '*/scripts/analyze-migration.py')
    found=$(find "$dest" -path '*/scripts/analyze-migration.py' | head -n 1)
fi
echo "$PWD/$found"
