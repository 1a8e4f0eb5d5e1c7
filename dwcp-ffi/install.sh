#!/bin/sh
# Builds libdwcp (release) and installs it for pkg-config into PREFIX:
#   PREFIX/lib/libdwcp.so.0 (+ libdwcp.so link, libdwcp.a)
#   PREFIX/include/dwcp.h, PREFIX/lib/pkgconfig/dwcp.pc
# Use: dwcp-ffi/install.sh PREFIX; then PKG_CONFIG_PATH=PREFIX/lib/pkgconfig.
# CARGO_TARGET_DIR is honoured (default target/ of the workspace).
set -eu
prefix=${1:?usage: install.sh PREFIX}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
target=${CARGO_TARGET_DIR:-$root/target}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
(cd "$root" && cargo build --release -p dwcp-ffi)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$target/release/libdwcp.so" "$prefix/lib/libdwcp.so.$version.tmp"
mv "$prefix/lib/libdwcp.so.$version.tmp" "$prefix/lib/libdwcp.so.$version"
ln -sf "libdwcp.so.$version" "$prefix/lib/libdwcp.so.0"
ln -sf libdwcp.so.0 "$prefix/lib/libdwcp.so"
cp "$target/release/libdwcp.a" "$prefix/lib/libdwcp.a"
cp "$root/include/dwcp.h" "$prefix/include/dwcp.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/dwcp.pc.in" >"$prefix/lib/pkgconfig/dwcp.pc"
echo "install.sh: libdwcp $version in $prefix"
