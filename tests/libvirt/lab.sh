# Two libvirt hosts on one machine, sourced by tests/libvirt/run.sh.
#
# Each host is a network namespace (veth link between them; with
# LV_PROFILE=internet|wan|lossy|dc the link goes through the linkem emulator,
# `dwcp linkem run` in a third namespace) plus a mount+UTS
# namespace held open by a keeper process; inside it /run is a fresh tmpfs and
# /etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt are
# bind-mounted from $LAB/<host>/. Each host runs virtlogd, libvirtd (TCP,
# no auth, on its link address only) and a `dwcp agent`. Everything is
# started and stopped by PID; lab_down runs from an EXIT trap.
#
# LV_PATCHED=DIR: the hosts run the libvirtd of libvirt-patches/build.sh
# (`make libvirt`; DIR is the build directory it prints) instead of the
# system's, with the same /etc/libvirt, /var/lib/libvirt and /run/libvirt
# layout; virsh and virtlogd stay the system's.

LAB=${LAB:-/tmp/dwcp-lv/$$}
LV_TAG=${LV_TAG:-lv$(( $$ % 100000 ))}
LV_SUBNET=${LV_SUBNET:-$(( 150 + $$ % 100 ))}
HOSTS="a b"
declare -A NS IP KEEPER MNTNS
LINKEM_PID=

lv_log() { echo "[$(date +%T)] $*" >&2; }

# hx HOST CMD...: run CMD inside HOST (network, mount and UTS namespaces).
# -r: the keeper's root, so a lab started inside a chroot (make fresh-check)
# keeps seeing the chroot, not the root of the mount namespace.
hx() { local h=$1; shift; nsenter -t "${KEEPER[$h]}" -m -u -n -r -- "$@"; }

