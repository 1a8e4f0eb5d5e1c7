#!/usr/bin/env bash
# Speed benchmark: stock `virsh migrate --live --p2p` through DWCP (QEMU's
# dwcp: transport with the patched libvirt, the agents' hook route, Nova's
# call through the agents' ingress or the Python shim) against libvirt's own
# transport, plain and multifd (--parallel 4 + zstd), between the two libvirt
# hosts of tests/libvirt/lab.sh, one guest, per link profile, contenders
# interleaved (A B C A B C ...) so machine noise hits all alike.
#
#   LV_PATCHED=$(bash libvirt-patches/build.sh | tail -1) bash tests/libvirt/bench.sh
#                                        (make libvirt-bench)
#
# TLS as shipped: the agents run with their default (TLS, mutual
# authentication) on the lab's throwaway CA (lab.sh: migrate_pki, in each
# host's /var/lib/libvirt/pki, libvirt's migrate_tls_x509_cert_dir), and
# dwcp-uri migrates with virsh --tls on the same certificates.
#
# Environment (defaults in brackets):
#   PROFILES     link profiles, in order ["dc internet"]; dc = the plain veth
#                pair (unshaped), others = linkem between the hosts (LV_PROFILE)
#   K_dc, K_internet, K   rounds per profile [2]
#   CONTENDERS   [with LV_PATCHED: "dwcp-uri dwcp nova nova-shim libvirt libvirt-par",
#                without: the same without dwcp-uri]
#   CONTENDERS_<profile>  this profile's list [CONTENDERS; on profiles other
#                than dc without nova-shim]
#                  dwcp         --migrateuri unix:///run/dwcp/DOM.sock, route by
#                               dwcp-route with no flags: the agent's defaults
#                               (what the hook's default policy also chooses)
#                  dwcp-CODEC   the same with --codec CODEC (dwcp-zstd, dwcp-auto)
#                  dwcp-uri     --migrateuri 'dwcp://DST?streams=4&codec=auto' --tls:
#                               QEMU's own dwcp: transport, no agent in the path;
#                               needs LV_PATCHED (make libvirt) and the patched QEMU
#                               (make qemu, or DWCP_QEMU=PATH), which then runs
#                               the guest for every contender
#                  dwcp-uri-clear  the same in clear text ('...&insecure=1', no --tls)
#                  dwcp-uri@Q, dwcp-uri-clear@Q  the same with the URI query Q instead
#                               of streams=4&codec=auto (dwcp-uri-clear@streams=1&codec=raw)
#                  libvirt      --migrateuri tcp://DST (libvirt's own transport)
#                  libvirt-par  the same + --parallel --parallel-connections 4
#                               --compressed --comp-methods zstd
#                  nova         Nova's exact call (nova.sh: --migrateuri tcp://DST,
#                               --persistent --undefinesource --auto-converge
#                               --xml --persistent-xml) behind the REDIRECT rule,
#                               carried by the agents' ingress (--nova-ingress,
#                               --deliver-tcp); agents' defaults otherwise
#                  nova-shim    the same call relayed by libvirt-hooks/dwcp-nova-shim
#                               (agents without ingress/TCP delivery)
#                  (the nova contenders' time includes adding and removing
#                  the iptables rule and `virsh dumpxml`, a few ms)
#   GUEST_MB [1024], GUEST_FILL [512] MiB of realistic content, GUEST_DIRTY [4] MiB/s
#   LV_AGENT_ARGS  extra `dwcp agent` flags [--tls-dir /var/lib/libvirt/pki: the
#                agent's defaults on the lab's certificates; --insecure for clear text]
#   OUT          results directory [target/libvirt-bench]: results.json, table.md
#   PERF=1       also `perf record -a -F 499` during each migration: the 12 largest
#                (thread, object) CPU figures of each QEMU in results.json (perf_top_s)
#   SUMMARY_ONLY runs.jsonl files of earlier runs: no migrations, only OUT's
#                results.json and table.md made from them (concatenated)
#
# Per run: wall clock of virsh, libvirt's completed-job figures (downtime,
# data transferred; `virsh domjobinfo --completed --rawstats`, on the source
# when it still knows the domain, else on the destination, which receives the
# source's statistics), DWCP's wire bytes (the source agent's session), the
# bytes the source host put on the link (its interface counters: the same
# yardstick for every contender), and whether the guest survived (the checks
# of run.sh: gone from the source, running on the destination, heartbeats
# continue, no errors, two full verification sweeps of its memory).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tests/libvirt/lab.sh
source tests/libvirt/nova.sh
ROOT=$(pwd)
OUT=${OUT:-$ROOT/target/libvirt-bench}
PROFILES=${PROFILES:-dc internet}
CONTENDERS=${CONTENDERS:-${LV_PATCHED:+dwcp-uri }dwcp nova nova-shim libvirt libvirt-par}
export GUEST_MB=${GUEST_MB:-1024} GUEST_FILL=${GUEST_FILL:-512} GUEST_DIRTY=${GUEST_DIRTY:-4}
export LV_AGENT_ARGS=${LV_AGENT_ARGS---tls-dir /var/lib/libvirt/pki} LV_MIGRATE_PKI=1
BOOT_S=${BOOT_S:-240}
VERIFY_S=${VERIFY_S:-90}
BASE_LAB=${BASE_LAB:-/tmp/dwcp-lv/$$}
# contenders PROFILE: that profile's list.
contenders() {
  local v=CONTENDERS_$1
  if [ -n "${!v:-}" ]; then echo "${!v}"
  elif [ "$1" = dc ]; then echo "$CONTENDERS"
  else echo " $CONTENDERS " | sed 's/ nova-shim / /g; s/^ *//; s/ *$//'
  fi
}
ALL_CONTENDERS=$(for prof in $PROFILES; do contenders "$prof"; done | tr ' ' '\n' | awk 'NF && !seen[$0]++' | tr '\n' ' ')
QEMU_SRC=
if [ -z "${SUMMARY_ONLY:-}" ] && [[ " $ALL_CONTENDERS " == *" dwcp-uri"* ]]; then
  [ -n "${LV_PATCHED:-}" ] || { echo "contender dwcp-uri needs LV_PATCHED (make libvirt)" >&2; exit 1; }
  QEMU_SRC=${DWCP_QEMU:-$(bash qemu-patches/build.sh | tail -1)}
