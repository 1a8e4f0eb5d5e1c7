#!/usr/bin/env bash
# Build dependencies of the patched QEMU (qemu-patches/build.sh). Idempotent.
set -euo pipefail
if meson --version 2>/dev/null | awk -F. '{exit !($1>1 || ($1==1 && $2>=5))}' \
   && dpkg -s python3-pycotap libfdt-dev libglib2.0-dev libgnutls28-dev libpixman-1-dev ninja-build flex bison dpkg-dev >/dev/null 2>&1; then
  exit 0
fi
bash "$(dirname "$0")/../scripts/setup-host.sh" >/dev/null   # adds bookworm-backports
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends ninja-build libglib2.0-dev libpixman-1-dev libslirp-dev \
  python3-venv flex bison dpkg-dev libfdt-dev libgnutls28-dev
apt-get install -y -q --no-install-recommends -t bookworm-backports meson python3-pycotap
