#!/bin/bash
# Builds libvirt 11.3 (the bookworm-backports source) with the dwcp://
# migration URI: the source + libvirt-patches/*.patch, a minimal build
# (monolithic libvirtd with the QEMU and remote drivers; no docs, tests or
# other drivers). Reuses the build when nothing changed: the key is a hash of
# the patches and this script. Prints the build directory as its last line
# of stdout; run the daemon as BUILD/src/libvirtd (it loads its QEMU driver
# module from the same tree).
#
# Cache layout ($DWCP_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp):
#   libvirt-dl/           the source tarball (apt-get source --download-only)
#   libvirt-dwcp/src      libvirt git tree: commit "base" + the series (git am)
#   libvirt-dwcp/build    the meson build; libvirt-dwcp/key the key it was made from
#
# The daemon uses the system's paths (/etc/libvirt, /var/lib/libvirt,
# /run/libvirt: --sysconfdir=/etc --localstatedir=/var -Drunstatedir=/run), so
# it replaces the distribution's libvirtd on a host (stop that one first) and
# works with the distribution's virsh and virtlogd. It is run from its build
# tree (libvirt's build-dir override loads the QEMU driver module from
# BUILD/src), so nothing is installed outside the cache.
# Needs the packages of libvirt-patches/setup.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}
ldir=$cache/libvirt-dwcp
log() { echo "libvirt-patches/build.sh: $*" >&2; }

key=$(cat "$here"/*.patch "$0" | sha256sum | cut -c1-16)
out=$ldir/build
if [ -x "$out/src/libvirtd" ] && [ -f "$out/src/libvirt_driver_qemu.so" ] &&
   [ "$(cat "$ldir/key" 2>/dev/null)" = "$key" ]; then
    log "up to date ($key)"
    echo "$out"
    exit 0
fi
t0=$(date +%s)

# 1. Source: libvirt 11.3 of bookworm-backports.
if ! [ -d "$ldir/src/.git" ]; then
    mkdir -p "$cache/libvirt-dl" "$ldir"
    tarball=$(ls "$cache"/libvirt-dl/libvirt_11.3*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | head -1 || true)
    if [ -z "$tarball" ]; then
        log "fetching the source (apt-get source -t bookworm-backports libvirt)"
        # The Debian packaging may be missing from the mirror; the
        # upstream (orig) tarball is all we need.
        (cd "$cache/libvirt-dl" && apt-get source -t bookworm-backports --download-only libvirt >&2) || true
        tarball=$(ls "$cache"/libvirt-dl/libvirt_11.3*.orig.tar.* | grep -v '\.asc$' | head -1)
    fi
    rm -rf "$ldir/src.tmp"
    mkdir -p "$ldir/src.tmp"
    tar -C "$ldir/src.tmp" --strip-components=1 -xf "$tarball"
    git -C "$ldir/src.tmp" init -q
    # No automatic gc: git detaches one after the first commit of a tree
    # this large, and its reflog expiry holds HEAD.lock while the series
    # is applied below ("cannot lock ref 'HEAD'", seen on a fresh machine).
    git -C "$ldir/src.tmp" config gc.auto 0
    git -C "$ldir/src.tmp" add -A
    git -C "$ldir/src.tmp" -c user.name=base -c user.email=base@localhost \
        commit -qm "base: $(basename "$tarball")"
    git -C "$ldir/src.tmp" tag base
    mv "$ldir/src.tmp" "$ldir/src"
fi

# 2. The series, with git am onto the pristine base. Files whose content
# did not change get their previous modification time back, so that ninja
# rebuilds only what a changed patch touches (qemu_capabilities.h alone
# would rebuild the whole QEMU driver).
log "applying $(ls "$here"/*.patch | grep -vc '/0000-') patches"
# Trees made before gc.auto was set: the same, and the lock files a
# detached gc or an interrupted run left (this cache has one user, this
# script).
git -C "$ldir/src" config gc.auto 0
rm -f "$ldir/src/.git/HEAD.lock" "$ldir/src/.git/index.lock"
git -C "$ldir/src" am --abort >/dev/null 2>&1 || true
old=$(git -C "$ldir/src" rev-parse HEAD)
declare -A mtime=()
while read -r f; do
    [ -e "$ldir/src/$f" ] && mtime[$f]=$(stat -c %.9Y "$ldir/src/$f")
done < <(git -C "$ldir/src" diff --name-only base "$old")
git -C "$ldir/src" reset -q --hard base
git -C "$ldir/src" clean -qfd
ls "$here"/*.patch | grep -v '/0000-' | xargs git -C "$ldir/src" -c user.name=build \
    -c user.email=build@localhost am -q --committer-date-is-author-date
new=$(git -C "$ldir/src" rev-parse HEAD)
for f in "${!mtime[@]}"; do
    if [ -e "$ldir/src/$f" ] && git -C "$ldir/src" diff --quiet "$old" "$new" -- "$f"; then
        touch -d "@${mtime[$f]}" "$ldir/src/$f"
    fi
done

# 3. Configure (once; a changed option list reconfigures) and build only
# what the lab runs: libvirtd and the QEMU driver module. Every optional
# feature is off (auto_features=disabled), then the QEMU driver, the remote
# driver (virsh qemu+tcp://, peer-to-peer migration) and libvirtd are on;
# libnl because libvirt 11.3 does not build on Linux without it.
conf=(--prefix="$ldir/inst" --libdir=lib --sysconfdir=/etc --localstatedir=/var
    -Drunstatedir=/run --buildtype=plain -Dc_args=-O2
    -Dauto_features=disabled -Ddriver_qemu=enabled -Ddriver_remote=enabled
    -Ddriver_libvirtd=enabled -Djson_c=enabled -Dlibnl=enabled -Drpath=enabled
    -Ddocs=disabled -Dtests=disabled -Dinit_script=none -Dno_git=true)
if ! [ -f "$out/build.ninja" ] || [ "$(cat "$ldir/configured" 2>/dev/null)" != "${conf[*]}" ]; then
    rm -rf "$out"
    (cd "$ldir/src" && meson setup "$out" "${conf[@]}" >&2)
    echo "${conf[*]}" >"$ldir/configured"
fi
log "building libvirtd and the QEMU driver (a clean build took about 20 min on 2 busy cores)"
ninja -C "$out" src/libvirtd src/libvirt_driver_qemu.so >&2
echo "$key" >"$ldir/key"
log "built in $(( $(date +%s) - t0 )) s"
echo "$out"