fi
trap 'lab_down' EXIT
trap 'exit 130' INT TERM
mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
if [ -n "${SUMMARY_ONLY:-}" ]; then
  # shellcheck disable=SC2086
  cat $SUMMARY_ONLY >"$RUNS.new" && mv "$RUNS.new" "$RUNS" || exit 1
else
  : >"$RUNS"
fi
if [ -z "${COMMIT:-}" ]; then
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ -n "$(git status --porcelain -- dwcp-core dwcp linkem libvirt-hooks tests/libvirt 2>/dev/null)" ] && COMMIT="$COMMIT+dirty"
fi
STARTED=${STARTED:-$(date -u +%Y-%m-%dT%H:%MZ)}

# link_tx HOST: bytes HOST has sent on its link interface.
link_tx() {
  ip -n "${NS[$1]}" -j -s link show dev "${LV_TAG}v$1" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["bytes"])'
}

# jobinfo HOST DOM: libvirt's completed-job figures as JSON ({} if none).
jobinfo() {
  hvirsh "$1" domjobinfo --completed --rawstats "$2" 2>/dev/null | python3 -c '
import json, re, sys
d = {}
for line in sys.stdin:
    m = re.match(r"\s*([A-Za-z_.]+)\s*[=:]\s*(\S+)", line)
    if m:
        try:
            d[m.group(1)] = int(m.group(2))
        except ValueError:
            d[m.group(1)] = m.group(2)
print(json.dumps(d))'
}

