#!/usr/bin/env bash
# End-to-end tests: stock `virsh migrate --live` between two real libvirtd
# hosts through DWCP agents, with the libvirt hook installed. Exits non-zero
# on the first failure; the lab is torn down in any case (KEEP=1 keeps logs).
# Needs root, libvirt (tests/libvirt/setup.sh), target/release/dwcp and the
# test guest (tests/guest/build.sh). ONLY=name[,name] runs a subset.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tests/libvirt/lab.sh
source tests/libvirt/nova.sh
ROOT=$(pwd)
trap 'lab_down' EXIT
trap 'exit 130' INT TERM
MD_NS=https://dwcp.dev/xmlns/libvirt/1
FAILS=0 PASSES=0 XFAILS=
T0=$SECONDS

# last_session HOST: the newest session of the host's agent as JSON.
last_session() { agent_ctl "$1" '{"op":"stats"}' | python3 -c 'import json,sys; s=json.load(sys.stdin)["sessions"]; print(json.dumps(s[-1]) if s else "{}")'; }
session_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2"; }

# prepared_state HOST DOM: the agent's newest prepared entry for DOM as JSON ({} if none).
prepared_entry() {
  agent_ctl "$1" '{"op":"stats"}' | python3 -c '
import json, sys
p = [e for e in json.load(sys.stdin).get("prepared", []) if e["name"] == sys.argv[1]]
print(json.dumps(p[-1]) if p else "{}")' "$2"
}

# wait_prepared HOST DOM STATE: until the newest entry for DOM is in STATE (10 s); prints it.
wait_prepared() {
  local e i
  for i in $(seq 50); do
    e=$(prepared_entry "$1" "$2")
    [ "$(session_field "$e" state)" = "$3" ] && break
    sleep 0.2
  done
  echo "$e"
}

# --- tests -----------------------------------------------------------------

t_live_p2p_metadata() {
  # Path 1 + path 3: the domain's metadata names 2 streams and zstd; the
  # source route (dwcp-route) and the destination hook both read it.
  boot a g1 "<dwcp:migration xmlns:dwcp='$MD_NS' transport='tcp' streams='2' codec='zstd'/>" || return 1
  route a b g1 || return 1
  migrate a b g1 --verbose || return 1
  verify_moved a b g1 || return 1
  local s; s=$(last_session a)
  [ "$(session_field "$s" streams)" = 2 ] && [[ "$(session_field "$s" tier)" == zstd* ]] ||
    { fail "session did not use the metadata's settings: $s"; return 1; }
  [ "$(session_field "$(last_session b)" state)" != None ] || { fail "no session on the destination agent"; return 1; }
  grep -q 'g1: migrate begin: accepted, transport=tcp streams=2 codec=zstd (from metadata)' "$LAB/b/log/dwcp-hook.log" ||
    { fail "hook did not log its choice"; return 1; }
  # The hook's choice is in the destination agent's view (op prepare), linked
  # to the session that carried the migration, which ended it (released).
  local p; p=$(wait_prepared b g1 released)
  python3 - "$p" "$(hvirsh a domuuid g1 2>/dev/null || hvirsh b domuuid g1)" <<'PY' || { fail "agent's prepared entry on b: $p"; return 1; }
import json, sys
e, uuid = json.loads(sys.argv[1]), sys.argv[2].strip()
assert e["state"] == "released", e["state"]
assert e["streams"] == 2 and e["codec"] == "zstd" and e["transport"] == "tcp", e
assert e["chosen_by"].startswith("libvirt hook: metadata"), e["chosen_by"]
assert e["uuid"] == uuid, (e["uuid"], uuid)
assert e["started_at"] and e["ended_at"] >= e["started_at"] >= e["prepared_at"], e
u = e["used"]
assert u["role"] == "responder" and u["state"] == "completed", u
assert u["streams"] == 2 and u["codec"] == "zstd" and e["used_matches"] is True, u
PY
  hx b "$DWCP_BIN" stats >"$LAB/stats.out" || { fail "dwcp stats"; return 1; }
  grep -A1 '^  g1 .*released .*tcp streams=2 codec=zstd  chosen by libvirt hook: metadata' "$LAB/stats.out" |
    grep -q 'used: session .*(responder completed) streams=2 codec=zstd  (as prepared)' ||
    { fail "dwcp stats on b does not show the prepared choice"; cat "$LAB/stats.out" >&2; return 1; }
  lv_log "dwcp stats on b: $(sed -n '/^Prepared/,/^Sessions/p' "$LAB/stats.out" | tr -s ' ' | tr '\n' '|')"
  unroute a g1
  lv_log "session: $(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print({k:s.get(k) for k in ("streams","tier","raw_out","wire_out","ratio_out","elapsed_s")})' "$s")"
}

