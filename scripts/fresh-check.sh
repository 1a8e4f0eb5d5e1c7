#!/usr/bin/env bash
# `make fresh-check`: the README's two set-up commands in a clean Debian
# bookworm root, so that a step installed by hand on this machine cannot hide.
#
# 1. mmdebstrap builds a bookworm root from Debian's packages (variant
#    "important": a minimal installed system) plus make, git and
#    ca-certificates, with the sources a fresh install has.
# 2. This checkout's HEAD is cloned into it (committed work only, as CI sees it).
# 3. The host's Rust toolchain is bind-mounted read-only (rustup's home and
#    cargo's bin directory); nothing else of the host goes in.
# 4. Inside, as root: `make demo`, then `make test`. Either failing fails this.
#
# Env: FRESH_ROOT   the root (default target/fresh-root; rebuilt each run)
#      FRESH_STEPS  make targets to run, in order (default "demo test deb-install-check")
#      FRESH_KEEP=1 keep the root afterwards
# Log: target/fresh-check.log (each step's start, end and exit status).
# Needs: mmdebstrap (apt-get install mmdebstrap), root, network access to
# Debian's mirror and crates.io.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${FRESH_ROOT:-$here/target/fresh-root}
steps=${FRESH_STEPS:-demo test deb-install-check}
log=$here/target/fresh-check.log
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
mirror=http://deb.debian.org/debian

say() { echo "fresh-check: $(date -u +%H:%M:%S) $*" | tee -a "$log" >&2; }
[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root (chroot, mounts)" >&2; exit 2; }
command -v mmdebstrap >/dev/null || {
    echo "fresh-check: installing mmdebstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2 ||
        { echo "fresh-check: needs mmdebstrap (apt-get install mmdebstrap failed)" >&2; exit 2; }
}
[ -x "$cargo_bin/cargo" ] && [ -d "$rustup_home/toolchains" ] ||
    { echo "fresh-check: no Rust toolchain at $cargo_bin and $rustup_home (set CARGO_HOME/RUSTUP_HOME)" >&2; exit 2; }

mkdir -p "$here/target"
: >"$log"
t0=$(date +%s)
rm -rf "$root"
say "building a clean bookworm root in $root"
mmdebstrap --variant=important --include=make,git,ca-certificates \
    bookworm "$root" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb http://security.debian.org/debian-security bookworm-security main" \
    >>"$log" 2>&1
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The network's own trust anchors, as for resolv.conf: where this host
# reaches the package registries through a TLS-intercepting proxy, the
# proxy's CA (added locally under /usr/local/share/ca-certificates) must be
# trusted in the root too, or cargo cannot fetch crates. Nothing of DWCP.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >>"$log" 2>&1
    say "trusting the host network's local CA certificates"
fi
say "root ready after $(( $(date +%s) - t0 )) s"

git clone -q --no-hardlinks "$here" "$root/src"
say "cloned $(git -C "$here" rev-parse --short HEAD) into /src"
mkdir -p "$root/opt/rustup" "$root/opt/cargo-bin"

# A private mount namespace: every mount below disappears when this ends.
status=0
unshare --mount --propagation private bash -s "$root" "$rustup_home" "$cargo_bin" "$steps" \
    >>"$log" 2>&1 <<'INNER' || status=$?
set -euo pipefail
root=$1 rustup_home=$2 cargo_bin=$3 steps=$4
# The root must be a mount point of its own: `ip netns exec` remounts / as
# a slave, which fails on a plain directory.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
mount --bind "$rustup_home" "$root/opt/rustup"
mount -o remount,bind,ro "$root/opt/rustup"
mount --bind "$cargo_bin" "$root/opt/cargo-bin"
mount -o remount,bind,ro "$root/opt/cargo-bin"
for step in $steps; do
    echo "fresh-check: $(date -u +%H:%M:%S) make $step: start"
    s=$(date +%s)
    rc=0
    chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo \
        PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        bash -c "cd /src && make $step" || rc=$?
    echo "fresh-check: $(date -u +%H:%M:%S) make $step: exit $rc after $(( $(date +%s) - s )) s"
    [ "$rc" = 0 ] || exit "$rc"
done
INNER
grep '^fresh-check: .* make ' "$log" >&2 || true
[ "${FRESH_KEEP:-0}" = 1 ] || rm -rf "$root"
if [ "$status" = 0 ]; then
    say "PASS: make ${steps// / and make } in a clean bookworm root, $(( $(date +%s) - t0 )) s in all"
else
    say "FAIL (exit $status): see $log"
fi
exit "$status"
