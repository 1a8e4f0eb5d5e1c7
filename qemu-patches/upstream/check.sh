#!/bin/bash
# Checks the upstream rebase (qemu-patches/upstream/) on the newest QEMU
# source that Debian serves: fetch, git am, checkpatch, build, smoke.
# Not part of `make test` (a clean build is ~17-40 min on 2 busy cores);
# run it as `make qemu-upstream` or directly.
#
# Usage: qemu-patches/upstream/check.sh [DEBIAN-VERSION]
#   default: the newest qemu source package (sid, experimental, ...) that
#   the mirror really serves; older ones are tried when a newer one is
#   listed but its files are missing (404). E.g. 1:10.2.2+ds-1.
# Env: DWCP_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp); E2E=0 skips tests/qemu/e2e.py.
#
# Steps, each logged under $DWCP_CACHE/upstream-VERSION/:
#   1. apt-get source --download-only qemu=V  -> $DWCP_CACHE/qemu-dl/
#      (adds a deb-src list for sid/experimental if there is none)
#   2. src/: the orig tarball committed as "base" (tag), then the series
#      with plain `git am` (no -3)                              am.log
#   3. QEMU's scripts/checkpatch.pl on each patch: 0 errors required;
#      warnings are reported                                    checkpatch.log
#   4. configure as qemu-patches/build.sh does, ninja qemu-system-x86_64
#      (nice -n 19, -j2)                                        configure.log, build.log
#   5. smoke: -incoming dwcp:bogus is refused with libdwcp's message; a
#      loopback migration (clear text) of a -M none VM with 32 MiB of RAM over
#      dwcp:...?streams=4; then (unless E2E=0) tests/qemu/run.sh with
#      this binary (the project's test guest, full dwcp: matrix) smoke.log
# Exit 0 = every step passed. The last line of stdout is the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}
log() { echo "upstream/check.sh: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# 0. Dependencies: those of build.sh, plus dtc (or placeholders, below).
bash "$root/qemu-patches/setup.sh"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target-libdwcp} \
    "$root/dwcp-ffi/install.sh" "$cache/libdwcp" >&2

