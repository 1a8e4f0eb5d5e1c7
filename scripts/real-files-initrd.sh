#!/bin/bash
# Usage: scripts/real-files-initrd.sh OUT.img [MiB]
#
# The test guest's initramfs (tests/guest/out/initrd.img) with MiB (default
# 256) of real files of this host appended as a second cpio archive under
# /realfiles: shared libraries and programs (/usr/lib/x86_64-linux-gnu,
# /usr/bin), and text (/usr/share/doc, /usr/share/perl5, /usr/share/X11/locale,
# ...). The kernel unpacks both archives into its RAM-backed root, so the
# guest's RAM holds those files beside the workload's own content.
# Use it with `dwcp benchmark floor|compare --guest-initrd OUT.img`.
# The content is this host's files: say which host when you quote a figure.
set -euo pipefail
out=${1:?usage: $0 OUT.img [MiB]}
mib=${2:-256}
root=$(cd "$(dirname "$0")/.." && pwd)
base=$root/tests/guest/out/initrd.img
[ -e "$base" ] || bash "$root/tests/guest/build.sh" "$root/tests/guest/out" >&2
command -v cpio >/dev/null || { echo "$0: cpio not found (apt-get install cpio)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
budget=$((mib << 20))
total=0
# Interleave binaries and text so the archive is a mix however it is cut.
paste -d '\n' \
    <(find /usr/lib/x86_64-linux-gnu /usr/bin /usr/libexec -xdev -type f -size -16M 2>/dev/null | sort) \
    <(find /usr/share/doc /usr/share/perl5 /usr/share/X11 /usr/share/i18n /usr/share/man /usr/include \
           -xdev -type f -size -16M 2>/dev/null | sort) |
while IFS= read -r f; do
    [ -n "$f" ] && [ -r "$f" ] || continue
    s=$(stat -c %s "$f")
    total=$((total + s))
    [ "$total" -le "$budget" ] || break
    echo "$f"
done > "$tmp/list" || true  # the loop stops early: SIGPIPE upstream is expected
mkdir -p "$tmp/root/realfiles"
# Copy under /realfiles (cpio wants relative paths of what it archives).
while IFS= read -r f; do
    d=$tmp/root/realfiles$(dirname "$f")
    mkdir -p "$d"
    cp -p "$f" "$d/"
done < "$tmp/list"
n=$(wc -l < "$tmp/list")
size=$(du -sm "$tmp/root" | cut -f1)
cp "$base" "$out.tmp"
(cd "$tmp/root" && find realfiles | sort | cpio -o -H newc --quiet) >> "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: the test guest's initramfs + $n real files ($size MiB) under /realfiles" >&2
