#!/usr/bin/env bash
# Installs what notifyfs and its tests need on a Debian machine (run as root):
# Debian packages, then a virtual environment in .venv with notifyfs and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
pkgs=(fuse3 inotify-tools attr git gcc libc6-dev linux-libc-dev python3 python3-venv python3-pip)
# the VM tests (tests/vm): QEMU (with virtiofsd), and what builds the guest image
pkgs+=(qemu-system-x86 debootstrap e2fsprogs)
# the TLS tests make their certificates with openssl; the fsync test watches the server with strace
pkgs+=(openssl strace)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,dev,bench]'
# coverage-guided fuzzing (tests/test_fuzz.py); wheels exist for common Pythons only, and the
# tests fall back to seeded random inputs without it
.venv/bin/python -m pip install -q atheris >/dev/null 2>&1 || echo "atheris not available: fuzz tests use random inputs"
