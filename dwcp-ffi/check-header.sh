#!/bin/sh
# Regenerates include/dwcp.h with the pinned cbindgen and fails on any
# difference from the committed header. `--update` rewrites it instead.
# cbindgen is installed once into $DWCP_CACHE/cbindgen (default ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
CBINDGEN_VERSION=0.29.4
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}/cbindgen
cbindgen=$cache/bin/cbindgen
if ! [ -x "$cbindgen" ] || [ "$("$cbindgen" --version)" != "cbindgen $CBINDGEN_VERSION" ]; then
    echo "check-header: installing cbindgen $CBINDGEN_VERSION into $cache" >&2
    cargo install cbindgen --version "=$CBINDGEN_VERSION" --locked --root "$cache" >&2
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$cbindgen" --quiet --config "$here/cbindgen.toml" --crate dwcp-ffi --output "$tmp" "$here"
if [ "${1:-}" = "--update" ]; then
    mkdir -p "$root/include"
    cp "$tmp" "$root/include/dwcp.h"
    echo "check-header: wrote include/dwcp.h"
    exit 0
fi
if ! diff -u "$root/include/dwcp.h" "$tmp"; then
    echo "check-header: include/dwcp.h is stale; run dwcp-ffi/check-header.sh --update" >&2
    exit 1
fi
echo "check-header: include/dwcp.h is up to date"
