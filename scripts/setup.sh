#!/usr/bin/env bash
# Make a working qfram checkout from a fresh Debian machine: system packages it needs,
# a virtual environment in .venv, the Python packages, and the compiled core.
# Sourced by demo.sh and test.sh; safe to run again (it only does what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
APT_UPDATED=0

apt_install() {
    # install Debian packages that are missing (root, or sudo when there is one)
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "setup: installing ${missing[*]} (apt-get)" >&2
    if [ "$APT_UPDATED" -eq 0 ]; then
        $sudo apt-get update -qq >&2
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
}

# a C compiler and the Python headers for the Cython core
command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
if ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    apt_install python3-dev
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        apt_install python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
VPY=.venv/bin/python

# Python packages: the build (Cython), the library (psutil), the tests
REQS="cython>=3.0 setuptools>=64 wheel psutil>=5.9 xxhash>=3 lz4>=4 pytest>=7 pytest-timeout hypothesis>=6 mypy>=1.5 typing_extensions matplotlib"
stamp=.venv/.qfram-reqs
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$REQS" ]; then
    echo "setup: installing Python packages into .venv" >&2
    $VPY -m pip install -q --disable-pip-version-check $REQS >&2
    echo "$REQS" > "$stamp"
fi

# the compiled core: (re)built when its sources are newer than the extension
so=$(ls qfram/_fast*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find qfram -name '*.pyx' -newer "$so" -o -name '*.pxd' -newer "$so" | head -n 1)" ] \
        || ! $VPY -c 'import qfram' >/dev/null 2>&1; then
    echo "setup: building qfram's core" >&2
    $VPY -m pip install -q --disable-pip-version-check --no-build-isolation -e . >&2
fi