# cpu_sampler OUT NS_A NS_B: until killed, every 0.25 s, the CPU time
# (utime + stime, all threads) of every process in the two hosts' mount
# namespaces (QEMUs, libvirtd, agents, the shim), as JSON lines
# {pid: [host, comm, CPU seconds, {tid: run-queue wait ns}]}; cpu_summary
# turns the first and last line
# into CPU seconds per host and program during the migration (a process that
# started during it counts from 0; one that ended counts until its last sample).
cpu_sampler() {
  exec python3 - "$@" <<'PY'
import json, os, sys, time
out, ns = sys.argv[1], {sys.argv[2]: "a", sys.argv[3]: "b"}
tick = os.sysconf("SC_CLK_TCK")
with open(out, "w") as f:
    while True:
        snap = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                h = ns.get(os.readlink(f"/proc/{p}/ns/mnt"))
                if h is None:
                    continue
                st = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            comm = st[st.index("(") + 1:st.rindex(")")]
            x = st[st.rindex(")") + 2:].split()
            # Per thread: nanoseconds spent runnable but waiting for a CPU.
            wait = {}
            try:
                for t in os.listdir(f"/proc/{p}/task"):
                    wait[t] = int(open(f"/proc/{p}/task/{t}/schedstat").read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
            snap[p] = [h, comm, (int(x[11]) + int(x[12])) / tick, wait]
        f.write(json.dumps(snap) + "\n")
        f.flush()
        time.sleep(0.25)
PY
}

# cpu_summary FILE FROM: {"cpu": {"src qemu-system-x86": s, "dst dwcp": s, ...},
# "wait": {...}}: CPU seconds, and seconds its threads were runnable but
# waiting for a CPU (/proc/PID/task/TID/schedstat; a thread that ended counts
# until its last sample).
cpu_summary() {
  python3 - "$@" <<'PY'
import json, sys
lines = []
for l in open(sys.argv[1]):
    try:
        lines.append(json.loads(l))
    except ValueError:
        pass
first, seen, waits = (lines[0] if lines else {}), {}, {}
for snap in lines:
    seen.update(snap)
    for pid, v in snap.items():
        waits.setdefault(pid, {}).update(v[3])
cpu, wait = {}, {}
for pid, (h, comm, c, _) in seen.items():
    key = ("src " if h == sys.argv[2] else "dst ") + comm
    cpu[key] = round(cpu.get(key, 0) + c - (first[pid][2] if pid in first else 0), 2)
    w0 = first[pid][3] if pid in first else {}
    w = sum(v - w0.get(t, 0) for t, v in waits[pid].items()) / 1e9
    wait[key] = round(wait.get(key, 0) + w, 2)
print(json.dumps({"cpu": {k: v for k, v in sorted(cpu.items()) if v >= 0.05},
                  "wait": {k: v for k, v in sorted(wait.items()) if v >= 0.05}}))
PY
}

# perf_summary PERF.DATA SRC_QEMU_PID DST_QEMU_PID (PERF=1): CPU seconds
# (samples at 499 Hz) of each QEMU by thread name and object (the QEMU
# binary, libdwcp, the kernel, TCG's generated code), the 12 largest.
perf_summary() {
  local side pid
  for side in src dst; do
    pid=$([ $side = src ] && echo "$2" || echo "$3")
    [ -n "$pid" ] || continue
    perf report -i "$1" --pid "$pid" -n --sort comm,dso --stdio -q 2>/dev/null | head -12 |
      awk -v side=$side '{ n = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); print side "\t" n "\t" $0 }'
  done | python3 -c '
import json, re, sys
out = {"src": [], "dst": []}
for line in sys.stdin:
    try:
        side, n, rest = line.rstrip("\n").split("\t", 2)
        n = int(n)
    except ValueError:
        continue
    rest = re.sub(r"\[JIT\] tid \d+", "[JIT]", re.sub(r"\s{2,}", " | ", rest.strip()))
    out[side].append([round(n / 499, 2), rest])
print(json.dumps(out))'
}

# one_run PROFILE CONTENDER ROUND FROM TO: one migration of g1; appends a JSON line.
one_run() {
  local prof=$1 who=$2 round=$3 f=$4 t=$5 d=g1 uri args=() rc tx0 tx1 t0 t1
  case $who in
    dwcp)
      route "$f" "$t" "$d" || { lv_log "route failed"; return 1; }
      uri=unix:///run/dwcp/$d.sock ;;
    dwcp-uri) uri="dwcp://${IP[$t]}?streams=4&codec=auto"; args=(--tls) ;;
    dwcp-uri-clear) uri="dwcp://${IP[$t]}?streams=4&codec=auto&insecure=1" ;;
    dwcp-uri@*) uri="dwcp://${IP[$t]}?${who#*@}"; args=(--tls) ;;
    dwcp-uri-clear@*) uri="dwcp://${IP[$t]}?${who#*@}&insecure=1" ;;
    dwcp-*)
      route "$f" "$t" "$d" --codec "${who#dwcp-}" || { lv_log "route failed"; return 1; }
      uri=unix:///run/dwcp/$d.sock ;;
    libvirt) uri=tcp://${IP[$t]} ;;
    libvirt-par)
      uri=tcp://${IP[$t]}
      args=(--parallel --parallel-connections 4 --compressed --comp-methods zstd) ;;
    nova) nova_agents native || return 1; uri=tcp://${IP[$t]} ;;
    nova-shim) nova_agents shim || return 1; nova_shim_up; uri=tcp://${IP[$t]} ;;
    *) lv_log "unknown contender $who"; return 1 ;;
  esac
  tx0=$(link_tx "$f")
  cpu_sampler "$LAB/cpu.jsonl" "${MNTNS[a]}" "${MNTNS[b]}" &
  local sampler=$! perf_pid= src_qemu
  src_qemu=$(hx "$f" cat "/run/libvirt/qemu/$d.pid" 2>/dev/null)
  if [ -n "${PERF:-}" ]; then
    perf record -q -a -F 499 -o "$LAB/perf.data" 2>>"$LAB/perf.log" &
    perf_pid=$!
  fi
  sleep 0.3
  if [[ $who == nova* ]]; then
    lv_log "[$prof round $round] $who: Nova's call"
    t0=$(date +%s.%N)
    MIG_TIMEOUT=$MIG_TIMEOUT nova_call "$f" "$t" "$d"
    rc=$?
    t1=$(date +%s.%N)
    [ "$who" = nova-shim ] && nova_shim_down
    # PERSIST_DEST defined the guest on TO: transient again, like the others leave it.
    [ $rc = 0 ] && hvirsh "$t" undefine "$d" >/dev/null
  else
    lv_log "[$prof round $round] $who: virsh migrate --live --p2p $d $(dst_uri "$t") --migrateuri $uri ${args[*]}"
    t0=$(date +%s.%N)
    hx "$f" timeout "$MIG_TIMEOUT" virsh -q -c qemu:///system migrate --live --p2p "$d" "$(dst_uri "$t")" \
      --migrateuri "$uri" "${args[@]}" >"$LAB/virsh.out" 2>&1
    rc=$?
    t1=$(date +%s.%N)
  fi
  tx1=$(link_tx "$f")
  sleep 0.3
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local cpu; cpu=$(cpu_summary "$LAB/cpu.jsonl" "$f")
  local perf_top="{}"
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null
    perf_top=$(perf_summary "$LAB/perf.data" "$src_qemu" "$(hx "$t" cat "/run/libvirt/qemu/$d.pid" 2>/dev/null)") || perf_top="{}"
    rm -f "$LAB/perf.data"
  fi
  local err="" guest_ok=false job session="{}"
  if [ $rc = 0 ]; then
    verify_moved "$f" "$t" "$d" && guest_ok=true
  else
    err=$(tr '\n' ' ' <"$LAB/virsh.out" | cut -c1-300)
    lv_log "virsh failed ($rc): $err"
  fi
  job=$(jobinfo "$f" "$d"); local job_from=source
  [ "$job" = "{}" ] && { job=$(jobinfo "$t" "$d"); job_from=destination; }
  if [[ ( $who == dwcp* && $who != dwcp-uri* ) || $who == nova* ]]; then
    local pat=$d; [[ $who == nova* ]] && pat="nova-${IP[$t]}-*"
    session=$(agent_ctl "$f" '{"op":"stats"}' | python3 -c '
import fnmatch, json, sys
s = [x for x in json.load(sys.stdin)["sessions"] if fnmatch.fnmatch(x["name"], sys.argv[1])]
x = s[-1] if s else {}
print(json.dumps({k: x.get(k) for k in ("name", "streams", "tier", "raw_out", "wire_out", "ratio_out", "elapsed_s", "state")}))' "$pat")
    [[ $who == dwcp* ]] && unroute "$f" "$d"
  fi
  python3 - "$prof" "$who" "$round" "$f" "$t" "$rc" "$t0" "$t1" "$((tx1 - tx0))" "$guest_ok" "$job" "$job_from" "$session" "$err" "$cpu" "$perf_top" >>"$RUNS" <<'PY'
import json, sys
prof, who, rnd, f, t, rc, t0, t1, tx, ok, job, job_from, sess, err, cpu, perf = sys.argv[1:]
job, sess = json.loads(job), json.loads(sess)
print(json.dumps({
    "profile": prof, "contender": who, "round": int(rnd), "from": f, "to": t,
    "ok": rc == "0", "guest_ok": ok == "true", "error": err or None,
    "total_s": round(float(t1) - float(t0), 2),
    "downtime_ms": job.get("downtime"),
    "libvirt_data_bytes": job.get("data_processed", job.get("memory_processed")),
    "libvirt_memory_bytes": job.get("memory_processed"), "guest_memory_bytes": job.get("memory_total"),
    "libvirt_time_ms": job.get("time_elapsed"), "jobinfo_from": job_from,
    "dwcp_wire_bytes": sess.get("wire_out"), "dwcp_session": sess or None,
    "link_tx_bytes": int(tx), "cpu_s": json.loads(cpu)["cpu"], "runq_wait_s": json.loads(cpu)["wait"], "perf_top_s": json.loads(perf) or None, "jobinfo": job,
}))
PY
  tail -1 "$RUNS" >&2
  # A failed migration leaves the guest on FROM; anything else is fatal.
  if [ $rc != 0 ]; then running_on "$f" "$d" || return 1; return 2; fi
  [ "$guest_ok" = true ]
}

