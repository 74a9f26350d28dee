#!/usr/bin/env bash
# The whole test suite, set-up included: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# real QEMU for the interoperability tests: Debian's (7.2), and a newer one (10.x, from
# bookworm-backports, unpacked under .cache) for mapped-ram, which needs 9.0+
command -v qemu-system-x86_64 >/dev/null 2>&1 || apt_install qemu-system-x86 || true
# iproute2 for the two-host (network namespace) postcopy test
command -v ip >/dev/null 2>&1 || apt_install iproute2 || true
scripts/fetch_qemu_backports.sh || true
# Debian's kernel, for the test that restores a real Linux guest into QEMU
scripts/fetch_guest_kernel.sh || true
exec .venv/bin/python -m pytest "$@"
