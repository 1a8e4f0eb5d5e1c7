# DWCP: the two set-up commands are `make demo` and `make test`; both install
# what they need on a fresh Debian bookworm machine (run as root). `make`,
# `make build` and `make guest` never touch apt or the system's QEMU: they
# expect the build dependencies (scripts/setup-host.sh lists them).
SHELL := /bin/bash
CARGO ?= cargo
DWCP := target/release/dwcp
GUEST := tests/guest/out/initrd.img

.PHONY: fresh-check all setup build guest demo test lint unit e2e adapt-replay ffi qemu qemu-test qemu-upstream libvirt libvirt-test libvirt-bench bench bench-full soak bench-gate bench-consensus load-test clean help
.PHONY: dist-build install uninstall deb deb-check deb-install-check
.PHONY: pba-venv pba-model bench-pba bench-adaptive

all: build

help:
	@echo "make demo   - set up, build, migrate the test guest through DWCP and print the figures"
	@echo "make test   - set up, build, lint and run every test (CI runs this)"
	@echo "make fresh-check - make demo and make test in a clean Debian bookworm root (mmdebstrap)"
	@echo "make bench  - side-by-side benchmarks against QEMU's own channel (see docs/benchmarks.md)"
	@echo "make bench-full - every figure of docs/benchmarks.md (about an hour)"
	@echo "make libvirt-bench - virsh migrate through DWCP against libvirt's own transport (docs/libvirt.md)"
	@echo "make load-test - 5 and 10 concurrent real migrations, 100 back-to-back with the agents' memory sampled, dwcp load-test with 10/100/1,000 synthetic guests (docs/scale.md)"
	@echo "make soak   - 200 randomized fault-injection runs on gated migrations (about an hour; make test runs 4)"
	@echo "make bench-gate - what the cutover gate adds to a migration, dc and internet links"
	@echo "make bench-consensus - raft commit latency, throughput and failover over dc and internet links"
	@echo "make qemu   - build QEMU with the dwcp: migration URI (qemu-patches/)"
	@echo "make libvirt - build libvirtd with the dwcp:// migration URI (libvirt-patches/)"
	@echo "make install - install into \$$(DESTDIR)\$$(PREFIX) (PREFIX=/usr/local); make uninstall removes it (docs/install.md)"
	@echo "make deb    - the Debian packages dwcp, libdwcp0, libdwcp-dev in target/debian/; make deb-check runs lintian and systemd-analyze on them"
	@echo "make pba-model - train the bandwidth predictor (LSTM) on the FCC traces into pba/models/internet.onnx (not in make test)"
	@echo "make bench-pba - dwcp benchmark pba: the predictors on the FCC test split (docs/adaptivity.md)"
	@echo "make bench-adaptive - migrations over a dropping link and replayed FCC traces: convergence, ETA error (docs/adaptivity.md)"
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

# The mode detector on a link switching between dc and internet (linkem
# replay, ~40 s; also part of make test since the flap fix: docs/adaptivity.md).
adapt-replay: build
	$(CARGO) test --release -p dwcp-e2e --test adapt -- --nocapture

# The adaptive layer on real migrations (docs/adaptivity.md): the 100 -> 20
# Mbit/s drop (also in make test) and FCC_TRACES (default 3) replayed FCC
# test traces scaled to 100 Mbit/s, with the ETA's error at 25/50/75 %;
# then adaptive DWCP against fixed tiers and QEMU multifd + zstd on every
# profile and on replayed traces (scripts/bench-adaptive.sh, ADAPT_* knobs).
FCC_TRACES ?= 3
bench-adaptive: build guest
	DWCP_TRACES=$(abspath $(TRACES)) FCC_TRACES=$(FCC_TRACES) $(CARGO) test --release -p dwcp-e2e --test adaptive -- --include-ignored --test-threads=1 --nocapture
	DWCP_TRACES=$(abspath $(TRACES)) bash scripts/bench-adaptive.sh

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

# libvirt 11.3 with the dwcp:// migration URI (libvirt-patches/), built once
# into $DWCP_CACHE/libvirt-dwcp and reused while the patches are unchanged;
# then libvirt's syntax checks on the patched tree.
# Run the dwcp:// libvirt tests with it:
#   LV_PATCHED=$(bash libvirt-patches/build.sh | tail -1) bash tests/libvirt/run.sh
libvirt:
	bash libvirt-patches/setup.sh
	bash libvirt-patches/build.sh
	bash libvirt-patches/check.sh