# virsh on a host's own libvirtd.
hvirsh() { local h=$1; shift; hx "$h" virsh -q -c qemu:///system "$@"; }

lab_up() {
  local root; root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  DWCP_BIN=${DWCP_BIN:-$root/target/release/dwcp}
  GUEST_DIR=${GUEST_DIR:-$root/tests/guest/out}
  HOOK_SRC=$root/libvirt-hooks
  ROUTE_BIN=$root/libvirt-hooks/dwcp-route
  [ -x "$DWCP_BIN" ] || { echo "no $DWCP_BIN: cargo build --release -p dwcp" >&2; return 1; }
  [ -e "$GUEST_DIR/vmlinuz" ] || bash "$root/tests/guest/build.sh" "$GUEST_DIR"
  rm -rf "$LAB"; mkdir -p "$LAB"
  NS[a]=${LV_TAG}a; NS[b]=${LV_TAG}b
  IP[a]=10.$LV_SUBNET.0.1; IP[b]=10.$LV_SUBNET.0.2
  ip netns add "${NS[a]}"; ip netns add "${NS[b]}"
  if [ -n "${LV_PROFILE:-}" ]; then
    link_emulated || return 1
  else
    ip link add "${LV_TAG}va" type veth peer name "${LV_TAG}vb"
    for h in $HOSTS; do ip link set "${LV_TAG}v$h" netns "${NS[$h]}"; done
  fi
  for h in $HOSTS; do
    ip -n "${NS[$h]}" addr add "${IP[$h]}/24" dev "${LV_TAG}v$h"
    ip -n "${NS[$h]}" link set "${LV_TAG}v$h" up
    ip -n "${NS[$h]}" link set lo up
  done
  lab_pki
  lab_ssh_keys
  # LV_MIGRATE_PKI=1: the migration certificates (migrate_pki) before the
  # agents start, for agents with --tls-dir /var/lib/libvirt/pki (bench.sh).
  if [ -n "${LV_MIGRATE_PKI:-}" ]; then
    migrate_pki || { lv_log "could not make the lab's migration certificates (openssl)"; return 1; }
  fi
  for h in $HOSTS; do host_up "$h"; done
  # Files QEMU writes for the tests (pmemsave): QEMU runs as libvirt-qemu.
  install -d -o libvirt-qemu -g libvirt-qemu -m 700 "$LAB/qemu-out"
  lv_log "libvirt security model: $(hvirsh a capabilities | secmodels)"
}

# lab_pki: a throwaway CA, a server certificate per host (its link IP) for
# libvirtd's TLS listener, and one client certificate in $LAB/pki/client
# (libvirt's pkipath layout: qemu+tls://IP/system?pkipath=$LAB/pki/client).
lab_pki() {
  local p=$LAB/pki h
  command -v openssl >/dev/null || { lv_log "no openssl: libvirtd without TLS"; return 0; }
  mkdir -p "$p/client"
  leaf() { # leaf NAME CN EXTENSIONS
    openssl req -new -newkey rsa:2048 -nodes -keyout "$p/$1.key" -subj "/CN=$2" -out "$p/$1.csr" 2>/dev/null &&
      openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.pem" -CAkey "$p/ca.key" -CAcreateserial -days 2 \
        -extfile <(printf '%s\n' "$3" 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment') \
        -out "$p/$1.pem" 2>/dev/null
  }
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -subj "/CN=dwcp lab libvirt CA" -days 2 \
    -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' \
    -out "$p/ca.pem" 2>/dev/null || { lv_log "openssl failed: libvirtd without TLS"; rm -rf "$p"; return 0; }
  for h in $HOSTS; do
    leaf "server-$h" "dwcp-$h" "subjectAltName=IP:${IP[$h]}
extendedKeyUsage=serverAuth" || { rm -rf "$p"; return 0; }
  done
  leaf client "dwcp-lab-client" "extendedKeyUsage=clientAuth" || { rm -rf "$p"; return 0; }
  cp "$p/ca.pem" "$p/client/cacert.pem"; cp "$p/client.pem" "$p/client/clientcert.pem"
  cp "$p/client.key" "$p/client/clientkey.pem"
}

# tls_uri HOST: a TLS connection to HOST's libvirtd with the lab's client certificate.
tls_uri() { echo "qemu+tls://${IP[$1]}/system?pkipath=$LAB/pki/client"; }

# lab_ssh_keys: what an operator sets up for qemu+ssh://, made at run time
# and thrown away with the lab: per host an sshd host key, and a root whose
# home is $LAB/<host>/home (a copy of /etc/passwd with that one field changed
# is bind-mounted over /etc/passwd inside the host, so ssh and sshd use the
# lab's ~/.ssh, never this machine's) with its own key pair, the other
# hosts' client keys in authorized_keys and their host keys in known_hosts
# (strict host key checking, no prompts). Without sshd or ssh-keygen
# (tests/libvirt/setup.sh installs openssh-server) the hosts run no sshd.
lab_ssh_keys() {
  [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null || { lv_log "no sshd: hosts without ssh"; return 0; }
  local h g
  for h in $HOSTS; do
    install -d -m 700 "$LAB/$h/home" "$LAB/$h/home/.ssh" "$LAB/$h/sshd"
    ssh-keygen -q -t ed25519 -N '' -C "root@dwcp-$h" -f "$LAB/$h/home/.ssh/id_ed25519" &&
      ssh-keygen -q -t ed25519 -N '' -C "dwcp-$h host" -f "$LAB/$h/sshd/ssh_host_ed25519_key" ||
      { lv_log "ssh-keygen failed: hosts without ssh"; return 0; }
    awk -F: -v OFS=: -v home="$LAB/$h/home" '$1 == "root" { $6 = home } 1' /etc/passwd >"$LAB/$h/passwd"
    chmod 644 "$LAB/$h/passwd"
    cat >"$LAB/$h/sshd/sshd_config" <<CONF
ListenAddress ${IP[$h]}
HostKey $LAB/$h/sshd/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
CONF
  done
  for h in $HOSTS; do
    for g in $HOSTS; do
      cat "$LAB/$g/home/.ssh/id_ed25519.pub" >>"$LAB/$h/home/.ssh/authorized_keys"
      echo "${IP[$g]} $(cut -d' ' -f1,2 "$LAB/$g/sshd/ssh_host_ed25519_key.pub")" >>"$LAB/$h/home/.ssh/known_hosts"
    done
    chmod 600 "$LAB/$h/home/.ssh/authorized_keys" "$LAB/$h/home/.ssh/known_hosts"
  done
}

# sshd_up HOST: the lab's sshd on HOST's link address (port 22), inside the
# host: a qemu+ssh:// connection runs virt-ssh-helper there, which reaches
# that host's libvirtd. Log in $LAB/HOST/sshd.log.
sshd_up() {
  local h=$1 i
  [ -e "$LAB/$h/sshd/sshd_config" ] || return 0
  hx "$h" mount --bind "$LAB/$h/passwd" /etc/passwd || return 1
  hx "$h" install -d -m 755 /run/sshd
  hx "$h" sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$LAB/$h/sshd.pid" \
    /usr/sbin/sshd -D -e -f "$LAB/$h/sshd/sshd_config" </dev/null >>"$LAB/$h/sshd.log" 2>&1 &
  for i in $(seq 100); do
    hx "$h" ss -Hltn "src ${IP[$h]}:22" | grep -q . && return 0
    sleep 0.1
  done
  lv_log "sshd on $h did not start"; cat "$LAB/$h/sshd.log" >&2; return 1
}

# ssh_uri HOST: HOST's libvirtd over ssh (root, the lab's keys).
ssh_uri() { echo "qemu+ssh://root@${IP[$1]}/system"; }

# secmodels < capabilities XML: "model doi baselabel..." of each <secmodel>.
secmodels() {
  python3 -c '
import sys, xml.etree.ElementTree as ET
host = ET.parse(sys.stdin).getroot().find("host")
out = []
for m in host.findall("secmodel"):
    labels = ",".join(b.get("type") + "=" + (b.text or "") for b in m.findall("baselabel"))
    model, doi = m.findtext("model"), m.findtext("doi")
    out.append(f"{model} doi={doi} {labels}".strip())
print("; ".join(out) or "none")'
}

# qemu_user HOST DOM: the user the domain's QEMU process runs as.
qemu_user() {
  local pid; pid=$(hx "$1" cat "/run/libvirt/qemu/$2.pid" 2>/dev/null) || return 1
  ps -o user= -p "$pid" | tr -d ' '
}

# assert_unprivileged HOST DOM: QEMU runs as libvirt-qemu, not root.
assert_unprivileged() {
  local u; u=$(qemu_user "$1" "$2")
  [ "$u" = libvirt-qemu ] || { lv_log "FAIL: QEMU of $2 on $1 runs as '${u:-?}', not libvirt-qemu"; return 1; }
}

# link_emulated: host a's and b's interfaces (${LV_TAG}va/vb, as with the
# plain veth pair) are each one end of a veth pair whose other end (a, b) is
# in the link namespace ${LV_TAG}l, where `dwcp linkem run --profile
# $LV_PROFILE` forwards between a and b (the layout of linkem::topo with an
# external forwarder). Frames must look like wire frames to the forwarder:
# no TSO/GSO, no partial checksums, no GRO; TCP buffers for a long fat pipe.
link_emulated() {
  NS[l]=${LV_TAG}l
  ip netns add "${NS[l]}"
  local h
  for h in $HOSTS; do
    ip link add "${LV_TAG}v$h" netns "${NS[$h]}" type veth peer name "$h" netns "${NS[l]}"
    ip netns exec "${NS[$h]}" ethtool -K "${LV_TAG}v$h" tx off tso off gso off gro off >/dev/null 2>&1 ||
      { lv_log "ethtool failed (apt-get install ethtool)"; return 1; }
    ip netns exec "${NS[$h]}" sysctl -qw net.ipv4.tcp_rmem="4096 131072 67108864" net.ipv4.tcp_wmem="4096 65536 67108864"
    ip netns exec "${NS[l]}" ethtool -K "$h" gro off >/dev/null 2>&1 || true
    ip -n "${NS[l]}" link set dev "$h" up
  done
  ip -n "${NS[l]}" link set lo up
  setsid "$DWCP_BIN" linkem run --netns "${NS[l]}" --profile "$LV_PROFILE" ${LV_LINKEM_ARGS:-} \
    --stats-file "$LAB/linkem.json" </dev/null >>"$LAB/linkem.log" 2>&1 &
  LINKEM_PID=$!
  echo "$LINKEM_PID" >"$LAB/linkem.pid"
  sleep 0.5
  kill -0 "$LINKEM_PID" 2>/dev/null || { lv_log "linkem did not start"; cat "$LAB/linkem.log" >&2; return 1; }
  lv_log "link: linkem --profile $LV_PROFILE ${LV_LINKEM_ARGS:-} (pid $LINKEM_PID)"
}

host_up() {
  local h=$1 d=$LAB/$1
  mkdir -p "$d"/{lib/images/dwcp,log/qemu,cache,hostrun}
  cp -a /etc/libvirt "$d/etc"
  rm -f "$d"/etc/qemu/networks/autostart/*.xml
  # Private /run etc. for this host, held by a keeper process.
  # setsid: not in our process group, so `timeout`'s group kill leaves it to lab_down.
  setsid ip netns exec "${NS[$h]}" unshare --mount --uts --propagation private sleep infinity &
  KEEPER[$h]=$!
  echo "${KEEPER[$h]}" > "$d/keeper.pid"
  local i
  for i in $(seq 50); do
    [ "$(readlink /proc/${KEEPER[$h]}/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] &&
      [ "$(readlink /proc/${KEEPER[$h]}/ns/uts)" != "$(readlink /proc/self/ns/uts)" ] && break
    sleep 0.1
  done
  MNTNS[$h]=$(readlink "/proc/${KEEPER[$h]}/ns/mnt")
  hx "$h" sh -ec "
    mount -t tmpfs -o mode=755 tmpfs /run
    mount --bind '$d/etc' /etc/libvirt
    mount --bind '$d/lib' /var/lib/libvirt
    mount --bind '$d/log' /var/log/libvirt
    mount --bind '$d/cache' /var/cache/libvirt
    hostname dwcp-$h
  "
  local uuid; uuid=$(cat /proc/sys/kernel/random/uuid)
  local tls="listen_tls = 0"
  [ -e "$LAB/pki/server-$h.pem" ] && tls="listen_tls = 1
ca_file = \"$LAB/pki/ca.pem\"
cert_file = \"$LAB/pki/server-$h.pem\"
key_file = \"$LAB/pki/server-$h.key\""
  cat >> "$d/etc/libvirtd.conf" <<CONF
# dwcp test lab
$tls
listen_tcp = 1
auth_tcp = "none"
listen_addr = "${IP[$h]}"
host_uuid = "$uuid"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  # qemu.conf stays Debian's default: QEMU runs as libvirt-qemu, libvirt
  # chowns what QEMU needs (dynamic_ownership), DAC security driver. One
  # line is added: where migration TLS (virsh migrate --tls) finds this
  # host's credentials (empty until a test fills it; group libvirt-qemu).
  cat >> "$d/etc/qemu.conf" <<CONF
migrate_tls_x509_cert_dir = "/var/lib/libvirt/pki"
CONF
  mkdir -p "$d/lib/pki"
  # Hooks (installed like an operator would, into this host's /etc/libvirt).
  DESTDIR=$d/etc APPARMOR_DIR=$d/apparmor.d bash "$HOOK_SRC/install.sh" >/dev/null
  printf 'agent_socket=/run/dwcp/agent.sock\nlog=/var/log/libvirt/dwcp-hook.log\n%s\n' "${HOOK_CONF:-}" \
    > "$d/etc/hooks/dwcp.conf"
  # Guest kernel/initrd: libvirt wants them at the same path on both hosts.
  cp "$GUEST_DIR/vmlinuz" "$GUEST_DIR/initrd.img" "$d/lib/images/dwcp/"
  hx "$h" virtlogd -d
  hx "$h" "${LV_PATCHED:+$LV_PATCHED/src/}libvirtd" -d --listen
  for i in $(seq 100); do
    hvirsh "$h" version >/dev/null 2>&1 && break
    sleep 0.2
  done
  hvirsh "$h" version >/dev/null || { lv_log "libvirtd on $h did not come up"; cat "$d/log/libvirtd.log" >&2; return 1; }
  sshd_up "$h" || return 1
  agent_up "$h"
}

# agent_up HOST: dwcp agent with route sockets in /run/dwcp; on the destination
# QEMU listens at the migrate URI's path, /run/dwcp/DOM.sock, so --incoming-dir
# is the same directory. QEMU runs as libvirt-qemu: --socket-group libvirt-qemu
# (LV_SOCKET_ARGS= starts the agent without it).
# LV_NOVA=native (default): also Nova's ingress and TCP delivery (nova.sh).
agent_up() {
  local h=$1 nova=()
  [ "${LV_NOVA:-native}" = native ] && nova=(--nova-ingress 127.0.0.1:7071 --deliver-tcp 'nova-*')
  hx "$h" sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$LAB/$h/agent.pid" \
    "$DWCP_BIN" --log info agent --listen "${IP[$h]}:7070" --run-dir /run/dwcp \
    --incoming-dir /run/dwcp ${LV_SOCKET_ARGS---socket-group libvirt-qemu} \
    ${LV_AGENT_ARGS---workers 1 --insecure} --allow 'nova-*' ${nova[@]+"${nova[@]}"} </dev/null >>"$LAB/$h/agent.log" 2>&1 &
  local i
  for i in $(seq 50); do
    hx "$h" test -S /run/dwcp/agent.sock && agent_ctl "$h" '{"op":"ping"}' >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  lv_log "agent on $h did not start"; cat "$LAB/$h/agent.log" >&2; return 1
}

agent_down() {
  local h=$1 pid
  pid=$(cat "$LAB/$h/agent.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$LAB/$h/agent.pid"
}

# agent_ctl HOST JSON: one control request; prints the answer, fails on ok=false.
agent_ctl() {
  hx "$1" python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect("/run/dwcp/agent.sock")
s.sendall(sys.argv[1].encode() + b"\n")
a = s.makefile().readline(); print(a.strip())
sys.exit(0 if json.loads(a).get("ok") else 1)' "$2"
}


# pids_in HOST: every process in HOST's mount namespace (all started by this lab).
pids_in() {
  local ns=${MNTNS[$1]:-} p
  [ -n "$ns" ] || return 0
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" != "${KEEPER[$1]}" ] && [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$ns" ] && echo "$p"
  done
}

host_down() {
  local h=$1 d
  [ -n "${KEEPER[$h]:-}" ] || return 0
  for d in $(hvirsh "$h" list --name 2>/dev/null); do hvirsh "$h" destroy "$d" >/dev/null 2>&1; done
  agent_down "$h"
  kill $(pids_in "$h") 2>/dev/null
  sleep 0.5
  kill -9 $(pids_in "$h") 2>/dev/null
  kill "${KEEPER[$h]}" 2>/dev/null
  wait "${KEEPER[$h]}" 2>/dev/null
  KEEPER[$h]=
}

lab_down() {
  for h in $HOSTS; do host_down "$h" 2>/dev/null; done
  if [ -n "${LINKEM_PID:-}" ]; then
    kill "$LINKEM_PID" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$LINKEM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$LINKEM_PID" 2>/dev/null
    LINKEM_PID=
  fi
  [ -n "${NS[l]:-}" ] && ip netns del "${NS[l]}" 2>/dev/null
  unset 'NS[l]'
  [ -n "${NS[a]:-}" ] && ip netns del "${NS[a]}" 2>/dev/null
  [ -n "${NS[b]:-}" ] && ip netns del "${NS[b]}" 2>/dev/null
  [ -n "${KEEP:-}" ] || rm -rf "$LAB"
  return 0
}

# domain_xml NAME [METADATA-XML] [CMDLINE-EXTRA]
# LV_EMULATOR=PATH: another QEMU binary (e.g. the patched one of `make
# qemu`, which has no firmware of its own: it gets the system's with -L).
domain_xml() {
  local qargs=
  [ -n "${LV_EMULATOR:-}" ] && qargs="<qemu:commandline><qemu:arg value='-L'/><qemu:arg value='/usr/share/seabios'/><qemu:arg value='-L'/><qemu:arg value='/usr/share/qemu'/></qemu:commandline>"
  cat <<XML
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$1</name>
  <memory unit='MiB'>${GUEST_MB:-256}</memory>
  <vcpu>1</vcpu>
  <metadata>${2:-}</metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/var/lib/libvirt/images/dwcp/vmlinuz</kernel>
    <initrd>/var/lib/libvirt/images/dwcp/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet dwcp.fill=${GUEST_FILL:-96} dwcp.dirty=${GUEST_DIRTY:-8} dwcp.sweep_ms=1500 ${3:-}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>${LV_EMULATOR:-/usr/bin/qemu-system-x86_64}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='/var/log/libvirt/qemu/$1-serial.log'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/libvirt/qemu/$1-serial.log'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
  $qargs
</domain>
XML
}

serial() { cat "$LAB/$1/log/qemu/$2-serial.log" 2>/dev/null | tr -d '\r'; }

# wait_serial HOST DOM PATTERN SECONDS
wait_serial() {
  local i
  for i in $(seq $(( $4 * 5 ))); do
    serial "$1" "$2" | grep -q -- "$3" && return 0
    sleep 0.2
  done
  lv_log "timeout waiting for '$3' on $1/$2"; serial "$1" "$2" | tail -5 >&2; return 1
}

# last heartbeat field: hb_field HOST DOM FIELD
hb_field() { serial "$1" "$2" | grep -E '^DWCP-HB .* errors=[0-9]+$' | tail -1 | sed -n "s/.* $3=\([0-9]*\).*/\1/p"; }

# --- shared by run.sh and bench.sh ------------------------------------------

fail() { lv_log "FAIL: $*"; return 1; }
dst_uri() { echo "qemu+tcp://${IP[$1]}/system"; }

# domain_gone HOST DOM: not defined, not running.
domain_gone() { ! hvirsh "$1" domstate "$2" >/dev/null 2>&1; }
running_on() { [ "$(hvirsh "$1" domstate "$2" 2>/dev/null)" = running ]; }

# route FROM TO DOM [dwcp-route args]: the source side of the relay.
route() { local f=$1 t=$2 d=$3; shift 3; hx "$f" "$ROUTE_BIN" "$d" "${IP[$t]}" "$@" >/dev/null; }
unroute() { hx "$1" "$ROUTE_BIN" --remove "$2" >/dev/null 2>&1 || true; }

# migrate FROM TO DOM [virsh args]: virsh migrate through DWCP; output in $LAB/virsh.out
migrate() {
  local f=$1 t=$2 d=$3; shift 3
  lv_log "virsh migrate --live --p2p $d $(dst_uri "$t") --migrateuri unix:///run/dwcp/$d.sock $*"
  hx "$f" timeout "${MIG_TIMEOUT:-120}" virsh -q -c qemu:///system migrate --live --p2p "$d" "$(dst_uri "$t")" \
    --migrateuri "unix:///run/dwcp/$d.sock" "$@" >"$LAB/virsh.out" 2>&1
  local rc=$?
  [ $rc = 0 ] || lv_log "virsh: $(tr '\n' ' ' <"$LAB/virsh.out")"
  return $rc
}

# verify_moved FROM TO DOM: the guest left FROM and continues on TO with its
# memory intact: heartbeats continue (no reboot), errors=0, >= 2 full
# verification sweeps of the whole fill area after the switch-over.
verify_moved() {
  local f=$1 t=$2 d=$3
  domain_gone "$f" "$d" || fail "$d still present on $f after migration" || return 1
  running_on "$t" "$d" || fail "$d not running on $t" || return 1
  assert_unprivileged "$t" "$d" || return 1
  wait_serial "$t" "$d" DWCP-HB 30 || return 1
  local first s0 i
  first=$(serial "$t" "$d" | grep -m1 '^DWCP-HB')
  s0=$(sed -n 's/.* swept=\([0-9]*\).*/\1/p' <<<"$first")
  serial "$t" "$d" | grep -q DWCP-BOOT && { fail "$d rebooted on $t"; return 1; }
  [ "$(sed -n 's/.*seq=\([0-9]*\).*/\1/p' <<<"$first")" -gt 0 ] || { fail "heartbeat restarted at 0"; return 1; }
  for i in $(seq $(( ${VERIFY_S:-30} * 5 ))); do
    [ "$(hb_field "$t" "$d" swept)" -ge $(( s0 + 2 )) ] && break
    sleep 0.2
  done
  local last; last=$(serial "$t" "$d" | grep '^DWCP-HB' | tail -1)
  [ "$(hb_field "$t" "$d" swept)" -ge $(( s0 + 2 )) ] || { fail "no 2 sweeps after switch-over: $first / $last"; return 1; }
  serial "$t" "$d" | grep -q 'DWCP-ERROR\|DWCP-FATAL' && { fail "guest reports corruption"; serial "$t" "$d" | grep DWCP-ERROR | head -3 >&2; return 1; }
  [ "$(hb_field "$t" "$d" errors)" = 0 ] || { fail "errors in $last"; return 1; }
  lv_log "verified on $t: first $first; last $last"
}

boot() { # boot HOST DOM [metadata]
  domain_xml "$2" "${3:-}" >"$LAB/$2.xml"
  hvirsh "$1" create "$LAB/$2.xml" >/dev/null || { tail -5 "$LAB/$1/log/qemu/$2.log" >&2; return 1; }
  assert_unprivileged "$1" "$2" || return 1
  wait_serial "$1" "$2" DWCP-READY "${BOOT_S:-90}"
}

# dwcp_qemu: the patched QEMU (qemu-patches/build.sh; cached by `make qemu`).
dwcp_qemu() {
  [ -n "${DWCP_QEMU:-}" ] || DWCP_QEMU=$(bash "$ROOT/qemu-patches/build.sh" 2>>"$LAB/qemu-build.log" | tail -1)
  [ -x "$DWCP_QEMU" ] || { fail "no patched QEMU (make qemu): ${DWCP_QEMU:-none}"; return 1; }
  # QEMU runs as libvirt-qemu, which may not reach the build cache (under
  # root's home): a copy of the binary with its libdwcp beside it
  # (RUNPATH $ORIGIN/lib), which libvirt can also run to probe it.
  if [ "${DWCP_QEMU#"$LAB"/}" = "$DWCP_QEMU" ]; then
    local lib
    lib=$(ldd "$DWCP_QEMU" | awk '/libdwcp/ {print $3}')
    [ -e "$lib" ] || { fail "the patched QEMU does not link libdwcp: $DWCP_QEMU"; return 1; }
    mkdir -p "$LAB/emu/lib"
    install -m 755 "$DWCP_QEMU" "$LAB/emu/qemu-system-x86_64"
    install -m 644 "$lib" "$LAB/emu/lib/"
    patchelf --set-rpath '$ORIGIN/lib' "$LAB/emu/qemu-system-x86_64" ||
      { fail "patchelf (tests/libvirt/setup.sh installs it)"; return 1; }
    chmod 755 "$LAB" "$LAB/emu" "$LAB/emu/lib"
    DWCP_QEMU=$LAB/emu/qemu-system-x86_64
  fi
}

# migrate_pki: a throwaway CA and, in each host's migrate_tls_x509_cert_dir
# (/var/lib/libvirt/pki, lab.sh), libvirt's layout: ca-cert.pem and server and
# client certificates for both hosts' addresses (libdwcp loads both pairs).
migrate_pki() {
  local ca=$LAB/pki-ca role eku h
  mkdir -p "$ca"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$ca/ca-key.pem" \
    -out "$ca/ca-cert.pem" -days 2 -subj "/O=DWCP lab/CN=lab CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null || return 1
  for role in server client; do
    eku=$([ $role = server ] && echo serverAuth || echo clientAuth)
    printf 'subjectAltName=IP:%s,IP:%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' \
      "${IP[a]}" "${IP[b]}" "$eku" >"$ca/$role.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$ca/$role-key.pem" \
      -out "$ca/$role.csr" -subj "/O=DWCP lab/CN=dwcp-lab" 2>/dev/null || return 1
    openssl x509 -req -in "$ca/$role.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" -set_serial "$RANDOM$RANDOM" \
      -days 2 -out "$ca/$role-cert.pem" -extfile "$ca/$role.ext" 2>/dev/null || return 1
  done
  for h in $HOSTS; do
    mkdir -p "$LAB/$h/lib/pki"
    # Keys readable by QEMU's group (libvirt-qemu), as libvirt's docs ask.
    install -m 644 "$ca/ca-cert.pem" "$ca/server-cert.pem" "$ca/client-cert.pem" "$LAB/$h/lib/pki/" &&
      install -m 640 -g libvirt-qemu "$ca/server-key.pem" "$ca/client-key.pem" "$LAB/$h/lib/pki/" || return 1
  done
}
