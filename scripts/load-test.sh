#!/bin/bash
# `make load-test`, the load-test part (docs/scale.md, "dwcp load-test"):
# 10, 100 and 1,000 synthetic guests migrating at once through one agent
# pair over the emulated `wan` link, then the stress ramp. Reports (HTML and
# JSON) in target/load-test/. As root (namespaces). About 25 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
DWCP=${DWCP:-target/release/dwcp}
OUT=${LOAD_TEST_OUT:-target/load-test}
mkdir -p "$OUT"
"$DWCP" load-test --vms 10 --duration 2m --ramp-up 10s --vm-size 32MiB --report "$OUT/vms-10.html"
"$DWCP" load-test --vms 100 --duration 3m --ramp-up 30s --vm-size 16MiB --report "$OUT/vms-100.html"
# 1,000 at once (docs/scale.md, "1,000 at once"): small guests, one stream
# each, set-up given time to queue (a fleet evacuation's settings).
for profile in dc wan; do
    "$DWCP" load-test --vms 1000 --duration 3m --ramp-up 60s --vm-size 4MiB --profile "$profile" \
        --streams 1 --dirty-rate 64K/s --timeout 600s --route-option connect_timeout=60s \
        --agent-arg=--idle-timeout=60s --report "$OUT/vms-1000-$profile.html"
done
"$DWCP" load-test stress --target-throughput 1Gbps --duration 5m --step 20s --max-vms 256 --vm-size 16MiB --report "$OUT/stress.html"
