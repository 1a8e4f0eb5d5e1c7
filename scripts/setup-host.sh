#!/usr/bin/env bash
# Installs what DWCP's build, tests and demo need on a fresh Debian bookworm machine.
# `make demo` and `make test` run it; `make`, `make build` and `make install` never do.
# Idempotent: a second run only checks. QEMU 10.0 comes from bookworm-backports
# (bookworm's 7.2 corrupted guest memory in TCG migrations on this machine).
set -euo pipefail

need_apt=0
for bin in qemu-system-x86_64 busybox ip gcc pkg-config iptables prometheus promtool chromium protoc; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
ls /boot/vmlinuz-*cloud-amd64 >/dev/null 2>&1 || need_apt=1
[ -e /usr/lib/x86_64-linux-gnu/libzstd.so ] || need_apt=1
# The dwcp binary links libvirt (virt-sys finds it with pkg-config): without
# libvirt-dev the build stops, so it belongs here, not in the libvirt tests.
# protoc (protobuf-compiler) builds raft-proto's prost codec (dwcp-consensus).
pkg-config --exists libvirt 2>/dev/null || need_apt=1
qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.' || need_apt=1

if [ "$need_apt" = 1 ]; then
  if [ ! -e /etc/apt/sources.list.d/bookworm-backports.sources ]; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils
  # libvirt-dev from the same suite as the libvirt 11.3 daemon of the tests.
  apt-get install -y -q --no-install-recommends -t bookworm-backports libvirt-dev
  apt-get install -y -q --no-install-recommends \
    busybox-static iproute2 iputils-ping procps psmisc pkg-config gcc libc6-dev \
    linux-image-cloud-amd64 cpio gzip kmod libzstd-dev python3 iptables \
    prometheus chromium protobuf-compiler
fi
echo "setup-host: qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), kernel $(ls /boot/vmlinuz-*cloud-amd64 | tail -1)"
