#!/usr/bin/env bash
# Build dependencies of the patched libvirt (libvirt-patches/build.sh). Idempotent.
# Not `apt-get build-dep libvirt`: that pulls ~150 packages for drivers and
# docs the minimal build leaves out. What the minimal build needs:
#   meson ninja-build gcc pkg-config   the build
#   libglib2.0-dev libgnutls28-dev libxml2-dev libjson-c-dev libtirpc-dev
#                                      required libraries (json-c: the QEMU
#                                      driver; tirpc: the remote driver)
#   libnl-3-dev libnl-route-3-dev      libvirt 11.3 does not build on Linux
#                                      without libnl (virnetdevbridge.c)
#   xsltproc libxml2-utils perl python3   programs meson requires
set -euo pipefail
pkgs="meson ninja-build gcc pkg-config libglib2.0-dev libgnutls28-dev libxml2-dev
  libjson-c-dev libtirpc-dev libnl-3-dev libnl-route-3-dev xsltproc libxml2-utils perl python3"
# shellcheck disable=SC2086
if dpkg -s $pkgs >/dev/null 2>&1; then
  exit 0
fi
bash "$(dirname "$0")/../scripts/setup-host.sh" >/dev/null   # adds bookworm-backports
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $pkgs