# The upstream rebase (qemu-patches/upstream/) on the newest QEMU source
# Debian serves: git am, checkpatch, build, smoke and tests/qemu/run.sh.
# Not part of `make test`: a clean build is 20-40 min. QEMU_VERSION=1:10.2.2+ds-1
# pins the Debian source version.
qemu-upstream: setup guest
	bash qemu-patches/upstream/check.sh $(QEMU_VERSION)

# Stock virsh migrate --live between two libvirtd hosts through the agents,
# the hook, Nova's exact call, failure paths (~5 min).
# Stock virsh against two lab libvirtds (QEMU as libvirt-qemu): the agents'
# unix:// route, Nova's tcp:// through the agents, failures, and dwcp://
# with the patched libvirtd and QEMU (make libvirt, make qemu; cached).
libvirt-test: build guest libvirt qemu
	bash tests/libvirt/setup.sh
	LV_PATCHED=$$(bash libvirt-patches/build.sh | tail -1) bash tests/libvirt/run.sh

test: setup
	$(MAKE) build guest lint deny unit e2e ffi qemu-test libvirt-test

# virsh migrate --live through DWCP (dwcp:// with the patched libvirt and
# QEMU, unix:// through the agents, Nova's call through the agents' ingress
# and, on dc, through dwcp-nova-shim) against libvirt's own transport (plain
# and --parallel 4 + zstd), dc and internet links, 1 GiB guest, 2 interleaved
# rounds, TLS between the agents and for dwcp:// (~15 min; not part of make
# test). Results: target/libvirt-bench/{results.json,table.md}.
libvirt-bench: build guest libvirt qemu
	bash tests/libvirt/setup.sh
	LV_PATCHED=$$(bash libvirt-patches/build.sh | tail -1) bash tests/libvirt/bench.sh

bench: build guest
	$(DWCP) benchmark compare --profile dc --repeat 3

# Every figure of docs/benchmarks.md: the internet reference case, lossy, dc
# (with QEMU's own dwcp: URI when `make qemu` has run), convergence limits.
# About an hour here; results in dwcp-bench/full/.
bench-full: build guest
	bash scripts/bench-full.sh

# Randomized fault injection on real migrations through a 3-agent cluster
# (tests/tests/soak.rs): SOAK_RUNS runs from SOAK_SEED; `make test` runs the
# first 4 of seed 1. SOAK_FAULTS / SOAK_POINTS (comma-separated, e.g.
# kill-leader,kill-follower and at-gate) draw only from those. Report:
# target/soak.json.
SOAK_RUNS ?= 200
SOAK_SEED ?= 2026
SOAK_FAULTS ?=
SOAK_POINTS ?=
soak: build guest
	DWCP_SOAK_RUNS=$(SOAK_RUNS) DWCP_SOAK_SEED=$(SOAK_SEED) DWCP_SOAK_REPORT=$(CURDIR)/target/soak.json \
	  DWCP_SOAK_FAULTS="$(SOAK_FAULTS)" DWCP_SOAK_POINTS="$(SOAK_POINTS)" \
	  $(CARGO) test --release -p dwcp-e2e --test soak -- --nocapture

# Scale (docs/scale.md), the long versions of what make test runs short:
# 1. concurrent real migrations (N = 5 and 10 guests at once through one
#    agent pair) and 100 back-to-back migrations with both agents' RSS,
#    descriptors and threads sampled after each (the #[ignore]d tests of
#    tests/tests/concurrent.rs and many_migrations.rs);
# 2. `dwcp load-test` with 10, 100 and 1,000 synthetic guests at once through
#    one agent pair, and its stress ramp (scripts/load-test.sh; reports in
#    target/load-test/).
.PHONY: load-test
load-test: build guest
	$(CARGO) test --release -p dwcp-e2e --test concurrent --test many_migrations -- --ignored --test-threads=1 --nocapture
	bash scripts/load-test.sh

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

# --- Installation and Debian packages (docs/install.md) ---------------------
# `make install` builds with cargo (release) when needed and copies; it never
# runs apt and never touches the system's QEMU. PREFIX is what the installed
# files name (dwcp.pc, the unit's ExecStart); DESTDIR only stages. /etc is
# /etc for every PREFIX (libvirt reads its hooks there); configuration files
# that exist already are kept.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
# Debian's zsh searches vendor-completions under /usr, site-functions elsewhere.
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/$(if $(filter /usr,$(PREFIX)),vendor-completions,site-functions)
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
PKG_TARGET := $(or $(CARGO_TARGET_DIR),target)
PKG_GEN := $(PKG_TARGET)/release/gendocs
LIBDWCP_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Man page dates: the last commit's (reproducible), else today.
PKG_DATE = $(shell git log -1 --format=%ct 2>/dev/null)

