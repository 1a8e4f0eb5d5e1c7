#!/usr/bin/env bash
# Builds the DWCP test guest: OUTDIR/vmlinuz and OUTDIR/initrd.img (gzip cpio
# newc with busybox-static, /init and /bin/dwcp-workload), plus the host copy
# OUTDIR/dwcp-workload of the workload (for --selftest / --dump).
# Usage: tests/guest/build.sh [OUTDIR]     (default: $DWCP_GUEST_OUT, else tests/guest/out)
# Does nothing when the outputs are newer than all inputs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${DWCP_GUEST_OUT:-$here/out}}

fail() { echo "build.sh: error: $*" >&2; echo "build.sh: run 'make setup' (scripts/setup-host.sh) to install the host packages" >&2; exit 1; }

for tool in gcc cpio gzip find; do
  command -v "$tool" >/dev/null 2>&1 || fail "required tool '$tool' not found"
done
kernel=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$kernel" ] && [ -r "$kernel" ] || fail "no readable /boot/vmlinuz-*-cloud-amd64 (package linux-image-cloud-amd64)"
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then busybox=$b; break; fi
  if [ -x "$b" ] && ! command -v file >/dev/null 2>&1; then busybox=$b; break; fi
done
[ -n "$busybox" ] || fail "no statically linked busybox (package busybox-static)"
[ -r "$here/workload.c" ] && [ -r "$here/init" ] || fail "missing $here/workload.c or $here/init"
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || fail "static libc missing (package libc6-dev)"

mkdir -p "$out"
out=$(cd "$out" && pwd)
inputs=("$kernel" "$busybox" "$here/workload.c" "$here/init" "$here/build.sh")
outputs=("$out/vmlinuz" "$out/initrd.img" "$out/dwcp-workload")

uptodate=1
for o in "${outputs[@]}"; do
  [ -e "$o" ] || { uptodate=0; break; }
  for i in "${inputs[@]}"; do
    [ "$o" -nt "$i" ] || { uptodate=0; break 2; }
  done
done

if [ "$uptodate" = 0 ]; then
  gcc -O2 -static -Wall -Wextra -Werror -o "$out/dwcp-workload.tmp" "$here/workload.c" \
    || fail "compiling workload.c failed"
  mv -f "$out/dwcp-workload.tmp" "$out/dwcp-workload"

  root=$(mktemp -d "$out/initramfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
  cp "$busybox" "$root/bin/busybox"
  cp "$out/dwcp-workload" "$root/bin/dwcp-workload"
  cp "$here/init" "$root/init"
  chmod 755 "$root/init" "$root/bin/busybox" "$root/bin/dwcp-workload"
  # The kernel opens /dev/console for init before devtmpfs is mounted.
  if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
  fi
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -6 -n > "$out/initrd.img.tmp"
  mv -f "$out/initrd.img.tmp" "$out/initrd.img"
  cp -f "$kernel" "$out/vmlinuz"
  touch "$out/dwcp-workload" "$out/initrd.img" "$out/vmlinuz"
  echo "build.sh: built from $kernel and $busybox"
else
  echo "build.sh: up to date"
fi
echo "kernel:   $out/vmlinuz"
echo "initrd:   $out/initrd.img"
echo "workload: $out/dwcp-workload (host copy: --selftest, --dump FILE)"
