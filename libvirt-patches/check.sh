#!/bin/bash
# libvirt's own syntax checks (build-aux/syntax-check.mk, what `meson test
# --suite syntax-check` runs) on the tree libvirt-patches/build.sh made, plus
# scripts/group-qemu-caps.py --check. Run build.sh first.
#
# The orig tarball carries subprojects/keycodemapdb (a git submodule upstream,
# so upstream's checks never see it); build.sh commits it into "base", and it
# trips 9 checks (TABs, strcmp, config.h ...). Those lines are ignored, and
# so is sc_po_check, which compares po/POTFILES with a build that has every
# driver. Exit 0 = no check reports a line in libvirt's own files.
set -euo pipefail
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}
src=$cache/libvirt-dwcp/src
sc=$cache/libvirt-dwcp/build-sc
log() { echo "libvirt-patches/check.sh: $*" >&2; }
[ -d "$src/.git" ] || { log "no $src: run libvirt-patches/build.sh first"; exit 1; }
python3 "$src/scripts/group-qemu-caps.py" --check --prefix "$src/"
if ! [ -f "$sc/build-aux/Makefile" ]; then
    (cd "$src" && meson setup "$sc" -Dauto_features=disabled -Ddriver_qemu=enabled \
        -Ddriver_remote=enabled -Ddriver_libvirtd=enabled -Djson_c=enabled \
        -Dlibnl=enabled -Dtests=enabled -Ddocs=disabled >/dev/null)
fi
mkdir -p "$sc/sc-logs"
bad=0 n=0
for t in $(sed -n 's/^sc_\([a-zA-Z0-9_-]*\):.*/\1/p' "$src/build-aux/syntax-check.mk"); do
    [ "$t" = po_check ] && continue
    n=$((n + 1))
    if ! make -s -C "$sc/build-aux" "sc_$t" >"$sc/sc-logs/$t.log" 2>&1; then
        if grep "^$src/" "$sc/sc-logs/$t.log" | grep -v "^$src/subprojects/keycodemapdb/" | grep -q .; then
            log "sc_$t:"; grep "^$src/" "$sc/sc-logs/$t.log" | grep -v "/subprojects/keycodemapdb/" | head >&2
            bad=$((bad + 1))
        fi
    fi
done
log "$n syntax checks, $bad with findings in libvirt's files; group-qemu-caps: ok"
[ $bad = 0 ]