cur=a LOST=0
[ -n "${SUMMARY_ONLY:-}" ] && PROFILES=
for prof in $PROFILES; do
  LAB=$BASE_LAB-$prof
  LV_TAG=lb$(( $$ % 10000 ))${prof:0:1}
  if [ "$prof" = dc ]; then unset LV_PROFILE; MIG_TIMEOUT=${MIG_TIMEOUT_DC:-180}; else export LV_PROFILE=$prof; MIG_TIMEOUT=${MIG_TIMEOUT_WAN:-600}; fi
  kvar=K_$prof; k=${!kvar:-${K:-2}}
  cont=$(contenders "$prof")
  lv_log "=== profile $prof: $k round(s) of $cont; guest ${GUEST_MB} MiB, fill ${GUEST_FILL} MiB, dirty ${GUEST_DIRTY} MiB/s; lab $LAB; $(uptime)"
  lab_up || { lv_log "lab did not come up"; exit 1; }
  lv_log "agents: dwcp agent ... $LV_AGENT_ARGS; dwcp $("$DWCP_BIN" --version | cut -d' ' -f2) ($DWCP_BIN)"
  if [ -n "$QEMU_SRC" ]; then
    # The patched QEMU runs the guest for every contender (a copy in the lab
    # that libvirt-qemu can run: lab.sh's dwcp_qemu).
    DWCP_QEMU=$QEMU_SRC
    dwcp_qemu || exit 1
    export LV_EMULATOR=$DWCP_QEMU
  fi
  boot a g1 || { lv_log "guest did not boot"; exit 1; }
  cur=a
  for round in $(seq "$k"); do
    for who in $cont; do
      other=$([ $cur = a ] && echo b || echo a)
      one_run "$prof" "$who" "$round" "$cur" "$other"
      case $? in
        0) cur=$other ;;
        2) ;;  # failed migration, guest still on $cur
        *) lv_log "guest lost or damaged: stopping"; LOST=1; break 3 ;;
      esac
    done
  done
  lv_log "=== profile $prof done; $(uptime)"
  lab_down
