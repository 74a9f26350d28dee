#!/usr/bin/env bash
# Fetch Debian's kernel (linux-image-amd64) into .cache/guest-kernel, for the test that
# restores a real Linux guest into QEMU.  Nothing is installed: apt downloads the
# package, dpkg-deb unpacks only the kernel image.  Best effort: on failure the test
# says why it skips (.cache/guest-kernel.failed).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/guest-kernel
[ -f "$dest/vmlinuz" ] && exit 0
mkdir -p "$dest"
fail() { echo "$*" > "$dest.failed"; exit 0; }
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || fail "no apt-get/dpkg-deb"
package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$package" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$package" ] || fail "apt knows no linux-image-amd64"
(cd "$dest" && apt-get download -qq "$package" >"$PWD/log" 2>&1) || fail "$(tail -n 2 "$dest/log")"
deb=$(ls "$dest"/*.deb | head -n 1)
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dest" --wildcards './boot/vmlinuz-*'
mv "$dest"/boot/vmlinuz-* "$dest/vmlinuz"
rm -rf "$dest/boot" "$deb" "$dest/log"
rm -f "$dest.failed"
echo "setup: guest kernel for the QEMU restore test: $package" >&2
