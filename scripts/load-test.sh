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
"$DWCP" load-test --vms 1000 --duration 5m --ramp-up 2m --vm-size 16MiB --report "$OUT/vms-1000.html"
"$DWCP" load-test stress --target-throughput 1Gbps --duration 5m --step 20s --max-vms 256 --vm-size 16MiB --report "$OUT/stress.html"
