#!/usr/bin/env bash
# End-to-end tests: stock `virsh migrate --live` between two real libvirtd
# hosts through DWCP agents, with the libvirt hook installed. Exits non-zero
# on the first failure; the lab is torn down in any case (KEEP=1 keeps logs).
# Needs root, libvirt (tests/libvirt/setup.sh), target/release/dwcp and the
# test guest (tests/guest/build.sh). ONLY=name[,name] runs a subset.
# LV_PATCHED=DIR (the build directory `make libvirt` prints) runs the hosts on
# the patched libvirtd and enables the dwcp:// tests, which need the patched
# QEMU too (make qemu; DWCP_QEMU=PATH to name it); without it they are skipped.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tests/libvirt/lab.sh
source tests/libvirt/nova.sh
ROOT=$(pwd)
trap 'lab_down' EXIT
trap 'exit 130' INT TERM
MD_NS=https://dwcp.dev/xmlns/libvirt/1
FAILS=0 PASSES=0 XFAILS= SKIPS=
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

# persistent_on HOST DOM: DOM has a persistent definition on HOST.
persistent_on() { hvirsh "$1" list --all --persistent --name | grep -qx "$2"; }

# stat_of HOST PATH: "mode owner:group" of PATH inside HOST.
stat_of() { hx "$1" stat -c '%a %U:%G' "$2"; }

