#!/usr/bin/env bash
# Installs the DWCP libvirt hook: copies qemu.d/dwcp to $DESTDIR/hooks/qemu.d/
# (DESTDIR defaults to /etc/libvirt) and a default dwcp.conf if there is none.
# libvirtd reads hooks at start: restart it after the first install.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-/etc/libvirt}
install -d -m 755 "$dest/hooks/qemu.d"
install -m 755 "$src/qemu.d/dwcp" "$dest/hooks/qemu.d/dwcp"
[ -e "$dest/hooks/dwcp.conf" ] || install -m 644 "$src/dwcp.conf" "$dest/hooks/dwcp.conf"
echo "installed $dest/hooks/qemu.d/dwcp"
