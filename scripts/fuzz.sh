#!/usr/bin/env bash
# Coverage-guided fuzzing of DWCP's decoders (docs/fuzzing.md): libFuzzer
# through cargo-fuzz on stable Rust, without a sanitizer (`-s none`; ASan
# needs nightly).
#
#   scripts/fuzz.sh smoke [SECONDS] [TARGET...]  each target SECONDS (10) from
#       the committed corpus; new inputs go to a scratch copy; fails on a crash
#   scripts/fuzz.sh run [SECONDS] [TARGET...]    each target SECONDS (600),
#       one after the other; new inputs go into fuzz/corpus/<target>, which is
#       minimized (cargo fuzz cmin) afterwards
#   scripts/fuzz.sh list                          the targets
#
# cargo-fuzz is installed once into $DWCP_CACHE/cargo-fuzz (default
# ${XDG_CACHE_HOME:-~/.cache}/dwcp). Builds go to $FUZZ_TARGET_DIR (default
# ${CARGO_TARGET_DIR:-target}/fuzz). Crashes land in fuzz/artifacts/<target>/.
# A summary (target, seconds, executions, exec/s, coverage, result) is printed
# and written to $FUZZ_TARGET_DIR/fuzz-summary.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CARGO_FUZZ_VERSION=0.13.2
CACHE=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}
CF_ROOT=$CACHE/cargo-fuzz
TARGETS=(wire_hello wire_reply wire_frame codec_decode control_request dwcp_uri raft_frame linkem_config config_toml)

# Longest input per target (libFuzzer -max_len); committed inputs stay below 64 KiB.
max_len() {
    case $1 in
        wire_reply) echo 256 ;;
        wire_hello | dwcp_uri | linkem_config) echo 1024 ;;
        control_request | config_toml) echo 4096 ;;
        wire_frame | raft_frame) echo 16384 ;;
        codec_decode) echo 65536 ;;
        *) echo 4096 ;;
    esac
}

mode=${1:-smoke}
shift || true
case $mode in
    list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
    smoke) secs=${1:-10} ;;
    run) secs=${1:-600} ;;
    *) echo "usage: $0 smoke|run [SECONDS] [TARGET...] | list" >&2; exit 2 ;;
esac
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")

if ! "$CF_ROOT/bin/cargo-fuzz" --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $CF_ROOT (once)" >&2
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$CF_ROOT"
fi
export PATH=$CF_ROOT/bin:$PATH
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/fuzz}
case $FUZZ_TARGET_DIR in /*) ;; *) FUZZ_TARGET_DIR=$ROOT/$FUZZ_TARGET_DIR ;; esac
export CARGO_TARGET_DIR=$FUZZ_TARGET_DIR
mkdir -p "$FUZZ_TARGET_DIR"

# One build of every target (no sanitizer, optimized, debug assertions on).
cargo fuzz build -s none

summary=$FUZZ_TARGET_DIR/fuzz-summary.tsv
printf 'target\tseconds\texecutions\texec/s\tcov\tft\tcorpus\tresult\n' >"$summary"
failed=()
for t in "${targets[@]}"; do
    corpus=$ROOT/fuzz/corpus/$t
    mkdir -p "$corpus" "$ROOT/fuzz/artifacts/$t"
    log=$FUZZ_TARGET_DIR/fuzz-$t.log
    if [ "$mode" = smoke ]; then
        scratch=$FUZZ_TARGET_DIR/smoke-corpus/$t
        rm -rf "$scratch" && mkdir -p "$scratch"
        dirs=("$scratch" "$corpus")
    else
        dirs=("$corpus")
    fi
    echo "== $t: ${secs}s" >&2
    start=$(date +%s)
    result=ok
    if ! cargo fuzz run -s none "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -max_len="$(max_len "$t")" \
        -timeout=10 -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1; then
        result=CRASH
        failed+=("$t")
        grep -E "panicked|ERROR: libFuzzer|Test unit written|SUMMARY" "$log" | head -8 >&2 || true
    fi
    elapsed=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    if [ "$mode" = run ] && [ "$result" = ok ]; then
        # cmin keeps coverage, not names: the regress-* inputs of crashes
        # found earlier (docs/fuzzing.md) are put back afterwards.
        keep=$FUZZ_TARGET_DIR/regress-$t
        rm -rf "$keep" && mkdir -p "$keep"
        find "$corpus" -maxdepth 1 -name 'regress-*' -exec cp {} "$keep/" \;
        cargo fuzz cmin -s none "$t" "$corpus" -- -max_len="$(max_len "$t")" -rss_limit_mb=1024 \
            >"$FUZZ_TARGET_DIR/cmin-$t.log" 2>&1 || echo "cmin of $t failed (see cmin-$t.log)" >&2
        cp "$keep"/. "$corpus/" -r
    fi
    n=$(find "$corpus" -type f | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$elapsed" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "${ft:-?}" "$n" "$result" >>"$summary"
done
column -t -s $'\t' "$summary"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/, logs in $FUZZ_TARGET_DIR/fuzz-*.log)" >&2
    exit 1
fi
