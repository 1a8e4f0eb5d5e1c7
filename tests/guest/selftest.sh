#!/usr/bin/env bash
# Proves the DWCP test guest works (about 60-90 s under TCG):
#  1. host unit test of the checker (dwcp-workload --selftest: flips bytes, must detect them);
#  2. boots the guest (-m 512, dwcp.fill=200 dwcp.dirty=16): DWCP-READY, heartbeats, errors=0;
#  3. migrates it live to a second local QEMU with QEMU's own unix-socket channel while it
#     dirties 16 MiB/s; the destination must keep printing heartbeats with errors=0 for >= 10 s
#     and complete two full verification sweeps;
#  4. corrupts one byte of the fill area of a running guest from the host (shared RAM file):
#     the guest must print DWCP-ERROR for exactly that page.
# Exits non-zero on failure.  KEEP=1 keeps the logs in the work directory.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
work=$(mktemp -d /tmp/dwcp-guest-selftest.XXXXXX)
qemu=(qemu-system-x86_64 -accel tcg -cpu qemu64 -machine pc -smp 1 -nodefaults -no-user-config -display none)
pids=()
ok=0

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$ok" = 1 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "logs kept in $work"; fi
}
trap cleanup EXIT

t_start=$(date +%s.%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
step() { echo "[$(elapsed)s] == $*"; }
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/*.log "$work"/*.qemu-stderr; do [ -e "$f" ] && { echo "--- tail $f" >&2; tail -n 5 "$f" >&2; }; done
  exit 1
}
qmp() { python3 "$here/qmp.py" "$@"; }
# wait_for FILE REGEX TIMEOUT_S: wait until a line of FILE matches
wait_for() {
  local deadline=$(( $(date +%s) + $3 ))
  until grep -aqE "$2" "$1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
# complete heartbeat lines of a serial log (the guest tty writes CR LF)
hb_lines() { tr -d '\r' < "$1" | grep -aE '^DWCP-HB seq=[0-9]+ t_ms=[0-9]+ dirtied_mb=[0-9]+ swept=[0-9]+ errors=[0-9]+$' || true; }
field() { sed -nE "s/.* $1=([0-9]+).*/\1/p"; }
check_clean() { # LOG: no error lines, every heartbeat says errors=0
  if grep -aq 'DWCP-ERROR' "$1"; then grep -a DWCP-ERROR "$1" | head -n 5 >&2; fail "$1: DWCP-ERROR"; fi
  if hb_lines "$1" | grep -vq ' errors=0$'; then fail "$1: heartbeat with errors != 0"; fi
  if grep -aqE 'DWCP-WORKLOAD-EXIT|DWCP-FATAL|Kernel panic|Oops' "$1"; then fail "$1: workload exited or kernel trouble"; fi
}

command -v python3 >/dev/null || fail "python3 not found (make setup)"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not found (make setup)"

step "build"
"$here/build.sh" "$out" | sed 's/^/   /'

step "1. host unit test of the checker"
"$out/dwcp-workload" --selftest --fill 16 > "$work/unit.log" 2>&1 || { cat "$work/unit.log"; fail "unit selftest"; }
sed 's/^/   /' "$work/unit.log" | grep -E 'SELFTEST (OK|fill)'

step "2. boot source guest (-m 512, fill 200 MiB, dirty 16 MiB/s)"
append="console=ttyS0 panic=-1 quiet dwcp.fill=200 dwcp.dirty=16"
boot0=$(date +%s.%N)
"${qemu[@]}" -m 512 -serial "file:$work/src.log" -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
  -append "$append" -qmp "unix:$work/src.sock,server=on,wait=off" 2>"$work/src.qemu-stderr" &
pids+=($!)
wait_for "$work/src.log" '^DWCP-BOOT' 30 || fail "no DWCP-BOOT within 30 s"
t_boot=$(awk -v a="$boot0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
wait_for "$work/src.log" '^DWCP-READY' 60 || fail "no DWCP-READY within 60 s"
t_ready=$(awk -v a="$boot0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
wait_for "$work/src.log" '^DWCP-HB seq=20 ' 20 || fail "no 20 heartbeats after DWCP-READY"
check_clean "$work/src.log"
echo "   DWCP-BOOT after ${t_boot}s, DWCP-READY after ${t_ready}s (wall, from QEMU start)"
grep -a '^DWCP-READY' "$work/src.log" | tr -d '\r' | sed 's/^/   /'
hb_lines "$work/src.log" | tail -n 2 | sed 's/^/   /'

step "3. live migration to a second QEMU (unix socket, QEMU's own channel)"
"${qemu[@]}" -m 512 -serial "file:$work/dst.log" -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
  -append "$append" -qmp "unix:$work/dst.sock,server=on,wait=off" -incoming "unix:$work/mig.sock" 2>"$work/dst.qemu-stderr" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/mig.sock" ] && break; sleep 0.1; done
[ -S "$work/mig.sock" ] || fail "destination did not open $work/mig.sock"
sleep 2  # let the source run a few more heartbeats
qmp "$work/src.sock" migrate "{\"uri\":\"unix:$work/mig.sock\"}" >/dev/null || fail "migrate command"
status=""
for _ in $(seq 600); do
  info=$(qmp "$work/src.sock" query-migrate)
  status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("status",""))' "$info")
  case "$status" in completed|failed|cancelled) break ;; esac
  sleep 0.2
done
[ "$status" = completed ] || fail "migration status: $status ($info)"
python3 - "$info" <<'PY'
import json, sys
i = json.loads(sys.argv[1]); r = i.get("ram", {})
print("   migration completed: total-time=%s ms downtime=%s ms ram transferred=%.1f MiB "
      "duplicate(zero) pages=%s normal pages=%s dirty-sync-count=%s" % (
      i.get("total-time"), i.get("downtime"), r.get("transferred", 0) / 2**20,
      r.get("duplicate"), r.get("normal"), r.get("dirty-sync-count")))
PY
src_state=$(qmp "$work/src.sock" query-status)
dst_state=$(qmp "$work/dst.sock" query-status)
echo "   source: $src_state"
echo "   destination: $dst_state"
echo "$dst_state" | grep -q '"status": "running"' || fail "destination not running"
t_mig=$(date +%s)
wait_for "$work/dst.log" '^DWCP-HB ' 10 || fail "destination printed no heartbeat within 10 s"
first_dst=$(hb_lines "$work/dst.log" | head -n 1)
last_src=$(hb_lines "$work/src.log" | tail -n 1)
sweep0=$(echo "$first_dst" | field swept)
# at least 10 s, and until two more full sweeps finished on the destination (>= 1 complete
# sweep that started after the migration)
while :; do
  now=$(date +%s)
  last_dst=$(hb_lines "$work/dst.log" | tail -n 1)
  swept=$(echo "$last_dst" | field swept)
  [ -n "$swept" ] && [ -n "$sweep0" ] || fail "cannot parse destination heartbeats"
  if [ $((now - t_mig)) -ge 10 ] && [ "$swept" -ge $((sweep0 + 2)) ]; then break; fi
  [ $((now - t_mig)) -lt 60 ] || fail "destination did not complete 2 sweeps in 60 s: $last_dst"
  check_clean "$work/dst.log"
  sleep 1
done
check_clean "$work/dst.log"
grep -aq '^DWCP-BOOT' "$work/dst.log" && fail "destination rebooted instead of continuing"
s_seq=$(echo "$last_src" | field seq); d_seq=$(echo "$first_dst" | field seq)
[ "$d_seq" -gt "$s_seq" ] && [ "$d_seq" -le $((s_seq + 3)) ] || fail "heartbeat sequence not continuous: src last $s_seq, dst first $d_seq"
n_dst=$(hb_lines "$work/dst.log" | wc -l)
[ "$n_dst" -ge 50 ] || fail "only $n_dst heartbeats on the destination"
d_mb0=$(echo "$first_dst" | field dirtied_mb); d_mb1=$(echo "$last_dst" | field dirtied_mb)
[ "$d_mb1" -gt $((d_mb0 + 100)) ] || fail "destination is not dirtying memory ($d_mb0 -> $d_mb1 MiB)"
echo "   source last:       $last_src"
echo "   destination first: $first_dst"
echo "   destination last:  $last_dst"
echo "   $n_dst heartbeats, $((d_mb1 - d_mb0)) MiB dirtied and $(( $(echo "$last_dst" | field swept) - sweep0 )) full sweeps on the destination, errors=0"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
pids=()

step "4. in-guest detection of a page corrupted from the host"
ram=/dev/shm/dwcp-selftest-ram.$$
"$out/dwcp-workload" --dump "$work/area.bin" --fill 64 --seed 7 > /dev/null
"${qemu[@]}" -m 256 -object "memory-backend-file,id=ram0,size=256M,mem-path=$ram,share=on" \
  -machine memory-backend=ram0 -serial "file:$work/cor.log" -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
  -append "console=ttyS0 panic=-1 quiet dwcp.fill=64 dwcp.dirty=0 dwcp.seed=7 dwcp.sweep_ms=1000" 2>"$work/cor.qemu-stderr" &
pids+=($!)
trap 'rm -f "$ram"; cleanup' EXIT
wait_for "$work/cor.log" '^DWCP-HB seq=10 ' 60 || fail "corruption guest did not come up"
check_clean "$work/cor.log"
idx=$(python3 "$here/corrupt.py" "$ram" "$work/area.bin" 1234) || fail "could not locate a fill page in guest RAM"
echo "   flipped one bit of fill page $idx in guest RAM"
wait_for "$work/cor.log" "^DWCP-ERROR page=$idx " 15 || fail "guest did not report page $idx"
sleep 1.5
grep -a '^DWCP-ERROR' "$work/cor.log" | tr -d '\r' | sed 's/^/   /'
[ "$(grep -ac '^DWCP-ERROR' "$work/cor.log")" = 1 ] || fail "expected exactly one DWCP-ERROR line"
hb_lines "$work/cor.log" | tail -n 1 | grep -q ' errors=1$' || fail "heartbeat does not count the error"
hb_lines "$work/cor.log" | tail -n 1 | sed 's/^/   /'

ok=1
step "PASS"