# The release binary and library, then man pages and completions generated
# from the CLI definition (`dwcp generate-docs`).
dist-build:
	$(CARGO) build --release -p dwcp -p dwcp-ffi
	rm -rf $(PKG_GEN)
	SOURCE_DATE_EPOCH=$(PKG_DATE) $(PKG_TARGET)/release/dwcp generate-docs \
	  --man $(PKG_GEN)/man --completions $(PKG_GEN)/completions

install: dist-build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR) \
	  $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/dwcp \
	  $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(SYSCONFDIR)/libvirt/hooks/qemu.d \
	  $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 755 $(PKG_TARGET)/release/dwcp libvirt-hooks/dwcp-route \
	  libvirt-hooks/dwcp-nova-shim $(DESTDIR)$(BINDIR)/
	install -m 644 $(PKG_TARGET)/release/libdwcp.so $(DESTDIR)$(LIBDIR)/libdwcp.so.$(LIBDWCP_VERSION)
	ln -sfn libdwcp.so.$(LIBDWCP_VERSION) $(DESTDIR)$(LIBDIR)/libdwcp.so.0
	ln -sfn libdwcp.so.0 $(DESTDIR)$(LIBDIR)/libdwcp.so
	install -m 644 include/dwcp.h $(DESTDIR)$(INCLUDEDIR)/dwcp.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(LIBDWCP_VERSION)|' \
	  -e 's|^libdir=.*|libdir=$(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))|' \
	  -e 's|^includedir=.*|includedir=$(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))|' \
	  dwcp-ffi/dwcp.pc.in >$(DESTDIR)$(LIBDIR)/pkgconfig/dwcp.pc
	chmod 644 $(DESTDIR)$(LIBDIR)/pkgconfig/dwcp.pc
	install -m 755 libvirt-hooks/qemu.d/dwcp $(DESTDIR)$(SYSCONFDIR)/libvirt/hooks/qemu.d/dwcp
	[ -e $(DESTDIR)$(SYSCONFDIR)/libvirt/hooks/dwcp.conf ] || \
	  install -m 644 libvirt-hooks/dwcp.conf $(DESTDIR)$(SYSCONFDIR)/libvirt/hooks/dwcp.conf
	install -d $(DESTDIR)$(SYSCONFDIR)/apparmor.d/abstractions/libvirt-qemu.d
	install -m 644 libvirt-hooks/apparmor/libvirt-qemu.d-dwcp \
	  $(DESTDIR)$(SYSCONFDIR)/apparmor.d/abstractions/libvirt-qemu.d/dwcp
	[ -e $(DESTDIR)$(SYSCONFDIR)/dwcp/dwcp.toml ] || \
	  install -m 644 packaging/dwcp.toml $(DESTDIR)$(SYSCONFDIR)/dwcp/dwcp.toml
	[ -e $(DESTDIR)$(SYSCONFDIR)/default/dwcp ] || \
	  install -m 644 packaging/default-dwcp $(DESTDIR)$(SYSCONFDIR)/default/dwcp
	sed -e 's|/usr/bin/dwcp|$(BINDIR)/dwcp|g' -e 's|/etc/|$(SYSCONFDIR)/|g' \
	  packaging/dwcp-agent.service >$(DESTDIR)$(UNITDIR)/dwcp-agent.service
	chmod 644 $(DESTDIR)$(UNITDIR)/dwcp-agent.service
	install -m 644 $(PKG_GEN)/man/*.1 packaging/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 644 $(PKG_GEN)/completions/dwcp $(DESTDIR)$(BASHCOMPDIR)/dwcp
	install -m 644 $(PKG_GEN)/completions/_dwcp $(DESTDIR)$(ZSHCOMPDIR)/_dwcp
	install -m 644 $(PKG_GEN)/completions/dwcp.fish $(DESTDIR)$(FISHCOMPDIR)/dwcp.fish
	@echo "installed into $(DESTDIR)$(PREFIX); libvirtd reads hooks at start: restart it after the first install"

# Removes what `make install` put there, except the configuration files in
# $(SYSCONFDIR) (dwcp/dwcp.toml, default/dwcp, libvirt/hooks/dwcp.conf).
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/dwcp $(DESTDIR)$(BINDIR)/dwcp-route $(DESTDIR)$(BINDIR)/dwcp-nova-shim
	rm -f $(DESTDIR)$(LIBDIR)/libdwcp.so.$(LIBDWCP_VERSION) $(DESTDIR)$(LIBDIR)/libdwcp.so.0 \
	  $(DESTDIR)$(LIBDIR)/libdwcp.so $(DESTDIR)$(LIBDIR)/pkgconfig/dwcp.pc $(DESTDIR)$(INCLUDEDIR)/dwcp.h
	rm -f $(DESTDIR)$(SYSCONFDIR)/libvirt/hooks/qemu.d/dwcp $(DESTDIR)$(UNITDIR)/dwcp-agent.service
	rm -f $(DESTDIR)$(MANDIR)/man1/dwcp.1 $(DESTDIR)$(MANDIR)/man1/dwcp-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/dwcp $(DESTDIR)$(ZSHCOMPDIR)/_dwcp $(DESTDIR)$(FISHCOMPDIR)/dwcp.fish
	@echo "kept the configuration in $(DESTDIR)$(SYSCONFDIR) (dwcp/, default/dwcp, libvirt/hooks/dwcp.conf)"

# dwcp (cargo-deb, installed once into $DWCP_CACHE/cargo-deb), libdwcp0 and
# libdwcp-dev (dpkg-deb from a staged `make install`): $(PKG_TARGET)/debian/.
deb: dist-build
	bash packaging/build-debs.sh

deb-check:
	bash packaging/check-debs.sh

# Installs the three packages on THIS machine with apt (meant for the clean
# root of `make fresh-check`), checks that the files landed where Debian
# expects, then runs deb-check. Not part of `make test`.
.PHONY: deb-install-check
deb-install-check: deb
	bash packaging/install-check.sh

# Metrics: the alerting rules (promtool check/test rules), then Prometheus
# scraping both lab agents and headless Chromium loading the dashboard during
# a real migration (tests/tests/observability.rs; docs/metrics.md).
.PHONY: metrics-test
metrics-test: build guest
	promtool check rules packaging/prometheus/dwcp-rules.yml
	promtool test rules packaging/prometheus/dwcp-rules.test.yml
	$(CARGO) test --release -p dwcp-e2e --test observability -- --test-threads=1 --nocapture

# Licences and bans of the dependency graph (deny.toml): cargo-deny, installed
# once into $(DWCP_CACHE)/cargo-deny, offline after `cargo fetch`.
.PHONY: deny
deny:
	bash scripts/deny.sh

# --- Fuzzing (docs/fuzzing.md) ------------------------------------------------
# libFuzzer through cargo-fuzz on stable Rust (no sanitizer), installed once
# into $DWCP_CACHE/cargo-fuzz. fuzz-smoke (CI): every target FUZZ_SMOKE_SECONDS
# from the committed corpus, fails on a crash. fuzz: every target
# FUZZ_SECONDS, one after the other, growing and minimizing fuzz/corpus/.
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 10
.PHONY: fuzz fuzz-smoke
fuzz-smoke:
	bash scripts/fuzz.sh smoke $(FUZZ_SMOKE_SECONDS) $(FUZZ_TARGETS)

fuzz:
	bash scripts/fuzz.sh run $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Bandwidth prediction (docs/adaptivity.md): the trainer's venv (numpy, onnx;
# pba/requirements.txt) under $(XDG_CACHE_HOME)/dwcp, the committed model
# retrained from the FCC traces (../shared/traces; TRACES=DIR overrides), and
# its benchmark. Not part of `make test` (training takes minutes); the tests
# evaluate the committed model.
PBA_VENV ?= $(or $(DWCP_PBA_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dwcp/pba-venv)
TRACES ?= ../shared/traces
PBA_TRAIN_ARGS ?= --window 10 --hidden 24 --epochs 20 --seed 1

pba-venv: $(PBA_VENV)/.installed

$(PBA_VENV)/.installed: pba/requirements.txt
	python3 -m venv $(PBA_VENV)
	$(PBA_VENV)/bin/pip install --quiet -r pba/requirements.txt
	touch $@

pba-model: pba-venv
	OPENBLAS_NUM_THREADS=1 $(PBA_VENV)/bin/python pba/train.py --train $(TRACES)/fcc/train --valid $(TRACES)/fcc/valid \
		--test $(TRACES)/fcc/test --mode internet $(PBA_TRAIN_ARGS) \
		--output pba/models/internet.onnx --report-dir pba/results

bench-pba: build
	$(DWCP) benchmark pba --test-data $(TRACES)/fcc/test --output target/bench-pba