done

python3 - "$RUNS" "$OUT" "$COMMIT" "$STARTED" "$GUEST_MB" "$GUEST_FILL" "$GUEST_DIRTY" "$PROFILES" "$ALL_CONTENDERS" <<'PY'
import json, statistics, sys
runs_path, out, commit, started, mb, fill, dirty, profiles, contenders = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
profiles = " ".join(dict.fromkeys(profiles.split() + [r["profile"] for r in runs]))
contenders = " ".join(dict.fromkeys(contenders.split() + [r["contender"] for r in runs]))
json.dump({"commit": commit, "date": started, "guest": {"memory_mib": int(mb), "fill_mib": int(fill),
           "dirty_mib_s": int(dirty)}, "runs": runs}, open(f"{out}/results.json", "w"), indent=1)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(x, scale=1.0, nd=1):
    return "-" if x is None else f"{x / scale:.{nd}f}"
desc = {"dwcp": "virsh unix:// through the agents (hook route, agent defaults: 4 streams, codec auto)", "dwcp-zstd": "DWCP --codec zstd", "dwcp-auto": "DWCP --codec auto", "libvirt": "libvirt tcp",
        "dwcp-uri": "dwcp:// --tls (patched libvirt + QEMU, 4 streams, codec auto)",
        "dwcp-uri-clear": "dwcp:// insecure=1 (patched libvirt + QEMU, 4 streams, codec auto)",
        "libvirt-par": "libvirt --parallel 4 --compressed zstd",
        "nova": "Nova's call, agents' native ingress", "nova-shim": "Nova's call, dwcp-nova-shim relay"}
