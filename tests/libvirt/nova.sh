# Nova's migration path in the libvirt lab (docs/nova.md), sourced after
# lab.sh by run.sh and bench.sh: the iptables REDIRECT rule on the source
# host and Nova's exact libvirt call. The agents' side is lab.sh's
# agent_up: with LV_NOVA=native (the default) they run the ingress
# (--nova-ingress 127.0.0.1:7071) and deliver nova-* by TCP
# (--deliver-tcp 'nova-*'); with LV_NOVA=shim they do neither and
# libvirt-hooks/dwcp-nova-shim relays (nova_shim_up).

NOVA_PORTS=49152:49215

# nova_rule FROM TO -A|-D [PORT]: add/remove the REDIRECT rule on FROM for
# migration connections to TO (docs/nova.md, host set-up).
nova_rule() {
  hx "$1" iptables -t nat "$3" OUTPUT -p tcp -d "${IP[$2]}" --dport "$NOVA_PORTS" \
    -m addrtype ! --dst-type LOCAL -j REDIRECT --to-ports "${4:-7071}"
}

# nova_call FROM TO DOM [virsh args]: the call Nova's libvirt driver makes
# (virDomainMigrateToURI3, flags LIVE|PEER2PEER|UNDEFINE_SOURCE|PERSIST_DEST
# |AUTO_CONVERGE, params migrate_uri=tcp://<live_migration_inbound_addr>,
# destination_xml, persistent_xml) with the REDIRECT rule in place on FROM.
# Output in $LAB/virsh.out.
nova_call() {
  local f=$1 t=$2 d=$3; shift 3
  hvirsh "$f" dumpxml --migratable "$d" >"$LAB/$d-dest.xml" || return 1
  nova_rule "$f" "$t" -A || return 1
  lv_log "virsh migrate --live --p2p --persistent --undefinesource --auto-converge $d $(dst_uri "$t") --migrateuri tcp://${IP[$t]} --xml X --persistent-xml X $*"
  hx "$f" timeout "${MIG_TIMEOUT:-120}" virsh -q -c qemu:///system migrate --live --p2p --persistent \
    --undefinesource --auto-converge "$d" "$(dst_uri "$t")" --migrateuri "tcp://${IP[$t]}" \
    --xml "$LAB/$d-dest.xml" --persistent-xml "$LAB/$d-dest.xml" "$@" >"$LAB/virsh.out" 2>&1
  local rc=$?
  nova_rule "$f" "$t" -D
  [ $rc = 0 ] || lv_log "virsh: $(tr '\n' ' ' <"$LAB/virsh.out")"
  return $rc
}

# nova_session HOST PATTERN: the newest session of HOST's agent whose name
# matches PATTERN (a shell glob), as JSON ({} if none).
nova_session() {
  agent_ctl "$1" '{"op":"stats"}' | python3 -c '
import fnmatch, json, sys
s = [x for x in json.load(sys.stdin)["sessions"] if fnmatch.fnmatch(x["name"], sys.argv[1])]
print(json.dumps(s[-1]) if s else "{}")' "$2"
}

# nova_agents MODE: restart both agents as MODE (native|shim) needs, if
# they do not run that way already.
nova_agents() {
  [ "${LV_NOVA:-native}" = "$1" ] && [ -s "$LAB/a/agent.pid" ] && [ -s "$LAB/b/agent.pid" ] && return 0
  LV_NOVA=$1
  local h
  for h in $HOSTS; do agent_down "$h"; agent_up "$h" || return 1; done
}

# nova_shim_up / nova_shim_down: the Python relay on both hosts (source
# side on 7071, destination side for this host's address).
nova_shim_up() {
  local shim=$ROOT/libvirt-hooks/dwcp-nova-shim h
  for h in $HOSTS; do
    hx "$h" sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$LAB/$h/shim-src.pid" "$shim" source >>"$LAB/$h/shim.log" 2>&1 &
    hx "$h" sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$LAB/$h/shim-dst.pid" "$shim" dest --addr "${IP[$h]}" >>"$LAB/$h/shim.log" 2>&1 &
  done
  sleep 1
}
nova_shim_down() {
  local h p
  for h in $HOSTS; do
    for p in "$LAB/$h/shim-src.pid" "$LAB/$h/shim-dst.pid"; do
      [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null
      rm -f "$p"
    done
  done
}
