#!/usr/bin/env bash
# `make deb-check`: lintian on the three packages of `make deb`, and
# systemd-analyze verify + security on the unit as the dwcp package installs
# it. Needs lintian and systemd-analyze (Debian's lintian and systemd
# packages); installs nothing. Fails on any lintian error or verify problem.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${CARGO_TARGET_DIR:-$root/target}/debian
debs=("$out"/dwcp_*.deb "$out"/libdwcp0_*.deb "$out"/libdwcp-dev_*.deb)
for d in "${debs[@]}"; do
    [ -f "$d" ] || { echo "check-debs: $d missing; run make deb" >&2; exit 1; }
done
for t in lintian systemd-analyze; do
    command -v "$t" >/dev/null || { echo "check-debs: $t not found (apt-get install lintian systemd)" >&2; exit 1; }
done

echo "== lintian"
lintian --fail-on error --display-level '>=warning' "${debs[@]}"
echo "lintian: no errors"

# The unit from the package, its ExecStart pointed at the packaged binary and
# man: links resolved against the packaged pages (verify runs both).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$out"/dwcp_*.deb "$tmp/root"
unit=$(find "$tmp/root" -name dwcp-agent.service -path '*/systemd/system/*')
mkdir "$tmp/unit"
sed "s|/usr/bin/dwcp|$tmp/root/usr/bin/dwcp|g" "$unit" >"$tmp/unit/dwcp-agent.service"
echo "== systemd-analyze verify ${unit#"$tmp/root"}"
MANPATH=$tmp/root/usr/share/man systemd-analyze verify "$tmp/unit/dwcp-agent.service"
echo "verify: clean"
echo "== systemd-analyze security --offline=true"
systemd-analyze security --offline=true --no-pager "$tmp/unit/dwcp-agent.service" | grep -v '^✓'
