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

# a C compiler, the Python headers and OpenSSL's (TLS for the migration channels)
command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
[ -f /usr/include/openssl/ssl.h ] || apt_install libssl-dev
# the C codecs and hash the chunked layout's loops link
apt_install liblz4-dev libzstd-dev libxxhash-dev
# scripts/store.sh signs its readiness checks with curl
command -v curl >/dev/null 2>&1 || apt_install curl
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

# Python packages, all listed once in pyproject.toml: the build requirements first (the
# core is built without isolation, against them), then qfram with its test, plot and s3
# extras.  Redone only when pyproject.toml changes.
stamp=.venv/.qfram-pyproject
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python packages into .venv (from pyproject.toml)" >&2
    $VPY -c 'import tomllib' 2>/dev/null ||              # Python < 3.11 reads TOML with tomli
        $VPY -m pip install -q --disable-pip-version-check tomli >&2
    build_reqs=$($VPY -c 'import sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
    $VPY -m pip install -q --disable-pip-version-check $build_reqs >&2
    $VPY -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,plot,s3]" >&2
    echo "$want" > "$stamp"
fi

# the compiled modules: (re)built when one is missing or its sources are newer
stale=0
for module in _fast _uffd _tls _chunks _requests; do
    so=$(ls qfram/$module*.so 2>/dev/null | head -n 1 || true)
    if [ -z "$so" ] || [ -n "$(find qfram -name '*.pyx' -newer "$so" -o -name '*.pxd' -newer "$so" -o -name '*.pxi' -newer "$so" -o -name wire.py -newer "$so" | head -n 1)" ]; then
        stale=1
    fi
done
if [ "$stale" -eq 1 ] || ! $VPY -c 'import qfram' >/dev/null 2>&1; then
    echo "setup: building qfram's core" >&2
    $VPY -m pip install -q --disable-pip-version-check --no-build-isolation -e . >&2
fi
