#!/usr/bin/env bash
# `make deb-install-check`: install the packages of `make deb` with apt on this
# machine (the clean root of `make fresh-check`), check that each file is where
# Debian expects it and that the installed command runs, then `make deb-check`
# (lintian, systemd-analyze verify). Changes the system: not for a workstation.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${CARGO_TARGET_DIR:-$root/target}/debian
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q lintian systemd >/dev/null
apt-get install -y -q "$out"/dwcp_*.deb "$out"/libdwcp0_*.deb "$out"/libdwcp-dev_*.deb
fail=0
want() { if [ -e "$1" ]; then echo "ok   $1"; else echo "MISSING $1"; fail=1; fi; }
want /usr/bin/dwcp
want /usr/lib/systemd/system/dwcp-agent.service
want /etc/dwcp/dwcp.toml
want /etc/default/dwcp
want /etc/libvirt/hooks/qemu.d/dwcp
want /usr/share/man/man1/dwcp.1.gz
want /usr/share/bash-completion/completions/dwcp
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
want "/usr/lib/$arch/libdwcp.so.0"
want "/usr/lib/$arch/libdwcp.so"
want "/usr/lib/$arch/pkgconfig/dwcp.pc"
want /usr/include/dwcp.h
dpkg -L dwcp libdwcp0 libdwcp-dev | grep -E '^/(home|work|root|tmp)/' && { echo "package ships a build-machine path"; fail=1; }
dwcp --version
dwcp config check /etc/dwcp/dwcp.toml
pkg-config --modversion dwcp
[ "$fail" = 0 ] || { echo "install-check: files missing" >&2; exit 1; }
bash "$root/packaging/check-debs.sh"
echo "install-check: the three packages install and their files are in place"
