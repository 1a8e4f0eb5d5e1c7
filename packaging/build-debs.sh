#!/usr/bin/env bash
# `make deb`: the three Debian packages into $CARGO_TARGET_DIR/debian (default
# target/debian), after `make dist-build` (release build + generated docs).
#   dwcp        cargo-deb, from [package.metadata.deb] in dwcp/Cargo.toml: the
#               agent/CLI, dwcp-route, dwcp-nova-shim, the libvirt hook, the
#               systemd unit, /etc/dwcp/dwcp.toml, man pages, completions.
#   libdwcp0    libdwcp.so.0 (+ shlibs, ldconfig trigger)    } dpkg-deb from a
#   libdwcp-dev dwcp.h, libdwcp.so, dwcp.pc                  } staged `make install`
# cargo-deb is installed once into $DWCP_CACHE/cargo-deb (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp), like cbindgen in dwcp-ffi/check-header.sh.
set -euo pipefail
umask 022
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
out=$target/debian
CARGO_DEB_VERSION=3.8.0
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}/cargo-deb
if ! [ -x "$cache/bin/cargo-deb" ] || [ "$("$cache/bin/cargo-deb" --version)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "build-debs: installing cargo-deb $CARGO_DEB_VERSION into $cache" >&2
    cargo install cargo-deb --version "=$CARGO_DEB_VERSION" --locked --root "$cache" >&2
fi
mkdir -p "$out"

# --- dwcp (cargo-deb; the binary and generated docs come from dist-build) ---
# cargo-deb compresses man pages only when they are not build products: the
# generated ones are gzipped here (what dh_compress would do).
rm -rf "$target/release/gendocs/man-gz"
mkdir -p "$target/release/gendocs/man-gz"
for m in "$target/release/gendocs/man"/*.1; do
    gzip -9n <"$m" >"$target/release/gendocs/man-gz/$(basename "$m").gz"
done
"$cache/bin/cargo-deb" -p dwcp --no-build --strip --output "$out"

# --- libdwcp0, libdwcp-dev (dpkg-deb) ---
ver=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
debver=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
ma=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
maint=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' packaging/debian/changelog | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/stage
make --no-print-directory install DESTDIR="$stage" PREFIX=/usr LIBDIR="/usr/lib/$ma" >/dev/null
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$stage/usr/lib/$ma/libdwcp.so.$ver"

# Dependencies of the library, as dh_shlibdeps computes them.
mkdir -p "$work/shl/debian"
printf 'Source: dwcp\n\nPackage: libdwcp0\nArchitecture: any\n' >"$work/shl/debian/control"
shlibs=$(cd "$work/shl" && dpkg-shlibdeps -O -e"$stage/usr/lib/$ma/libdwcp.so.$ver" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')

# pkgdir NAME: usr/share/doc/NAME with copyright and changelog.Debian.gz.
docdir() {
    install -d "$1/usr/share/doc/$2"
    install -m 644 packaging/debian/copyright "$1/usr/share/doc/$2/copyright"
    gzip -9n <packaging/debian/changelog >"$1/usr/share/doc/$2/changelog.Debian.gz"
    chmod 644 "$1/usr/share/doc/$2/changelog.Debian.gz"
}
# build NAME DIR: DEBIAN/control from $work/NAME.control, md5sums, .deb.
build() {
    local name=$1 d=$2
    (cd "$d" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$d/DEBIAN/md5sums"
    chmod 644 "$d/DEBIAN/md5sums"
    local size
    size=$(du -sk --exclude=DEBIAN "$d" | cut -f1)
    sed "s/@SIZE@/$size/" "$work/$name.control" >"$d/DEBIAN/control"
    dpkg-deb --root-owner-group -Zxz -b "$d" "$out/${name}_${debver}_${arch}.deb" >/dev/null
    echo "build-debs: $out/${name}_${debver}_${arch}.deb"
}

lib=$work/libdwcp0
install -d "$lib/DEBIAN" "$lib/usr/lib/$ma"
cp -P "$stage/usr/lib/$ma/libdwcp.so.$ver" "$stage/usr/lib/$ma/libdwcp.so.0" "$lib/usr/lib/$ma/"
docdir "$lib" libdwcp0
echo "libdwcp 0 libdwcp0 (>= $ver)" >"$lib/DEBIAN/shlibs"
echo "activate-noawait ldconfig" >"$lib/DEBIAN/triggers"
chmod 644 "$lib/DEBIAN/shlibs" "$lib/DEBIAN/triggers"
cat >"$work/libdwcp0.control" <<CTL
Package: libdwcp0
Source: dwcp
Version: $debver
Architecture: $arch
Multi-Arch: same
Maintainer: $maint
Installed-Size: @SIZE@
Depends: $shlibs
Section: libs
Priority: optional
Homepage: https://dwcp.dev
Description: DWCP live-migration transport - shared library
 DWCP carries QEMU/KVM live migrations between hosts over many TCP streams
 with compression and page deduplication.
 .
 This package contains libdwcp, the C ABI QEMU loads for dwcp: migration
 URIs.
CTL
build libdwcp0 "$lib"

dev=$work/libdwcp-dev
install -d "$dev/DEBIAN" "$dev/usr/lib/$ma/pkgconfig" "$dev/usr/include"
cp -P "$stage/usr/lib/$ma/libdwcp.so" "$dev/usr/lib/$ma/"
install -m 644 "$stage/usr/lib/$ma/pkgconfig/dwcp.pc" "$dev/usr/lib/$ma/pkgconfig/"
install -m 644 "$stage/usr/include/dwcp.h" "$dev/usr/include/"
docdir "$dev" libdwcp-dev
install -m 644 docs/c-api.md "$dev/usr/share/doc/libdwcp-dev/c-api.md"
cat >"$work/libdwcp-dev.control" <<CTL
Package: libdwcp-dev
Source: dwcp
Version: $debver
Architecture: $arch
Multi-Arch: same
Maintainer: $maint
Installed-Size: @SIZE@
Depends: libdwcp0 (= $debver)
Section: libdevel
Priority: optional
Homepage: https://dwcp.dev
Description: DWCP live-migration transport - development files
 DWCP carries QEMU/KVM live migrations between hosts over many TCP streams
 with compression and page deduplication.
 .
 This package contains the C header dwcp.h and the pkg-config file of
 libdwcp, to build QEMU with the dwcp: migration transport.
CTL
build libdwcp-dev "$dev"
ls -l "$out"/*.deb
