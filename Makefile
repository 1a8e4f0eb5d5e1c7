# DWCP: the two set-up commands are `make demo` and `make test`; both install
# what they need on a fresh Debian bookworm machine (run as root). `make`,
# `make build` and `make guest` never touch apt or the system's QEMU: they
# expect the build dependencies (scripts/setup-host.sh lists them).
SHELL := /bin/bash
CARGO ?= cargo
DWCP := target/release/dwcp
GUEST := tests/guest/out/initrd.img

.PHONY: fresh-check all setup build guest demo test lint unit e2e ffi qemu qemu-test qemu-upstream libvirt-test libvirt-bench bench bench-full soak bench-gate bench-consensus clean help

all: build

help:
	@echo "make demo   - set up, build, migrate the test guest through DWCP and print the figures"
	@echo "make test   - set up, build, lint and run every test (CI runs this)"
	@echo "make fresh-check - make demo and make test in a clean Debian bookworm root (mmdebstrap)"
	@echo "make bench  - side-by-side benchmarks against QEMU's own channel (see docs/benchmarks.md)"
	@echo "make bench-full - every figure of docs/benchmarks.md (about an hour)"
	@echo "make libvirt-bench - virsh migrate through DWCP against libvirt's own transport (docs/libvirt.md)"
	@echo "make soak   - 200 randomized fault-injection runs on gated migrations (about an hour; make test runs 4)"
	@echo "make bench-gate - what the cutover gate adds to a migration, dc and internet links"
	@echo "make bench-consensus - raft commit latency, throughput and failover over dc and internet links"
	@echo "make qemu   - build QEMU with the dwcp: migration URI (qemu-patches/)"
	@echo "make qemu-upstream - the upstream rebase on the newest QEMU Debian serves: git am, checkpatch, build, smoke (not in make test)"

setup:
	bash scripts/setup-host.sh

guest:
	bash tests/guest/build.sh

build:
	$(CARGO) build --release --workspace --bins

demo: setup
	$(MAKE) build guest
	$(DWCP) demo

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Unit and loopback tests of every crate except the end-to-end suite.
unit: build
	$(CARGO) test --release --workspace --exclude dwcp-e2e

# End-to-end tests on real QEMU guests between network namespaces; one at a
# time (each boots guests under TCG on this 2-core machine).
e2e: build guest
	$(CARGO) test --release -p dwcp-e2e -- --test-threads=1

# C ABI: the committed header matches cbindgen's output, and the C tests
# (every function, bad input, a real loopback transfer) pass under ASan+UBSan.
ffi: build
	bash dwcp-ffi/check-header.sh
	bash tests/c/run.sh

# QEMU with the dwcp: migration URI, built once into $DWCP_CACHE (default
# $XDG_CACHE_HOME/dwcp, i.e. ~/.cache/dwcp) and reused while the patches and
# libdwcp are unchanged.
qemu:
	bash qemu-patches/setup.sh
	bash qemu-patches/build.sh

qemu-test: qemu guest
	bash tests/qemu/run.sh

# The upstream rebase (qemu-patches/upstream/) on the newest QEMU source
# Debian serves: git am, checkpatch, build, smoke and tests/qemu/run.sh.
# Not part of `make test`: a clean build is 20-40 min. QEMU_VERSION=1:10.2.2+ds-1
# pins the Debian source version.
qemu-upstream: setup guest
	bash qemu-patches/upstream/check.sh $(QEMU_VERSION)

# Stock virsh migrate --live between two libvirtd hosts through the agents,
# the hook, Nova's exact call, failure paths (~5 min).
libvirt-test: build guest
	bash tests/libvirt/setup.sh
	bash tests/libvirt/run.sh

test: setup
	$(MAKE) build guest lint unit e2e ffi qemu-test libvirt-test

# virsh migrate --live through DWCP against libvirt's own transport (plain and
# --parallel 4 + zstd), dc and internet links, 1 GiB guest (~15 min; not part
# of make test). Results: target/libvirt-bench/{results.json,table.md}.
libvirt-bench: build guest
	bash tests/libvirt/setup.sh
	bash tests/libvirt/bench.sh

bench: build guest
	$(DWCP) benchmark compare --profile dc --repeat 3

# Every figure of docs/benchmarks.md: the internet reference case, lossy, dc
# (with QEMU's own dwcp: URI when `make qemu` has run), convergence limits.
# About an hour here; results in dwcp-bench/full/.
bench-full: build guest
	bash scripts/bench-full.sh

# Randomized fault injection on real migrations through a 3-agent cluster
# (tests/tests/soak.rs): SOAK_RUNS runs from SOAK_SEED; `make test` runs the
# first 4 of seed 1. Report: target/soak.json.
SOAK_RUNS ?= 200
SOAK_SEED ?= 2026
soak: build guest
	DWCP_SOAK_RUNS=$(SOAK_RUNS) DWCP_SOAK_SEED=$(SOAK_SEED) DWCP_SOAK_REPORT=$(CURDIR)/target/soak.json \
	  $(CARGO) test --release -p dwcp-e2e --test soak -- --nocapture

# The cutover gate's cost: ungated, QMP gate and transport gate side by side.
bench-gate: build guest
	for l in dc internet; do \
	  DWCP_GATE_LINK=$$l DWCP_GATE_REPORT=$(CURDIR)/target/gate-$$l.json \
	    $(CARGO) test --release -p dwcp-e2e --test cluster gate_cost_over_link -- --ignored --nocapture || exit 1; \
	done

bench-consensus: build
	$(DWCP) benchmark consensus --link loopback,dc,internet --nodes 3,5 --ops 500 --batch 1 --output dwcp-bench/consensus-1
	$(DWCP) benchmark consensus --link loopback,dc,internet --nodes 3,5 --ops 20000 --batch 256 --output dwcp-bench/consensus-256

# The README's two set-up commands (make demo, make test) in a clean bookworm
# root built with mmdebstrap; the host's Rust toolchain is bind-mounted, nothing
# else. About an hour here (log: target/fresh-check.log).
fresh-check:
	bash scripts/fresh-check.sh

clean:
	$(CARGO) clean
	rm -rf tests/guest/out