t_parallel_back() {
  # Back from b to a with 4 multifd connections (each one a DWCP channel).
  route b a g1 --streams 4 --codec lz4 || return 1
  migrate b a g1 --parallel --parallel-connections 4 || return 1
  verify_moved b a g1 || return 1
  local s; s=$(last_session b)
  lv_log "parallel session: channels=$(session_field "$s" channels) streams=$(session_field "$s" streams)"
  unroute b g1
}

t_exact_ram() {
  # Exact RAM identity: pause, dump the source, migrate (destination stays
  # paused with --suspend), dump the destination, compare, resume.
  local size=$(( ${GUEST_MB:-256} << 20 ))
  hvirsh a suspend g1 >/dev/null || return 1
  rm -f "$LAB"/ram-*
  hvirsh a qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/ram-src\"" || return 1
  route a b g1 || return 1
  migrate a b g1 --suspend --parallel --parallel-connections 2 || return 1
  [ "$(hvirsh b domstate g1)" = paused ] || { fail "destination not paused"; return 1; }
  hvirsh b qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/ram-dst\"" || return 1
  local a b; a=$(sha256sum <"$LAB/ram-src"); b=$(sha256sum <"$LAB/ram-dst")
  [ -s "$LAB/ram-src" ] && [ "$a" = "$b" ] || { cmp "$LAB/ram-src" "$LAB/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical ($size bytes, sha256 ${a:0:16})"
  rm -f "$LAB"/ram-*
  hvirsh b resume g1 >/dev/null || return 1
  unroute a g1
  verify_moved a b g1
}

# expect_refused FROM TO DOM PATTERN [virsh args]: migration fails with PATTERN,
# the domain keeps running on FROM and nothing is left on TO.
expect_refused() {
  local f=$1 t=$2 d=$3 pat=$4; shift 4
  if migrate "$f" "$t" "$d" "$@"; then fail "migration should have failed"; return 1; fi
  grep -q -- "$pat" "$LAB/virsh.out" || { fail "error does not say '$pat'"; return 1; }
  running_on "$f" "$d" || { fail "$d not running on $f after the failure"; return 1; }
  sleep 1
  domain_gone "$t" "$d" || { fail "$d left on $t"; hvirsh "$t" list --all >&2; return 1; }
  [ -z "$(hvirsh "$t" list --all --name)" ] || { fail "domains left on $t"; return 1; }
  lv_log "refused as expected: $(grep -o -- "$pat.*" "$LAB/virsh.out" | head -1)"
}

t_dwcp_virsh_migrate() {
  # Path 2: `dwcp virsh-migrate` (virt crate): route from metadata, libvirt
  # migrateToURI3 with a unix:// URI, progress, result with downtime.
  local out
  out=$(hx b "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[a]}" --parallel 2 --json) || { fail "dwcp virsh-migrate: $out"; return 1; }
  lv_log "dwcp virsh-migrate: $out"
  verify_moved b a g1 || return 1
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert r["wire_bytes"] and r["wire_bytes"]>0 and r["elapsed_s"]>0, r' "$out" || { fail "bad result"; return 1; }
  hx a "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[b]}" || { fail "dwcp virsh-migrate back"; return 1; }
  verify_moved a b g1
}

# nova_guest_on_b: g1 running on b (booted there when no earlier test left it).
nova_guest_on_b() {
  running_on b g1 && return 0
  if running_on a g1; then
    route a b g1 && migrate a b g1 && verify_moved a b g1 || return 1
    unroute a g1
  else
    boot b g1 || return 1
  fi
}

# nova_check_sessions SRC DST: the newest nova-* session on both agents is
# the same migration, named nova-<DST address>-<port>, completed.
nova_check_sessions() {
  local s d n
  s=$(nova_session "$1" 'nova-*'); d=$(nova_session "$2" 'nova-*')
  n=$(session_field "$s" name)
  [[ "$n" == nova-${IP[$2]}-* ]] || { fail "not carried by a DWCP session nova-${IP[$2]}-PORT on $1: $s"; return 1; }
  [ "$(session_field "$d" name)" = "$n" ] || { fail "destination agent's session is not $n: $d"; return 1; }
  [ "$(session_field "$s" state)" = completed ] && [ "$(session_field "$d" state)" = completed ] ||
    { fail "sessions not completed: $s / $d"; return 1; }
  [ "$(session_field "$s" role)" = initiator ] && [ "$(session_field "$d" role)" = responder ] || { fail "roles: $s / $d"; return 1; }
  lv_log "carried by DWCP session $n on both agents: $(session_field "$s" wire_out) bytes on the wire, ratio $(session_field "$s" ratio_out)"
}

t_nova_tcp() {
  # Nova's exact libvirt call (nova.sh: nova_call) carried by the agents'
  # own ingress (--nova-ingress on the source, --deliver-tcp on the
  # destination) behind the REDIRECT rule of docs/nova.md: no relay process.
  # g1 goes b -> a running (live), then a -> b paused for an exact RAM
  # comparison.
  nova_guest_on_b || return 1
  nova_call b a g1 || { fail "nova-style migration: $(cat "$LAB/virsh.out")"; return 1; }
  verify_moved b a g1 || return 1
  nova_check_sessions b a || return 1
  # Back, paused: RAM of the source before == RAM of the destination after.
  local size=$(( ${GUEST_MB:-256} << 20 )) x y
  hvirsh a suspend g1 >/dev/null || return 1
  rm -f "$LAB"/ram-*
  hvirsh a qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/ram-src\"" || return 1
  nova_call a b g1 --suspend || { fail "nova-style migration back: $(cat "$LAB/virsh.out")"; return 1; }
  [ "$(hvirsh b domstate g1)" = paused ] || { fail "destination not paused"; return 1; }
  hvirsh b qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/ram-dst\"" || return 1
  x=$(sha256sum <"$LAB/ram-src"); y=$(sha256sum <"$LAB/ram-dst")
  [ -s "$LAB/ram-src" ] && [ "$x" = "$y" ] || { cmp "$LAB/ram-src" "$LAB/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical after the Nova path ($size bytes, sha256 ${x:0:16})"
  rm -f "$LAB"/ram-*
  hvirsh b resume g1 >/dev/null || return 1
  nova_check_sessions a b || return 1
  # PERSIST_DEST defined g1 on b: transient again, as the other tests expect.
  hvirsh b undefine g1 >/dev/null || return 1
  verify_moved a b g1
}

t_nova_fail_no_peer() {
  # A redirected connection whose session cannot be opened: a's data port
  # rejects connections (its agent is up, so the libvirt hook lets the
  # migration start). b's ingress closes QEMU's connection naming the cause;
  # the migration fails, g1 keeps running on b, nothing is left on a.
  nova_guest_on_b || return 1
  local rule=(INPUT -p tcp --dport 7070 -j REJECT --reject-with tcp-reset)
  hx a iptables -A "${rule[@]}" || return 1
  MIG_TIMEOUT=60 nova_call b a g1
  local rc=$?
  hx a iptables -D "${rule[@]}"
  [ $rc != 0 ] || { fail "migration should have failed"; return 1; }
  running_on b g1 || { fail "g1 not running on b after the failure"; return 1; }
  sleep 1
  domain_gone a g1 || { fail "g1 left on a"; hvirsh a list --all >&2; return 1; }
  local why
  why=$(agent_ctl b '{"op":"stats"}' | python3 -c '
import json, sys
r = json.load(sys.stdin)["nova"]["ingress"]["last_refusals"]
print(r[-1]["reason"] if r else "")')
  [[ "$why" == *"nova-${IP[a]}-"*"${IP[a]}:7070"*"refused"* ]] ||
    { fail "b's ingress does not name the cause: '$why'"; return 1; }
  grep -q "cannot relay migration to ${IP[a]}:7070" "$LAB/b/agent.log" || { fail "no log line naming the cause on b"; return 1; }
  lv_log "refused as expected: ingress on b: $why; virsh: $(head -1 "$LAB/virsh.out")"
  # And the same call works once a's data port is back.
  nova_call b a g1 || return 1
  verify_moved b a g1 || return 1
  route a b g1 || return 1
  migrate a b g1 --undefinesource || return 1
  verify_moved a b g1 || return 1
  unroute a g1
}

t_fail_dst_agent_down() {
  # g1 is on b now: move it b -> a with a's agent down; the hook on a refuses.
  route b a g1 || return 1
  agent_down a
  expect_refused b a g1 "agent at /run/dwcp/agent.sock is not reachable" || return 1
  agent_up a || return 1
  migrate b a g1 || return 1
  verify_moved b a g1 || return 1
  unroute b g1
}

t_fail_src_agent_down() {
  route a b g1 || return 1
  agent_down a   # the route socket is left behind, nobody accepts on it
  expect_refused a b g1 "g1.sock" || return 1
  agent_up a || return 1
  route a b g1 || return 1
  migrate a b g1 || return 1
  verify_moved a b g1 || return 1
  unroute a g1
}

t_fail_wrong_socket() {
  # No route for this path on b: QEMU cannot connect; then the right one works.
  route b a g1 || return 1
  if hx b timeout 60 virsh -q -c qemu:///system migrate --live --p2p g1 "$(dst_uri a)" --migrateuri unix:///run/dwcp/nosuch.sock >"$LAB/virsh.out" 2>&1; then
    fail "migration to a wrong socket succeeded"; return 1
  fi
  grep -q "nosuch.sock" "$LAB/virsh.out" || { fail "error does not name the socket: $(cat "$LAB/virsh.out")"; return 1; }
  running_on b g1 && domain_gone a g1 || { fail "state after wrong socket"; return 1; }
  lv_log "refused as expected: $(head -1 "$LAB/virsh.out")"
  migrate b a g1 || return 1
  verify_moved b a g1 || return 1
  unroute b g1
}

t_fail_bad_metadata() {
  boot a g2 "<dwcp:migration xmlns:dwcp='$MD_NS' streams='999' codec='lz9'/>" || return 1
  route a b g2 --streams 4 --codec lz4 || return 1
  expect_refused a b g2 "streams='999' is invalid" || return 1
  unroute a g2
  hvirsh a destroy g2 >/dev/null
}

# kill_mid FROM TO DOM WHAT: start a slow migration, kill WHAT on TO after 3 s.
kill_mid() {
  local f=$1 t=$2 d=$3 what=$4
  route "$f" "$t" "$d" || return 1
  ( # Wait until the destination QEMU exists and data is flowing, then kill.
    for _ in $(seq 300); do hx "$t" test -s "/run/libvirt/qemu/$d.pid" && break; sleep 0.2; done
    for _ in $(seq 300); do
      hvirsh "$f" domjobinfo "$d" 2>/dev/null | grep -Eq 'Memory processed: +[0-9.]*[1-9]' && break; sleep 0.2
    done
    sleep 1
    case $what in
      qemu) lv_log "killing QEMU on $t"; kill -9 "$(hx "$t" cat "/run/libvirt/qemu/$d.pid")" ;;
      agent) lv_log "killing the agent on $t"; agent_down "$t" ;;
      link) lv_log "cutting the link at $t"; ip -n "${NS[$t]}" link set "${LV_TAG}v$t" down ;;
    esac ) &
  local killer=$!
  MIG_TIMEOUT=$([ "$what" = link ] && echo 90 || echo 30) migrate "$f" "$t" "$d" --bandwidth 4
  local rc=$? xfail=0
  wait $killer
  if [ "$what" = link ]; then
    ip -n "${NS[$t]}" link set "${LV_TAG}v$t" up
    for _ in $(seq 150); do domain_gone "$t" "$d" && break; sleep 0.2; done
  fi
  if [ $rc = 124 ]; then
    # KNOWN BUG (dwcp-core, deliverer): the destination agent treats QEMU's
    # EOF as a normal close and discards what arrives after it, so the
    # session never fails and the source streams into the void until
    # libvirt is told to stop. Abort the job like an operator would.
    lv_log "KNOWN BUG: migration still running 30 s after the destination $what died; virsh domjobabort"
    hvirsh "$f" domjobabort "$d" || true
    for _ in $(seq 50); do running_on "$f" "$d" && ! hvirsh "$f" domjobinfo "$d" 2>/dev/null | grep -q Unbounded && break; sleep 0.2; done
    xfail=1
  elif [ $rc = 0 ]; then
    fail "migration should have failed"; return 1
  fi
  running_on "$f" "$d" || { fail "$d not running on $f after the failure"; return 1; }
  sleep 1
  domain_gone "$t" "$d" || { fail "$d left on $t"; return 1; }
  lv_log "after the failure: $d running on $f, nothing on $t ($(tr '\n' ' ' <"$LAB/virsh.out" | cut -c1-160))"
  if [ "$what" = link ]; then
    # The destination agent's entry for the failed attempt ended as failed.
    local p; p=$(wait_prepared "$t" "$d" failed)
    [ "$(session_field "$p" state)" = failed ] || { fail "prepared entry on $t after the failure: $p"; return 1; }
    lv_log "agent on $t: $d $(session_field "$p" state) ($(session_field "$p" reason))"
  fi
  [ "$what" = agent ] && { agent_up "$t" || return 1; }
  migrate "$f" "$t" "$d" || return 1
  verify_moved "$f" "$t" "$d" || return 1
  unroute "$f" "$d"
  [ $xfail = 0 ] || return 2
}

