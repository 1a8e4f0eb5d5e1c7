#!/bin/bash
# `make bench-adaptive`, the comparison part (docs/adaptivity.md, "Adaptive
# against fixed tiers"): one interleaved `dwcp benchmark compare` per link
# profile and per replayed FCC trace, with DWCP's adaptive codec (`auto`)
# against DWCP fixed at lz4 and at zstd:3, and QEMU's multifd + zstd.
# As root (network namespaces). About 40 minutes here with the defaults.
#
# Env: ADAPT_PROFILES  profiles (default "dc wan internet lossy")
#      ADAPT_TRACES    FCC test traces replayed on the internet profile's
#                      delay and loss, scaled to a mean of 100 Mbit/s
#                      (file names under $DWCP_TRACES/fcc/test; default the
#                      two most variable of the first ten)
#      ADAPT_REPEAT    runs per contender (default 2)
#      ADAPT_OUT       results (default target/bench-adaptive)
set -euo pipefail
cd "$(dirname "$0")/.."
DWCP=${DWCP:-target/release/dwcp}
TRACES=${DWCP_TRACES:-../shared/traces}
OUT=${ADAPT_OUT:-target/bench-adaptive}
REPEAT=${ADAPT_REPEAT:-2}
PROFILES=${ADAPT_PROFILES:-dc wan internet lossy}
TRACE_FILES=${ADAPT_TRACES:-004_trace_901648_http---www.amazon.com_960 001_test_fcc_trace_215364_http---www.ebay.com_600_0}
CONTENDERS=dwcp-auto,dwcp-lz4,dwcp-zstd:3,qemu-multifd-zstd
mkdir -p "$OUT"
for p in $PROFILES; do
    "$DWCP" benchmark compare --profile "$p" --repeat "$REPEAT" --no-floor \
        --contenders "$CONTENDERS" --output "$OUT/$p"
done
for t in $TRACE_FILES; do
    f=$TRACES/fcc/test/$t
    [ -f "$f" ] || { echo "bench-adaptive: no trace $f (set DWCP_TRACES)" >&2; exit 2; }
    "$DWCP" benchmark compare --profile internet --trace "$f" --trace-mean-mbit 100 \
        --repeat "$REPEAT" --no-floor --contenders "$CONTENDERS" --output "$OUT/trace-${t%%_*}"
done
echo "bench-adaptive: results in $OUT/*/report.html"
