#!/usr/bin/env bash
# Fetch a newer QEMU (Debian bookworm-backports: 10.x) into .cache/qemu-backports, for
# the mapped-ram interoperability tests (mapped-ram is QEMU 9.0+; bookworm's own QEMU is
# 7.2).  Nothing is installed: apt downloads the packages with a private source list and
# dpkg unpacks them.  Best effort: on failure the tests that need it say why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/qemu-backports
[ -x "$dest/root/usr/bin/qemu-system-x86_64" ] && exit 0
command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "no apt-get/dpkg" > "$dest.failed" 2>/dev/null; exit 0; }
grep -q bookworm /etc/os-release 2>/dev/null || { mkdir -p .cache; echo "not Debian bookworm" > "$dest.failed"; exit 0; }
mkdir -p "$dest/lists/partial" "$dest/debs"
echo "deb http://deb.debian.org/debian bookworm-backports main" > "$dest/sources.list"
opts=(-o "Dir::Etc::SourceList=$PWD/$dest/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$PWD/$dest/lists" -o "APT::Sandbox::User=root")
if apt-get "${opts[@]}" update -qq >"$dest/log" 2>&1 &&
   (cd "$dest/debs" && apt-get "${opts[@]}" download -qq qemu-system-x86/bookworm-backports \
        qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports) >>"$dest/log" 2>&1; then
    for deb in "$dest"/debs/*.deb; do dpkg -x "$deb" "$dest/root"; done
    rm -f "$dest.failed"
    echo "setup: newer QEMU for mapped-ram tests: $("$dest/root/usr/bin/qemu-system-x86_64" --version | head -n 1)" >&2
else
    tail -n 3 "$dest/log" > "$dest.failed"
fi
