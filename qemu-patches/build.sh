#!/bin/bash
# Builds qemu-system-x86_64 with the dwcp: migration transport:
#   QEMU 10.0 source of bookworm-backports + qemu-patches/*.patch + libdwcp.
# Reuses the build when nothing changed: the key is a hash of the patches,
# libdwcp (library + header) and this script. Prints the binary's path
# as its last line of stdout.
#
# Cache layout ($DWCP_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp):
#   qemu-dl/       the source tarball (apt-get source --download-only)
#   libdwcp/       libdwcp installed by dwcp-ffi/install.sh (pkg-config)
#   qemu-dwcp/src  QEMU git tree: commit "base" + the series (git am)
#   qemu-dwcp/build, qemu-dwcp/key   the build and the key it was made from
# Needs: meson >= 1.5 (apt-get install -t bookworm-backports meson; the +ds
# tarball has no bundled wheels), python3-pycotap (same), ninja-build,
# libglib2.0-dev, libfdt-dev, libgnutls28-dev, gcc.
# Changing a patch re-applies the series onto "base" (git rewrites only the
# files that differ, so ninja rebuilds only what the patches touch).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}
qdir=$cache/qemu-dwcp
log() { echo "qemu-patches/build.sh: $*" >&2; }

# 1. libdwcp (cargo is a no-op when nothing changed).
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target-libdwcp} \
    "$root/dwcp-ffi/install.sh" "$cache/libdwcp" >&2

key=$(cat "$here"/*.patch "$0" "$cache/libdwcp/lib/libdwcp.so.0" \
          "$cache/libdwcp/include/dwcp.h" | sha256sum | cut -c1-16)
bin=$qdir/build/qemu-system-x86_64
if [ -x "$bin" ] && [ "$(cat "$qdir/key" 2>/dev/null)" = "$key" ]; then
    log "up to date ($key)"
    echo "$bin"
    exit 0
fi

# 2. Source: QEMU 10.0 of bookworm-backports.
if ! [ -d "$qdir/src/.git" ]; then
    mkdir -p "$cache/qemu-dl" "$qdir"
    tarball=$(ls "$cache"/qemu-dl/qemu_10.0*.orig.tar.* 2>/dev/null | head -1 || true)
    if [ -z "$tarball" ]; then
        log "fetching the source (apt-get source -t bookworm-backports qemu)"
        # The Debian packaging may be missing from the mirror; the
        # upstream (orig) tarball is all we need.
        (cd "$cache/qemu-dl" && apt-get source -t bookworm-backports --download-only qemu >&2) || true
        tarball=$(ls "$cache"/qemu-dl/qemu_10.0*.orig.tar.* | head -1)
    fi
    rm -rf "$qdir/src.tmp"
    mkdir -p "$qdir/src.tmp"
    tar -C "$qdir/src.tmp" --strip-components=1 -xf "$tarball"
    git -C "$qdir/src.tmp" init -q
    # No automatic gc: git detaches one after the first commit of a tree
    # this large, and its reflog expiry holds HEAD.lock while the series
    # is applied below ("cannot lock ref 'HEAD'", seen on a fresh machine).
    git -C "$qdir/src.tmp" config gc.auto 0
    git -C "$qdir/src.tmp" add -A
    git -C "$qdir/src.tmp" -c user.name=base -c user.email=base@localhost \
        commit -qm "base: $(basename "$tarball")"
    git -C "$qdir/src.tmp" tag base
    mv "$qdir/src.tmp" "$qdir/src"
fi

# 3. The series, with git am onto the pristine base.
log "applying $(ls "$here"/*.patch | grep -vc 0000-) patches"
# Trees made before gc.auto was set: the same, and the lock files a
# detached gc or an interrupted run left (this cache has one user, this
# script).
git -C "$qdir/src" config gc.auto 0
rm -f "$qdir/src/.git/HEAD.lock" "$qdir/src/.git/index.lock"
git -C "$qdir/src" am --abort >/dev/null 2>&1 || true
old=$(git -C "$qdir/src" rev-parse HEAD)
git -C "$qdir/src" reset -q --hard base
git -C "$qdir/src" clean -qfd
ls "$here"/*.patch | grep -v '/0000-' | xargs git -C "$qdir/src" -c user.name=build \
    -c user.email=build@localhost am -q --committer-date-is-author-date
new=$(git -C "$qdir/src" rev-parse HEAD)
# reset + am rewrote every file the old or new series touches; give those
# whose content did not change their previous time back, or a touched
# qapi/migration.json alone regenerates the QAPI headers and rebuilds all.
if [ -f "$qdir/applied" ]; then
    { git -C "$qdir/src" diff --name-only base "$old"; git -C "$qdir/src" diff --name-only base "$new"; } |
        sort -u | while read -r f; do
            if [ -e "$qdir/src/$f" ] && git -C "$qdir/src" diff --quiet "$old" "$new" -- "$f"; then
                touch -r "$qdir/applied" "$qdir/src/$f"
            fi
        done
fi
touch "$qdir/applied.new"

# The +ds tarball has no firmware blobs, but meson wants the edk2 ones to
# exist when bzip2 is installed: empty placeholders (the guest boots with
# the system's firmware, -L /usr/share/qemu).
for f in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',$/\1/p" "$qdir/src/pc-bios/meson.build"); do
    [ -e "$qdir/src/pc-bios/$f.bz2" ] || bzip2 -c </dev/null >"$qdir/src/pc-bios/$f.bz2"
done

# 4. Configure (once) and build.
export PKG_CONFIG_PATH=$cache/libdwcp/lib/pkgconfig
# zstd: QEMU's best WAN contender (multifd + zstd) runs on the same binary
# as dwcp:, as Debian's QEMU builds it. gnutls: -object tls-creds-x509
# (the tls-creds migration parameter) needs it. A changed option list
# reconfigures.
conf=(--target-list=x86_64-softmmu
    --without-default-features --enable-tcg --enable-dwcp --enable-zstd
    --enable-gnutls
    --disable-docs --disable-werror --disable-user --disable-download
    --disable-install-blobs
    --python=/usr/bin/python3
    "--extra-ldflags=-Wl,-rpath,$cache/libdwcp/lib")
if ! [ -f "$qdir/build/build.ninja" ] || [ "$(cat "$qdir/configured" 2>/dev/null)" != "${conf[*]}" ]; then
    rm -rf "$qdir/build"
    mkdir -p "$qdir/build"
    (cd "$qdir/build" && "$qdir/src/configure" "${conf[@]}" >&2)
    echo "${conf[*]}" >"$qdir/configured"
fi
log "building (a clean build takes ~5 min on 2 cores)"
ninja -C "$qdir/build" qemu-system-x86_64 >&2
mv "$qdir/applied.new" "$qdir/applied"
echo "$key" >"$qdir/key"
echo "$bin"
