#!/usr/bin/env bash
# The long benchmark set behind docs/benchmarks.md ("make bench-full", about
# an hour on a 2-core machine): every figure there comes from one of these
# commands. Results go to $OUT/<name>/{results.json,report.html}.
#
#   internet-2g  the issue-3 reference case: 2 GiB guest, ~700 MiB of content,
#                rewriting 16 MiB/s, over the internet profile, 3 repeats
#   lossy        50 Mbit/s, 150 ms RTT, 1 % loss (DWCP streams on BBR)
#   dc           unshaped link: QEMU tcp/multifd, DWCP relay, and QEMU's own
#                dwcp: URI when the patched build exists (make qemu)
#   converge-*   highest dirty rate that still converges, internet and wan
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dwcp=$root/target/release/dwcp
OUT=${OUT:-$root/dwcp-bench/full}
ONLY=${ONLY:-internet-2g lossy dc converge-internet converge-wan}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] bench-full: $*" >&2; }

patched=${DWCP_QEMU:-}
if [ -z "$patched" ] && [ -x "${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}/qemu-dwcp/build/qemu-system-x86_64" ]; then
    patched=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}/qemu-dwcp/build/qemu-system-x86_64
fi

run() {
    local name=$1; shift
    case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
    log "$name: dwcp benchmark $*"
    "$dwcp" benchmark "$@" --output "$OUT/$name" 2>&1 | tee "$OUT/$name.log" | grep -v '^\[' || true
}

run internet-2g compare --profile internet --guest-mem 2048 --fill 700 --dirty-rate 16 \
    --repeat 3 --timeout 360 --contenders qemu-multifd-zstd,dwcp
run lossy compare --profile lossy --guest-mem 1024 --fill 512 --dirty-rate 8 \
    --timeout 420 --congestion bbr --contenders qemu-multifd-zstd,dwcp
if [ -n "$patched" ]; then
    DWCP_QEMU=$patched run dc compare --profile dc --guest-mem 1024 --fill 512 --dirty-rate 8 \
        --repeat 3 --contenders qemu-tcp,qemu-multifd,dwcp,dwcp+multifd,qemu-dwcp,qemu-dwcp+multifd
else
    log "dc: no patched QEMU (make qemu): qemu-dwcp contenders left out"
    run dc compare --profile dc --guest-mem 1024 --fill 512 --dirty-rate 8 \
        --repeat 3 --contenders qemu-tcp,qemu-multifd,dwcp,dwcp+multifd
fi
run converge-internet converge --profile internet --guest-mem 512 --fill 256 \
    --rates 8,16,32,64,128 --timeout 150 --contenders qemu-multifd-zstd,dwcp
run converge-wan converge --profile wan --guest-mem 512 --fill 256 \
    --rates 16,32,64,128,256 --timeout 120 --contenders qemu-multifd-zstd,dwcp
log "done: $OUT"
