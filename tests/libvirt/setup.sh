#!/usr/bin/env bash
# Installs libvirt 11.3 (bookworm-backports) for the libvirt tests and the virt crate,
# ethtool for the lab's emulated link, patchelf, and openssh-server (the qemu+ssh test).
# Idempotent: a second run only checks. Run after scripts/setup-host.sh (which adds the
# bookworm-backports suite and QEMU 10.0).
set -euo pipefail
need=0
for bin in libvirtd virtlogd virsh; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need=1
done
pkg-config --exists libvirt 2>/dev/null || need=1
# ethtool: the lab's emulated link (LV_PROFILE, tests/libvirt/bench.sh) turns veth offloads off.
command -v ethtool >/dev/null 2>&1 || [ -x /usr/sbin/ethtool ] || need=1
# patchelf: run.sh's copy of the patched QEMU finds libdwcp beside itself
# (QEMU runs as libvirt-qemu, which cannot reach root's build cache).
command -v patchelf >/dev/null 2>&1 || need=1
# openssh-server: run.sh's qemu+ssh test runs an sshd inside a lab host
# (its own config and throwaway keys; the package's service is not started).
[ -x /usr/sbin/sshd ] || need=1
if [ "$need" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Don't let package scripts try to start services (no systemd here).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.dwcp
  [ -e /usr/sbin/policy-rc.d ] || { cp /usr/sbin/policy-rc.d.dwcp /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; rm_policy=1; }
  apt-get install -y -q --no-install-recommends -t bookworm-backports \
    libvirt-daemon libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev \
    pkg-config util-linux ethtool patchelf openssh-server
  [ "${rm_policy:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.dwcp
fi
echo "libvirt setup: $(/usr/sbin/libvirtd --version 2>/dev/null || libvirtd --version)"