# 1. Source.
has_sid_src() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
        [ -f "$f" ] && grep -qw sid "$f" && grep -q deb-src "$f" && return 0
    done
    return 1
}
if ! has_sid_src; then
    log "adding deb-src for sid/experimental (/etc/apt/sources.list.d/dwcp-qemu-src.sources)"
    cat >/etc/apt/sources.list.d/dwcp-qemu-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid experimental
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -q >&2
fi
mkdir -p "$cache/qemu-dl"
if [ $# -ge 1 ]; then
    versions=$1
else
    versions=$(apt-cache showsrc qemu | sed -n 's/^Version: //p' | sort -u | sort -rV)
fi
log "qemu source versions listed: $(echo $versions)"
tarball=""
for v in $versions; do
    up=${v#*:}; up=${up%-*}                       # 1:10.2.2+ds-1 -> 10.2.2+ds
    t=$cache/qemu-dl/qemu_$up.orig.tar.xz
    if [ -s "$t" ]; then tarball=$t; ver=$v; break; fi
    if (cd "$cache/qemu-dl" && apt-get source -q --download-only "qemu=$v" >&2) && [ -s "$t" ]; then
        tarball=$t; ver=$v; break
    fi
    log "qemu=$v is listed but not served here; trying the next"
done
[ -n "$tarball" ] || die "no qemu source could be downloaded"
upver=${up%+ds}
work=$cache/upstream-$upver
src=$work/src
log "base: QEMU $upver ($(basename "$tarball"), Debian $ver, sha256 $(sha256sum "$tarball" | cut -c1-16)...)"

# 2. git am onto the pristine base.
mkdir -p "$work"
if ! git -C "$src" rev-parse -q --verify base >/dev/null 2>&1; then
    rm -rf "$src" "$work/build"
    mkdir -p "$src"
    tar -C "$src" --strip-components=1 -xf "$tarball"
    git -C "$src" init -q
    git -C "$src" add -A
    git -C "$src" -c user.name=base -c user.email=base@localhost \
        commit -qm "base: $(basename "$tarball")"
    git -C "$src" tag base
fi
git -C "$src" am --abort >/dev/null 2>&1 || true
old=$(git -C "$src" rev-parse HEAD)
# The times of the files the applied series touches: reset + am rewrite
# them, and those whose content comes out the same get their own time
# back (below), so ninja (and meson) rebuild only what changed.
git -C "$src" diff --name-only base "$old" | while read -r f; do
    if [ -e "$src/$f" ]; then echo "$(stat -c %Y "$src/$f") $f"; fi
done >"$work/mtimes"
git -C "$src" reset -q --hard base
if ! ls "$here"/0*.patch | grep -v '/0000-' | xargs git -C "$src" -c user.name=check \
        -c user.email=check@localhost am --committer-date-is-author-date >"$work/am.log" 2>&1; then
    cat "$work/am.log" >&2
    die "the series does not apply with git am on QEMU $upver (see $work/am.log)"
fi
new=$(git -C "$src" rev-parse HEAD)
log "git am: $(grep -c '^Applying:' "$work/am.log") patches applied on QEMU $upver"
while read -r t f; do
    if [ -e "$src/$f" ] && git -C "$src" diff --quiet "$old" "$new" -- "$f"; then
        touch -d "@$t" "$src/$f"
    fi
done <"$work/mtimes"

# 3. checkpatch.
: >"$work/checkpatch.log"
errors=0 warnings=0
for p in $(ls "$here"/0*.patch | grep -v '/0000-'); do
    echo "== $(basename "$p")" >>"$work/checkpatch.log"
    (cd "$src" && perl scripts/checkpatch.pl "$p") >>"$work/checkpatch.log" 2>&1 || true
done
read -r errors warnings < <(awk '/^total: / { e += $2; w += $4 } END { print e + 0, w + 0 }' \
    "$work/checkpatch.log")
log "checkpatch: $errors errors, $warnings warnings"
grep -E '^(ERROR|WARNING)' "$work/checkpatch.log" >&2 || true
[ "$errors" = 0 ] || die "checkpatch errors (see $work/checkpatch.log)"

# 4. Build. The +ds tarball has no firmware blobs: empty edk2 .bz2
# placeholders (meson unpacks them when bzip2 is installed), and empty
# .dtb ones when dtc is missing (meson then installs the prebuilt ones).
for f in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',$/\1/p" "$src/pc-bios/meson.build"); do
    [ -e "$src/pc-bios/$f.bz2" ] || bzip2 -c </dev/null >"$src/pc-bios/$f.bz2"
done
if ! command -v dtc >/dev/null; then
    for f in $(sed -n "s/^ *'\([a-z0-9_-]*\.dtb\)',$/\1/p" "$src/pc-bios/dtb/meson.build"); do
        [ -e "$src/pc-bios/dtb/$f" ] || : >"$src/pc-bios/dtb/$f"
    done
fi
export PKG_CONFIG_PATH=$cache/libdwcp/lib/pkgconfig
if ! [ -f "$work/build/build.ninja" ]; then
    rm -rf "$work/build"
    mkdir -p "$work/build"
    if ! (cd "$work/build" && nice -n 19 "$src/configure" --target-list=x86_64-softmmu \
            --without-default-features --enable-tcg --enable-dwcp --enable-gnutls \
            --disable-docs --disable-werror --disable-user --disable-download \
            --disable-install-blobs \
            --python=/usr/bin/python3 \
            --extra-ldflags="-Wl,-rpath,$cache/libdwcp/lib") >"$work/configure.log" 2>&1; then
        tail -20 "$work/configure.log" >&2
        rm -f "$work/build/build.ninja"
        die "configure failed (see $work/configure.log)"
    fi
fi
grep -E 'DWCP support' "$work/configure.log" >&2 || true
log "building qemu-system-x86_64 (log: $work/build.log)"
start=$(date +%s)
if ! nice -n 19 ninja -C "$work/build" -j2 qemu-system-x86_64 >"$work/build.log" 2>&1; then
    grep -E 'error|FAILED' "$work/build.log" | head -20 >&2
    die "build failed (see $work/build.log)"
fi
bin=$work/build/qemu-system-x86_64
log "built in $(( $(date +%s) - start )) s: $bin"

# 5. Smoke tests.
python3 - "$bin" "$work" >"$work/smoke.log" 2>&1 <<'EOF' || { cat "$work/smoke.log" >&2; die "smoke test failed (see $work/smoke.log)"; }
import json, os, socket, subprocess, sys, time
qemu, work = sys.argv[1], sys.argv[2]

def say(m):
    print(m, flush=True)

out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
say("version: " + out.splitlines()[0])

# a) a bad URI is refused with libdwcp's message
r = subprocess.run([qemu, "-M", "none", "-display", "none", "-incoming", "dwcp:bogus"],
                   capture_output=True, text=True, timeout=30)
say(f"-incoming dwcp:bogus: exit {r.returncode}: {r.stderr.strip()}")
assert r.returncode != 0 and "dwcp" in r.stderr, "dwcp:bogus not refused"

# b) loopback migration of a -M none VM (32 MiB RAM) over 4 DWCP streams
class QMP:
    def __init__(self, path, proc, errlog):
        # QEMU may take a while to open its QMP socket on a loaded machine;
        # if it exits instead, say why
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({proc.returncode}): "
                                   + open(errlog).read().strip())
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError as e:
                if time.time() > deadline:
                    raise RuntimeError(f"no QMP socket at {path} after 60 s: {e}")
                time.sleep(0.1)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")

def vm(name, *extra):
    path = os.path.join(work, f"smoke-{name}.qmp")
    if os.path.exists(path):
        os.unlink(path)
    errlog = os.path.join(work, f"smoke-{name}.stderr")
    p = subprocess.Popen([qemu, "-M", "none", "-m", "32", "-display", "none", "-nodefaults",
                          "-qmp", f"unix:{path},server=on,wait=off", *extra],
                         stdout=open(errlog, "w"), stderr=subprocess.STDOUT)
    return p, QMP(path, p, errlog)

s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
# clear text (insecure=1): libdwcp's TLS default wants /etc/pki/qemu;
# tests/qemu/run.sh (below) covers TLS with tls-creds and its own CA
dp, dst = vm("dst", "-incoming", f"dwcp:127.0.0.1:{port}?insecure=1")
sp, src = vm("src")
try:
    uri = f"dwcp:127.0.0.1:{port}?streams=4&codec=lz4&insecure=1"
    src.cmd("migrate", uri=uri)
    deadline = time.time() + 60
    while time.time() < deadline:
        st = src.cmd("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    say(f"migrate {uri}: status {st.get('status')}, "
        f"total-time {st.get('total-time')} ms, ram total {st.get('ram', {}).get('total')} B, "
        f"transferred {st.get('ram', {}).get('transferred')} B")
    assert st.get("status") == "completed", st
    for _ in range(100):
        ds = dst.cmd("query-status")["status"]
        if ds in ("paused", "running"):
            break
        time.sleep(0.1)
    say(f"source {src.cmd('query-status')['status']}, destination {ds}")
    assert ds in ("paused", "running"), ds
finally:
    for p in (sp, dp):
        p.kill()
        p.wait()
say("smoke: OK")
EOF
cat "$work/smoke.log" >&2
if [ "${E2E:-1}" != 0 ]; then
    log "tests/qemu/run.sh with $bin (log: $work/e2e.log)"
    if ! QEMU=$bin bash "$root/tests/qemu/run.sh" >"$work/e2e.log" 2>&1; then
        tail -20 "$work/e2e.log" >&2
        die "tests/qemu/run.sh failed on QEMU $upver (see $work/e2e.log)"
    fi
    tail -3 "$work/e2e.log" >&2
fi
log "OK: QEMU $upver + series: git am, checkpatch ($errors errors, $warnings warnings), build, smoke"
echo "$bin"