t_fail_dst_qemu_dies() { kill_mid a b g1 qemu; }
t_fail_dst_agent_dies() { kill_mid b a g1 agent; }
t_fail_link_cut() { kill_mid a b g1 link; }

TESTS="live_p2p_metadata parallel_back exact_ram dwcp_virsh_migrate nova_tcp nova_fail_no_peer fail_dst_agent_down fail_src_agent_down fail_wrong_socket fail_bad_metadata fail_dst_qemu_dies fail_dst_agent_dies fail_link_cut"

lv_log "lab: $LAB"
lab_up || { lv_log "lab did not come up"; exit 1; }
for t in $TESTS; do
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$t,"* ]]; then continue; fi
  lv_log "=== $t"
  t1=$SECONDS
  "t_$t"; rc=$?
  if [ $rc = 0 ]; then
    PASSES=$((PASSES + 1)); lv_log "--- PASS $t ($((SECONDS - t1)) s)"
  elif [ $rc = 2 ]; then
    XFAILS="$XFAILS $t"; lv_log "--- XFAIL $t (known bug, see the log above; $((SECONDS - t1)) s)"
  else
    FAILS=$((FAILS + 1)); lv_log "--- FAIL $t ($((SECONDS - t1)) s)"
    [ -n "${KEEP_GOING:-}" ] || break
  fi
done
lv_log "libvirt tests: $PASSES passed, $FAILS failed, known bugs:${XFAILS:- none} in $((SECONDS - T0)) s"
[ $FAILS = 0 ] && [ $PASSES -gt 0 ]
