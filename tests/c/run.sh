#!/bin/sh
# Builds the C API tests against include/dwcp.h and runs them twice:
#  1. linked with the staticlib (libdwcp.a), under ASan + UBSan;
#  2. linked with the cdylib (libdwcp.so), no sanitizers (what QEMU does).
# Why the staticlib under ASan: the sanitizer runtime must come first in
# the process; with a static link there is no LD_PRELOAD/DSO-order issue,
# and ASan still sees every allocation (Rust's System allocator calls the
# malloc ASan intercepts). Rust code itself is not instrumented.
# LeakSanitizer stays on (detect_leaks=1) and is clean: handles hold no
# memory after *_free, and session threads still draining at exit keep
# their memory reachable from their stacks. If a Rust toolchain update
# ever makes LSan report std's process-lifetime allocations, add a
# suppressions file rather than turning LSan off.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
out=${OUT:-$target/c-tests}
CC=${CC:-gcc}
CFLAGS="-std=c11 -Wall -Wextra -Werror -pedantic -g -O1 -I$root/include"
(cd "$root" && cargo build -q -p dwcp-ffi)
mkdir -p "$out"
libs="-lpthread -ldl -lm -lgcc_s -lrt -lutil"
$CC $CFLAGS -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
    -o "$out/test_api_asan" "$here/test_api.c" "$target/debug/libdwcp.a" $libs
# libdwcp.so's soname is libdwcp.so.0 (what an installed copy is called)
ln -sf "$target/debug/libdwcp.so" "$out/libdwcp.so.0"
$CC $CFLAGS -o "$out/test_api_shared" "$here/test_api.c" -L"$target/debug" -ldwcp \
    -Wl,-rpath,"$out"
echo "== test_api (static, ASan+UBSan)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$out/test_api_asan"
echo "== test_api (libdwcp.so)"
"$out/test_api_shared"