t_unprivileged_qemu() {
  # Debian's qemu.conf as installed (no setting uncommented), QEMU as
  # libvirt-qemu under the DAC security driver, and the agent's sockets
  # usable by libvirt-qemu and nobody else (--socket-group libvirt-qemu).
  local h set
  for h in $HOSTS; do
    # One line is the lab's: where migration TLS finds its credentials.
    set=$(grep -Ev '^[[:space:]]*(#|$)' "$LAB/$h/etc/qemu.conf" |
      grep -vx 'migrate_tls_x509_cert_dir = "/var/lib/libvirt/pki"')
    [ -z "$set" ] || { fail "qemu.conf on $h is not the default: $set"; return 1; }
  done
  local sm; sm=$(hvirsh a capabilities | secmodels)
  lv_log "secmodel: $sm"
  local ids; ids="+$(id -u libvirt-qemu):+$(getent group libvirt-qemu | cut -d: -f3)"
  # No LSM in this kernel: libvirt's primary driver is "none", DAC stacked on it.
  [[ "$sm" == "none doi=0; dac doi=0 kvm=$ids,qemu=$ids" ]] ||
    { fail "expected the none + DAC drivers with libvirt-qemu ($ids), got: $sm"; return 1; }
  local on; on=$( running_on a g1 && echo a || echo b )
  assert_unprivileged "$on" g1 || return 1
  lv_log "QEMU of g1 on $on runs as $(qemu_user "$on" g1) (pid $(hx "$on" cat /run/libvirt/qemu/g1.pid))"
  for h in $HOSTS; do
    [ "$(stat_of "$h" /run/dwcp)" = "1770 root:libvirt-qemu" ] &&
      [ "$(stat_of "$h" /run/dwcp/agent.sock)" = "600 root:root" ] ||
      { fail "$h: /run/dwcp $(stat_of "$h" /run/dwcp), agent.sock $(stat_of "$h" /run/dwcp/agent.sock)"; return 1; }
  done
  agent_ctl a '{"op":"route","name":"probe","to":"'"${IP[b]}"':7070"}' >/dev/null || return 1
  [ "$(stat_of a /run/dwcp/probe.sock)" = "660 root:libvirt-qemu" ] ||
    { fail "route socket: $(stat_of a /run/dwcp/probe.sock)"; return 1; }
  # libvirt-qemu can connect to it, another unprivileged user cannot.
  local conn='import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])'
  hx a setpriv --reuid=libvirt-qemu --regid=libvirt-qemu --init-groups /usr/bin/python3 -c "$conn" /run/dwcp/probe.sock ||
    { fail "libvirt-qemu cannot connect to the route socket"; return 1; }
  if hx a setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 -c "$conn" /run/dwcp/probe.sock 2>/dev/null; then
    fail "nobody could connect to the route socket"; return 1
  fi
  agent_ctl a '{"op":"unroute","name":"probe"}' >/dev/null
  lv_log "/run/dwcp 1770 root:libvirt-qemu, agent.sock 600 root:root, route sockets 660 root:libvirt-qemu; nobody cannot connect"
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
  # QEMU (libvirt-qemu) writes the dumps: into $LAB/qemu-out, which it owns.
  local out=$LAB/qemu-out
  rm -f "$out"/ram-*
  hvirsh a qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$out/ram-src\"" || return 1
  route a b g1 || return 1
  migrate a b g1 --suspend --parallel --parallel-connections 2 || return 1
  [ "$(hvirsh b domstate g1)" = paused ] || { fail "destination not paused"; return 1; }
  hvirsh b qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$out/ram-dst\"" || return 1
  local a b; a=$(sha256sum <"$out/ram-src"); b=$(sha256sum <"$out/ram-dst")
  [ -s "$out/ram-src" ] && [ "$a" = "$b" ] || { cmp "$out/ram-src" "$out/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical ($size bytes, sha256 ${a:0:16})"
  rm -f "$out"/ram-*
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
  # Path 2: `dwcp virsh-migrate` (virt crate): route from metadata (read with
  # an XML parser), libvirt migrateToURI3 with a unix:// URI, progress,
  # result with downtime. g1 is made persistent on b first; with
  # --persistent --undefinesource it ends up defined on a and not on b.
  local out
  out=$(hx b "$DWCP_BIN" virsh-migrate g1 --to "${IP[a]}" --postcopy 2>&1) && { fail "--postcopy accepted"; return 1; }
  [[ "$out" == *"post-copy is not supported by DWCP yet: "* ]] || { fail "--postcopy: $out"; return 1; }
  running_on b g1 || { fail "g1 not running on b after --postcopy"; return 1; }
  lv_log "refused as expected: $(tail -1 <<<"$out")"
  hvirsh b dumpxml g1 >"$LAB/g1-persist.xml" && hvirsh b define "$LAB/g1-persist.xml" >/dev/null || return 1
  persistent_on b g1 || { fail "g1 not persistent on b"; return 1; }
  out=$(hx b "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[a]}" --transport tcp --parallel 2 \
    --persistent --undefinesource --auto-converge --json) || { fail "dwcp virsh-migrate: $out"; return 1; }
  lv_log "dwcp virsh-migrate --persistent --undefinesource --auto-converge: $out"
  verify_moved b a g1 || return 1
  persistent_on a g1 || { fail "g1 not defined on a"; return 1; }
  hvirsh b list --all --name | grep -qx g1 && { fail "g1 still defined on b"; return 1; }
  lv_log "g1 is defined on a, not on b"
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert r["wire_bytes"] and r["wire_bytes"]>0 and r["elapsed_s"]>0 and r["streams"]==2, r' "$out" || { fail "bad result"; return 1; }
  # Back, undefined on a, transient on b (as the next tests expect).
  hx a "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[b]}" --dest-uri "qemu+tcp://${IP[b]}/system" --undefinesource ||
    { fail "dwcp virsh-migrate back"; return 1; }
  verify_moved a b g1 || return 1
  ! persistent_on b g1 && ! hvirsh a list --all --name | grep -qx g1 || { fail "g1 persistent on b or left on a"; return 1; }
}

t_dwcp_virsh_migrate_tls() {
  # `dwcp virsh-migrate --dest-uri qemu+tls://...`: the source libvirtd
  # reaches the destination's over TLS (the lab's PKI), the data goes
  # through DWCP as before. g1 goes b -> a -> b.
  [ -e "$LAB/pki/client/clientcert.pem" ] || { lv_log "SKIP: no lab PKI (openssl)"; return 0; }
  hx b virsh -q -c "$(tls_uri a)" version >/dev/null || { fail "no TLS connection to a's libvirtd"; return 1; }
  local out
  out=$(hx b "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[a]}" --dest-uri "$(tls_uri a)" --json) ||
    { fail "dwcp virsh-migrate over qemu+tls: $out"; return 1; }
  [[ "$out" == *'"dest_uri":"qemu+tls://'* ]] || { fail "result: $out"; return 1; }
  verify_moved b a g1 || return 1
  hx a "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[b]}" --dest-uri "$(tls_uri b)" --quiet ||
    { fail "dwcp virsh-migrate back over qemu+tls"; return 1; }
  verify_moved a b g1 || return 1
  # A plain virsh migrate over qemu+tls through DWCP too.
  route b a g1 || return 1
  lv_log "virsh migrate --live --p2p g1 $(tls_uri a) --migrateuri unix:///run/dwcp/g1.sock"
  hx b timeout 120 virsh -q -c qemu:///system migrate --live --p2p g1 "$(tls_uri a)" \
    --migrateuri unix:///run/dwcp/g1.sock >"$LAB/virsh.out" 2>&1 || { fail "virsh over qemu+tls: $(cat "$LAB/virsh.out")"; return 1; }
  verify_moved b a g1 || return 1
  unroute b g1
  route a b g1 && migrate a b g1 && verify_moved a b g1 || return 1
  unroute a g1
}

t_dwcp_virsh_migrate_ssh() {
  # `dwcp virsh-migrate` with the destination's libvirtd over ssh: the
  # source libvirtd runs ssh (root, the lab's keys, strict host key
  # checking) to the destination host's sshd, which runs virt-ssh-helper
  # there; the data goes through DWCP as before. g1 goes b -> a (--dest-uri
  # qemu+ssh://root@A/system) live, then a -> b (--transport ssh) paused:
  # the destination's RAM must equal the source's.
  [ -e "$LAB/a/sshd/sshd_config" ] || { lv_log "SKIP: no sshd (tests/libvirt/setup.sh installs openssh-server)"; return 3; }
  hx b virsh -q -c "$(ssh_uri a)" version >/dev/null || { fail "no ssh connection to a's libvirtd"; tail -5 "$LAB/a/sshd.log" >&2; return 1; }
  local n0 out; n0=$(grep -c "Accepted publickey for root from ${IP[b]}" "$LAB/a/sshd.log")
  out=$(hx b "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[a]}" --dest-uri "$(ssh_uri a)" --json) ||
    { fail "dwcp virsh-migrate over qemu+ssh: $out"; return 1; }
  [[ "$out" == *'"dest_uri":"qemu+ssh://root@'* ]] || { fail "result: $out"; return 1; }
  verify_moved b a g1 || return 1
  [ "$(grep -c "Accepted publickey for root from ${IP[b]}" "$LAB/a/sshd.log")" -gt "$n0" ] ||
    { fail "a's sshd saw no login from b during the migration"; return 1; }
  # Back, paused on the source: libvirt keeps it paused on the destination.
  local size=$(( ${GUEST_MB:-256} << 20 )) x y
  hvirsh a suspend g1 >/dev/null || return 1
  rm -f "$LAB"/qemu-out/ram-*
  hvirsh a qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-src\"" || return 1
  n0=$(grep -c "Accepted publickey for root from ${IP[a]}" "$LAB/b/sshd.log")
  hx a "$DWCP_BIN" --log warn virsh-migrate g1 --to "${IP[b]}" --transport ssh --parallel 2 --quiet ||
    { fail "dwcp virsh-migrate --transport ssh back"; return 1; }
  [ "$(grep -c "Accepted publickey for root from ${IP[a]}" "$LAB/b/sshd.log")" -gt "$n0" ] ||
    { fail "b's sshd saw no login from a during the migration"; return 1; }
  [ "$(hvirsh b domstate g1)" = paused ] || { fail "destination not paused: $(hvirsh b domstate g1)"; return 1; }
  hvirsh b qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-dst\"" || return 1
  x=$(sha256sum <"$LAB/qemu-out/ram-src"); y=$(sha256sum <"$LAB/qemu-out/ram-dst")
  [ -s "$LAB/qemu-out/ram-src" ] && [ "$x" = "$y" ] || { cmp "$LAB/qemu-out/ram-src" "$LAB/qemu-out/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical after dwcp virsh-migrate over qemu+ssh ($size bytes, sha256 ${x:0:16})"
  rm -f "$LAB"/qemu-out/ram-*
  hvirsh b resume g1 >/dev/null || return 1
  verify_moved a b g1 || return 1
  lv_log "sshd: $(grep "Accepted publickey for root from ${IP[a]}" "$LAB/b/sshd.log" | tail -1 | cut -c1-120)"
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
  rm -f "$LAB"/qemu-out/ram-*
  hvirsh a qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-src\"" || return 1
  nova_call a b g1 --suspend || { fail "nova-style migration back: $(cat "$LAB/virsh.out")"; return 1; }
  [ "$(hvirsh b domstate g1)" = paused ] || { fail "destination not paused"; return 1; }
  hvirsh b qemu-monitor-command g1 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-dst\"" || return 1
  x=$(sha256sum <"$LAB/qemu-out/ram-src"); y=$(sha256sum <"$LAB/qemu-out/ram-dst")
  [ -s "$LAB/qemu-out/ram-src" ] && [ "$x" = "$y" ] || { cmp "$LAB/qemu-out/ram-src" "$LAB/qemu-out/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical after the Nova path ($size bytes, sha256 ${x:0:16})"
  rm -f "$LAB"/qemu-out/ram-*
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
  # The source agent crashes (SIGKILL): its sockets stay behind, nobody
  # listens. virsh migrate is refused naming the route socket; a new agent
  # reuses the stale sockets (control and route) and the migration goes.
  route a b g1 || return 1
  local pid; pid=$(cat "$LAB/a/agent.pid")
  kill -9 "$pid"; rm -f "$LAB/a/agent.pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  hx a test -S /run/dwcp/g1.sock && hx a test -S /run/dwcp/agent.sock ||
    { fail "the killed agent's sockets are not there"; return 1; }
  expect_refused a b g1 "g1.sock" || return 1
  grep -q "Connection refused" "$LAB/virsh.out" || { fail "error does not say the socket is dead: $(cat "$LAB/virsh.out")"; return 1; }
  local n0; n0=$(grep -c 'replacing a stale socket' "$LAB/a/agent.log")
  agent_up a || return 1
  route a b g1 || return 1
  [ "$(grep -c 'replacing a stale socket' "$LAB/a/agent.log")" -ge $(( n0 + 2 )) ] &&
    grep -q '/run/dwcp/g1.sock: replacing a stale socket' "$LAB/a/agent.log" ||
    { fail "the new agent did not say it replaced the stale sockets"; tail -5 "$LAB/a/agent.log" >&2; return 1; }
  migrate a b g1 || return 1
  verify_moved a b g1 || return 1
  unroute a g1
}

t_fail_socket_in_use() {
  # A socket something else listens on is never taken over: a route over it
  # and a second agent on the same run dir are refused, naming the cause.
  hx a sh -c 'echo $$ > "$1"; exec python3 -c "
import socket, time
s = socket.socket(socket.AF_UNIX); s.bind(\"/run/dwcp/g9.sock\"); s.listen(); time.sleep(600)"' sh "$LAB/a/other.pid" &
  for _ in $(seq 50); do hx a test -S /run/dwcp/g9.sock && break; sleep 0.1; done
  local out
  if out=$(agent_ctl a '{"op":"route","name":"g9","to":"'"${IP[b]}"':7070"}'); then
    fail "route over a live socket succeeded: $out"; return 1
  fi
  [[ "$out" == *"g9.sock"*"another process is listening"* ]] || { fail "route error: $out"; return 1; }
  lv_log "refused as expected: $out"
  kill "$(cat "$LAB/a/other.pid")" 2>/dev/null
  if out=$(hx a timeout 10 "$DWCP_BIN" agent --run-dir /run/dwcp --incoming-dir /run/dwcp --insecure 2>&1); then
    fail "a second agent on /run/dwcp started"; return 1
  fi
  [[ "$out" == *"agent.sock"*"another process is listening"* ]] || { fail "second agent: $out"; return 1; }
  lv_log "second agent refused as expected: $(tail -1 <<<"$out")"
  agent_ctl a '{"op":"ping"}' >/dev/null || { fail "the first agent stopped answering"; return 1; }
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

t_fail_socket_permissions() {
  # The destination agent without --socket-group on a fresh /run/dwcp (root's,
  # 0755): QEMU (libvirt-qemu) cannot create its incoming socket. The
  # migration fails naming the permission problem; g1 keeps running on a.
  route a b g1 || return 1
  agent_down b
  hx b chown root:root /run/dwcp; hx b chmod 0755 /run/dwcp
  LV_SOCKET_ARGS= agent_up b || return 1
  expect_refused a b g1 "Failed to bind socket to /run/dwcp/g1.sock: Permission denied" || return 1
  agent_down b
  agent_up b || return 1
  [ "$(stat_of b /run/dwcp)" = "1770 root:libvirt-qemu" ] || { fail "/run/dwcp after --socket-group: $(stat_of b /run/dwcp)"; return 1; }
  migrate a b g1 || return 1
  verify_moved a b g1 || return 1
  unroute a g1
  # Back to a, where the next tests expect g1.
  route b a g1 && migrate b a g1 && verify_moved b a g1 || return 1
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

# --- dwcp:// URIs (libvirt-patches/: make libvirt, LV_PATCHED) ---------------
# libvirtd with the series, the patched QEMU (make qemu) as the domain's
# emulator, no agent in the data path. TLS: insecure=1 in the URI (both QEMUs
# get it: the destination's libvirtd passes the URI's query to migrate-incoming).

# dwcp_uri TO [PORT] [PARAMS]: a dwcp:// migrate URI to host TO.
dwcp_uri() { echo "dwcp://${IP[$1]}${2:+:$2}?${3:-streams=4&codec=auto}&insecure=1"; }

# dmigrate FROM TO DOM URI [virsh args]: virsh migrate --live DOM qemu+tcp://TO/system
# --migrateuri URI, run on FROM; output in $LAB/virsh.out.
dmigrate() {
  local f=$1 t=$2 d=$3 u=$4; shift 4
  lv_log "virsh migrate --live $* $d $(dst_uri "$t") --migrateuri '$u'"
  hx "$f" timeout "${MIG_TIMEOUT:-120}" virsh -q -c qemu:///system migrate --live "$@" "$d" "$(dst_uri "$t")" \
    --migrateuri "$u" >"$LAB/virsh.out" 2>&1
  local rc=$?
  [ $rc = 0 ] || lv_log "virsh: $(tr '\n' ' ' <"$LAB/virsh.out")"
  return $rc
}

# dwcp_refused FROM TO DOM PATTERN URI [virsh args]: refused with PATTERN, DOM
# still running on FROM, not on TO, and no QEMU was started for it on TO
# (libvirt writes a "starting up" line to the domain's log for each start).
dwcp_refused() {
  local f=$1 t=$2 d=$3 pat=$4 u=$5; shift 5
  local qlog=$LAB/$t/log/qemu/$d.log starts
  starts=$(grep -c 'starting up' "$qlog" 2>/dev/null)
  if dmigrate "$f" "$t" "$d" "$u" "$@"; then fail "dwcp:// migration should have been refused"; return 1; fi
  grep -qF -- "$pat" "$LAB/virsh.out" || { fail "error does not say \"$pat\": $(cat "$LAB/virsh.out")"; return 1; }
  running_on "$f" "$d" || { fail "$d not running on $f after the refusal"; return 1; }
  domain_gone "$t" "$d" || { fail "$d left on $t"; return 1; }
  [ "$(grep -c 'starting up' "$qlog" 2>/dev/null)" = "$starts" ] || { fail "a QEMU was started for $d on $t"; return 1; }
  lv_log "refused as expected: $(head -1 "$LAB/virsh.out")"
}

t_dwcp_uri() {
  [ -n "${LV_PATCHED:-}" ] || { lv_log "SKIP: libvirt not built (make libvirt)"; return 3; }
  dwcp_qemu || return 1
  LV_EMULATOR=$DWCP_QEMU boot a g3 || return 1
  # 1. Live, peer-to-peer; the destination's libvirtd picks the port.
  dmigrate a b g3 "$(dwcp_uri b)" --p2p --verbose || return 1
  verify_moved a b g3 || return 1
  # Both QEMUs ran the dwcp: transport: libdwcp warns about insecure=1 on
  # each end (QEMU's stderr is the domain's log).
  local e
  for e in a b; do
    grep -q 'libdwcp: warning: insecure=1' "$LAB/$e/log/qemu/g3.log" ||
      { fail "no libdwcp message in $e's QEMU log"; tail -5 "$LAB/$e/log/qemu/g3.log" >&2; return 1; }
  done
  # 2. Back b -> a, client-driven (not --p2p), a fixed port, 8 streams, 2
  # multifd channels, destination paused: RAM must be identical.
  local size=$(( ${GUEST_MB:-256} << 20 ))
  hvirsh b suspend g3 >/dev/null || return 1
  rm -f "$LAB"/qemu-out/ram-*
  hvirsh b qemu-monitor-command g3 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-src\"" || return 1
  dmigrate b a g3 "$(dwcp_uri a 49190 'streams=8&codec=lz4')" --suspend --parallel --parallel-connections 2 || return 1
  [ "$(hvirsh a domstate g3)" = paused ] || { fail "destination not paused"; return 1; }
  hvirsh a qemu-monitor-command g3 --hmp "pmemsave 0 $size \"$LAB/qemu-out/ram-dst\"" || return 1
  local x y; x=$(sha256sum <"$LAB/qemu-out/ram-src"); y=$(sha256sum <"$LAB/qemu-out/ram-dst")
  [ -s "$LAB/qemu-out/ram-src" ] && [ "$x" = "$y" ] || { cmp "$LAB/qemu-out/ram-src" "$LAB/qemu-out/ram-dst" | head -2 >&2; fail "RAM differs"; return 1; }
  lv_log "RAM identical after dwcp:// ($size bytes, sha256 ${x:0:16})"
  rm -f "$LAB"/qemu-out/ram-*
  hvirsh a resume g3 >/dev/null || return 1
  verify_moved b a g3 || return 1
  # 3. virsh domjobabort during a slow dwcp:// migration: the job ends as
  # aborted, the guest keeps running on the source, nothing on the destination.
  ( for _ in $(seq 150); do
      hvirsh a domjobinfo g3 2>/dev/null | grep -Eq 'Memory processed: +[0-9.]*[1-9]' && break; sleep 0.2
    done
    sleep 1; lv_log "virsh domjobabort g3"; hvirsh a domjobabort g3 ) &
  local aborter=$!
  dmigrate a b g3 "$(dwcp_uri b)" --p2p --bandwidth 4
  local rc=$?
  wait $aborter
  [ $rc != 0 ] || { fail "migration finished despite domjobabort"; return 1; }
  grep -qi 'abort' "$LAB/virsh.out" || { fail "error does not say it was aborted: $(cat "$LAB/virsh.out")"; return 1; }
  running_on a g3 || { fail "g3 not running on a after domjobabort"; return 1; }
  sleep 1
  domain_gone b g3 || { fail "g3 left on b after domjobabort"; return 1; }
  lv_log "aborted as expected: $(head -1 "$LAB/virsh.out")"
  # ... and the next dwcp:// migration works.
  dmigrate a b g3 "$(dwcp_uri b)" --p2p || return 1
  verify_moved a b g3 || return 1
  # 4. TLS. Without insecure=1 and without --tls, libdwcp wants the default
  # credentials (/etc/pki/qemu), which these hosts do not have: the
  # destination's migrate-incoming fails naming the missing file (its QEMU,
  # started paused for the incoming migration, is stopped), g3 stays on b.
  if hx a test -e /etc/pki/qemu/ca-cert.pem; then
    lv_log "(skipping the missing-credentials case: /etc/pki/qemu exists on this machine)"
  else
    if dmigrate b a g3 "dwcp://${IP[a]}?streams=4" --p2p; then fail "dwcp:// without credentials succeeded"; return 1; fi
    grep -qF "/etc/pki/qemu/ca-cert.pem: missing" "$LAB/virsh.out" || { fail "error does not name the missing file"; return 1; }
    running_on b g3 || { fail "g3 not running on b after the failure"; return 1; }
    sleep 1
    domain_gone a g3 || { fail "g3 left on a"; return 1; }
    lv_log "refused as expected: $(head -1 "$LAB/virsh.out" | cut -c1-200)"
  fi
  # With --tls: libvirt's tls-creds-x509 objects (migrate_tls_x509_cert_dir,
  # the lab's CA) on both ends; QEMU hands their directory to libdwcp, which
  # runs TLS 1.3 with mutual authentication; no insecure=1 anywhere.
  migrate_pki || { fail "could not make the lab's certificates (openssl)"; return 1; }
  local warned; warned=$(grep -c 'libdwcp: warning: insecure=1' "$LAB/a/log/qemu/g3.log")
  dmigrate b a g3 "dwcp://${IP[a]}?streams=4&codec=auto" --p2p --tls || return 1
  verify_moved b a g3 || return 1
  [ "$(grep -c 'libdwcp: warning: insecure=1' "$LAB/a/log/qemu/g3.log")" = "$warned" ] ||
    { fail "the --tls migration ran with insecure=1"; return 1; }
  lv_log "dwcp:// with --tls: migrated with the lab's CA (tls-creds-x509 from migrate_tls_x509_cert_dir)"
  # Back to b for t_dwcp_refused.
  dmigrate a b g3 "$(dwcp_uri b)" --p2p || return 1
  verify_moved a b g3
}

t_dwcp_refused() {
  [ -n "${LV_PATCHED:-}" ] || { lv_log "SKIP: libvirt not built (make libvirt)"; return 3; }
  # The source's QEMU (the system's, without dwcp:) cannot: refused before the
  # destination is contacted, peer-to-peer and client-driven alike.
  LV_EMULATOR=/usr/bin/qemu-system-x86_64 boot a g4 || return 1
  local pat="QEMU binary '/usr/bin/qemu-system-x86_64' does not have: its QMP schema has no 'dwcp' member in MigrationAddress"
  dwcp_refused a b g4 "$pat" "$(dwcp_uri b)" --p2p || return 1
  dwcp_refused a b g4 "$pat" "$(dwcp_uri b)" || return 1
  hvirsh a destroy g4 >/dev/null
  # The destination's QEMU cannot (g3, on b after t_dwcp_uri, asks for the
  # system's QEMU on a): a refuses in Prepare, before starting it.
  if running_on b g3; then
    hvirsh b dumpxml --migratable g3 | sed "s|<emulator>.*</emulator>|<emulator>/usr/bin/qemu-system-x86_64</emulator>|" >"$LAB/g3-stock.xml"
    dwcp_refused b a g3 "incoming dwcp: migration is not supported by QEMU binary '/usr/bin/qemu-system-x86_64'" \
      "$(dwcp_uri a)" --p2p --xml "$LAB/g3-stock.xml" || return 1
    hvirsh b destroy g3 >/dev/null
  fi
}

t_fail_dst_qemu_dies() { kill_mid a b g1 qemu; }
t_fail_dst_agent_dies() { kill_mid b a g1 agent; }
t_fail_link_cut() { kill_mid a b g1 link; }

TESTS="live_p2p_metadata unprivileged_qemu parallel_back exact_ram dwcp_virsh_migrate dwcp_virsh_migrate_tls dwcp_virsh_migrate_ssh nova_tcp nova_fail_no_peer fail_dst_agent_down fail_src_agent_down fail_socket_in_use fail_wrong_socket fail_socket_permissions fail_bad_metadata fail_dst_qemu_dies fail_dst_agent_dies fail_link_cut dwcp_uri dwcp_refused"

lv_log "lab: $LAB"
lab_up || { lv_log "lab did not come up"; exit 1; }
for t in $TESTS; do
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$t,"* ]]; then continue; fi
  lv_log "=== $t"
  t1=$SECONDS
  "t_$t"; rc=$?
  if [ $rc = 0 ]; then
    PASSES=$((PASSES + 1)); lv_log "--- PASS $t ($((SECONDS - t1)) s)"
  elif [ $rc = 3 ]; then
    SKIPS="$SKIPS $t"; lv_log "--- SKIP $t"
  elif [ $rc = 2 ]; then
    XFAILS="$XFAILS $t"; lv_log "--- XFAIL $t (known bug, see the log above; $((SECONDS - t1)) s)"
  else
    FAILS=$((FAILS + 1)); lv_log "--- FAIL $t ($((SECONDS - t1)) s)"
    [ -n "${KEEP_GOING:-}" ] || break
  fi
done
lv_log "libvirt tests: $PASSES passed, $FAILS failed, known bugs:${XFAILS:- none}, skipped:${SKIPS:- none} in $((SECONDS - T0)) s"
[ $FAILS = 0 ] && { [ $PASSES -gt 0 ] || [ -n "$SKIPS" ]; }