def label(c):
    if "@" in c:
        base, q = c.split("@", 1)
        return ("dwcp:// --tls" if base == "dwcp-uri" else "dwcp:// insecure=1") + f" ({q})"
    return desc.get(c, c)
lines = [f"Commit {commit}, {started}; guest {mb} MiB, {fill} MiB content, dirtied {dirty} MiB/s; "
         "medians over the rounds (each run in results.json).", "",
         "| profile | contender | runs ok / guest ok | runs s | total s | downtime ms | libvirt data MiB | DWCP wire MiB | link MiB (src->dst) |",
         "|---|---|---|---|---|---|---|---|---|"]
for p in profiles.split():
    for c in dict.fromkeys(contenders.split()):
        rs = [r for r in runs if r["profile"] == p and r["contender"] == c]
        if not rs:
            continue
        ok = [r for r in rs if r["ok"]]
        lines.append("| {} | {} | {}/{} / {} | {} | {} | {} | {} | {} | {} |".format(
            p, label(c), len(ok), len(rs), sum(r["guest_ok"] for r in rs),
            ", ".join(f"{r['total_s']:.2f}" + ("" if r["ok"] else " (failed)") for r in rs),
            f(med([r["total_s"] for r in ok]), 1, 2),
            f(med([r["downtime_ms"] for r in ok]), 1, 0),
            f(med([r["libvirt_data_bytes"] for r in ok]), 1 << 20),
            f(med([r["dwcp_wire_bytes"] for r in ok]), 1 << 20),
            f(med([r["link_tx_bytes"] for r in ok]), 1 << 20)))
# CPU seconds during the migration (bench.sh's cpu_sampler), medians.
groups = [("src QEMU", lambda k: k.startswith("src qemu")), ("dst QEMU", lambda k: k.startswith("dst qemu")),
          ("agents", lambda k: k.endswith(" dwcp")), ("shim", lambda k: k.endswith(" python3")),
          ("libvirtd", lambda k: k.endswith(" libvirtd") or k.endswith(" rpc-libvirtd"))]
if any(r.get("cpu_s") for r in runs):
    waits = any(r.get("runq_wait_s") for r in runs)
    lines += ["", "CPU seconds used during the migration (medians; processes of the two lab hosts, "
              "sampled every 0.25 s; QEMU includes the guest's vCPU)" +
              ("; wait: seconds the QEMU's threads were runnable but waiting for a CPU" if waits else "") + ":", "",
              "| profile | contender | " + " | ".join(g for g, _ in groups) +
              (" | src QEMU wait | dst QEMU wait" if waits else "") + " | total s |",
              "|---|---|" + "---|" * (len(groups) + 1 + 2 * waits)]
    for p in profiles.split():
        for c in dict.fromkeys(contenders.split()):
            rs = [r for r in runs if r["profile"] == p and r["contender"] == c and r["ok"] and r.get("cpu_s")]
            if not rs:
                continue
            cells = [f(med([sum(v for k, v in r["cpu_s"].items() if sel(k)) for r in rs]), 1, 2) for _, sel in groups]
            if waits:
                cells += [f(med([sum(v for k, v in (r.get("runq_wait_s") or {}).items() if k.startswith(side + " qemu"))
                                 for r in rs if r.get("runq_wait_s")]), 1, 2) for side in ("src", "dst")]
            lines.append(f"| {p} | {label(c)} | " + " | ".join(cells) + f" | {f(med([r['total_s'] for r in rs]), 1, 2)} |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
lv_log "results: $OUT/results.json, $OUT/table.md"
[ $LOST = 0 ]
