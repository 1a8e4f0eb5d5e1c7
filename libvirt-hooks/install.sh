#!/usr/bin/env bash
# Installs the DWCP libvirt hook: copies qemu.d/dwcp to $DESTDIR/hooks/qemu.d/
# (DESTDIR defaults to /etc/libvirt) and a default dwcp.conf if there is none;
# and the AppArmor snippet for libvirt's QEMU profile to
# $APPARMOR_DIR/abstractions/libvirt-qemu.d/dwcp (APPARMOR_DIR defaults to
# /etc/apparmor.d; skipped when that directory does not exist and
# APPARMOR_DIR is not given).
# libvirtd reads hooks at start: restart it after the first install.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-/etc/libvirt}
install -d -m 755 "$dest/hooks/qemu.d"
install -m 755 "$src/qemu.d/dwcp" "$dest/hooks/qemu.d/dwcp"
[ -e "$dest/hooks/dwcp.conf" ] || install -m 644 "$src/dwcp.conf" "$dest/hooks/dwcp.conf"
echo "installed $dest/hooks/qemu.d/dwcp"
aa=${APPARMOR_DIR:-/etc/apparmor.d}
if [ -n "${APPARMOR_DIR:-}" ] || [ -d "$aa" ]; then
  install -d -m 755 "$aa/abstractions/libvirt-qemu.d"
  install -m 644 "$src/apparmor/libvirt-qemu.d-dwcp" "$aa/abstractions/libvirt-qemu.d/dwcp"
  echo "installed $aa/abstractions/libvirt-qemu.d/dwcp (AppArmor: QEMU may use /run/dwcp sockets)"
fi
