#!/usr/bin/env python3
"""End-to-end test of QEMU's dwcp: migration transport (qemu-patches/).

Boots the self-checking test guest (tests/guest) in the patched QEMU and
migrates it over dwcp: on loopback, chained (each destination becomes the
next source), once per case of the matrix below. For each migration:
destination RAM (paused, before `cont`) must equal the source's
(postmigrate) byte for byte (pmemsave), and after `cont` the guest must go
on printing heartbeats with errors=0. Failure cases run on the first
source while it is running: a bad URI is refused with a message naming
the problem, an unreachable destination fails the migration, a
destination killed mid-way fails it, and migrate_cancel cancels it; the
source keeps running after each.

The last migration of the matrix runs with QEMU's tls-creds (a
tls-creds-x509 object on each side, with a CA generated at run time by
openssl) instead of insecure=1. Before it, against the same waiting
destination: tls-creds naming a PSK object and insecure=1 with tls-creds
are refused (and, on QEMU 10.2 and later, a tls-creds directory holding
a second, numbered identity); a source trusting another CA, a source
whose client certificate another CA signed and a tls-hostname the
destination's certificate does not carry each fail the migration with
an error that names the TLS failure, the source keeps running and the
destination is still waiting (inmigrate) -- the migration that follows
proves it received nothing before. After that migration, QEMU's trace
events show that every channel (main and multifd) stayed a qio-channel-dwcp on
both sides: QEMU added no TLS of its own.

Usage: e2e.py QEMU_BINARY GUEST_DIR WORKDIR   (exit 0 = all passed)
"""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

QEMU, GUEST, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
MEM_MB = 256
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer
# check can miss its ticks and panic ("IO-APIC + timer doesn't work")
APPEND = "console=ttyS0 panic=-1 quiet no_timer_check dwcp.fill=96 dwcp.dirty=8"

# (streams, codec, multifd, incoming form); the transport is dwcp with
# insecure=1, or "dwcp+tls-creds" (QEMU's tls-creds, see tls_case())
MATRIX = [
    (1, "none", False, "cmdline", "dwcp"),
    (8, "lz4", False, "cmdline", "dwcp"),
    (8, "zstd:3", True, "qapi", "dwcp"),
    (1, "lz4", True, "uri", "dwcp"),
    (4, "auto", True, "qapi", "dwcp"),
    (4, "lz4", True, "uri", "dwcp+tls-creds"),
]

results = []
timings = []

# BENCH=1: alternate QEMU's tcp: and dwcp: on the same guest and link
# (loopback here), two rounds, instead of the test matrix.
BENCH_MATRIX = [
    (0, "", False, "cmdline", "tcp"),
    (4, "auto", False, "cmdline", "dwcp"),
    (0, "", True, "cmdline", "tcp"),
    (4, "auto", True, "uri", "dwcp"),
] * 2


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class QMP:
    def __init__(self, path):
        deadline = time.time() + 20
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def raw(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP connection closed during {name}")
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return reply

    def cmd(self, name, args=None):
        reply = self.raw(name, args)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']['desc']}")
        return reply["return"]

    def status(self):
        return self.cmd("query-status")["status"]

    def migrate_status(self):
        return self.cmd("query-migrate")


class VM:
    count = 0

    def __init__(self, name, incoming=None):
        VM.count += 1
        self.name = name
        self.qmp_path = os.path.join(WORK, f"{name}.qmp")
        self.serial = os.path.join(WORK, f"{name}.serial")
        args = [
            QEMU, "-accel", "tcg", "-cpu", "qemu64", "-machine", "pc", "-smp", "1",
            "-m", str(MEM_MB), "-nodefaults", "-no-user-config", "-display", "none",
            "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
            "-serial", f"file:{self.serial}",
            "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", os.path.join(GUEST, "initrd.img"),
            "-append", APPEND, "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            args += ["-incoming", incoming, "-S"]
        self.stderr = open(os.path.join(WORK, f"{name}.stderr"), "w")
        self.proc = subprocess.Popen(args, stdout=self.stderr, stderr=subprocess.STDOUT)
        self.qmp = QMP(self.qmp_path)

    def serial_text(self):
        try:
            with open(self.serial, "rb") as f:
                return f.read().decode("latin-1")
        except FileNotFoundError:
            return ""

    def heartbeats(self):
        return [(int(m.group(1)), int(m.group(2)), int(m.group(3)))
                for m in re.finditer(r"DWCP-HB seq=(\d+) .*?swept=(\d+) errors=(\d+)", self.serial_text())]

    def wait_serial(self, pattern, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.serial_text()):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.qmp.raw("quit")
            except Exception:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def check(name, ok, detail=""):
    results.append((name, ok))
    log(f"{'PASS' if ok else 'FAIL'}: {name}{' -- ' + detail if detail else ''}")
    return ok


def wait_migration(vm, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = vm.qmp.migrate_status()
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.2)
    return vm.qmp.migrate_status()


def ram_digest(vm, tag):
    path = os.path.join(WORK, f"{vm.name}-{tag}.ram")
    vm.qmp.cmd("pmemsave", {"val": 0, "size": MEM_MB << 20, "filename": path})
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    size = os.path.getsize(path)
    os.unlink(path)
    return h.hexdigest(), size


def set_bandwidth(vm, bytes_per_s):
    vm.qmp.cmd("migrate-set-parameters", {"max-bandwidth": bytes_per_s})


def failure_cases(src):
    # 1. invalid URIs: refused synchronously with a message naming the problem
    for uri, want in [
        ("dwcp:127.0.0.1:4444?streams=0", "streams = 0 is out of range"),
        ("dwcp:127.0.0.1:4444?codec=gzip", "codec = gzip is out of range"),
        ("dwcp:127.0.0.1", "no ':PORT'"),
        ("dwcp:127.0.0.1:4444?stream=8", "unknown parameter 'stream'"),
    ]:
        reply = src.qmp.raw("migrate", {"uri": uri})
        desc = reply.get("error", {}).get("desc", "")
        check(f"bad URI {uri} refused", "error" in reply and want in desc, desc)
    check("source running after bad URIs", src.qmp.status() == "running")

    # 2. destination unreachable
    port = free_port()
    src.qmp.cmd("migrate", {"uri": f"dwcp:127.0.0.1:{port}?insecure=1&streams=4&connect-timeout=3"})
    info = wait_migration(src, 30)
    check("unreachable destination fails the migration",
          info.get("status") == "failed" and "refused" in info.get("error-desc", ""),
          info.get("error-desc", info.get("status")))
    check("source running after unreachable destination", src.qmp.status() == "running")

    # 3. destination killed mid-way (bandwidth capped so it takes a while)
    port = free_port()
    dst = VM("dst-killed", f"dwcp:127.0.0.1:{port}?insecure=1")
    set_bandwidth(src, 8 << 20)
    src.qmp.cmd("migrate", {"uri": f"dwcp:127.0.0.1:{port}?insecure=1&streams=4&codec=lz4"})
    time.sleep(2)
    mid = src.qmp.migrate_status().get("status")
    dst.proc.kill()
    dst.proc.wait()
    dst.stop()
    info = wait_migration(src, 60)
    check("destination killed mid-way fails the migration",
          mid == "active" and info.get("status") == "failed",
          f"was {mid}, now {info.get('status')}: {info.get('error-desc', '')}")
    check("source running after the destination died", src.qmp.status() == "running")

    # 4. migrate_cancel
    port = free_port()
    dst = VM("dst-cancel", f"dwcp:127.0.0.1:{port}?insecure=1")
    src.qmp.cmd("migrate", {"uri": f"dwcp:127.0.0.1:{port}?insecure=1&streams=4&codec=lz4"})
    time.sleep(2)
    mid = src.qmp.migrate_status().get("status")
    src.qmp.cmd("migrate_cancel")
    info = wait_migration(src, 30)
    check("migrate_cancel cancels", mid == "active" and info.get("status") == "cancelled",
          f"was {mid}, now {info.get('status')}")
    check("source running after cancel", src.qmp.status() == "running")
    try:
        dst.proc.wait(20)
        check("destination gives up after the cancel", True, f"exit {dst.proc.returncode}")
    except subprocess.TimeoutExpired:
        check("destination gives up after the cancel", False, "still running 20 s later")
    dst.stop()
    set_bandwidth(src, 10 << 30)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def make_ca(path, name):
    """A throwaway CA (key and certificate) in `path`."""
    os.makedirs(path, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{path}/ca-key.pem", "-out", f"{path}/ca-cert.pem", "-days", "2",
            "-subj", f"/O=DWCP e2e/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return path


def make_host(path, ca, trust=()):
    """libvirt's layout in `path`: server and client certificates for
    localhost / 127.0.0.1 signed by `ca`; ca-cert.pem holds `ca`'s
    certificate and those of the CAs in `trust`."""
    os.makedirs(path, exist_ok=True)
    with open(f"{path}/ca-cert.pem", "w") as out:
        for c in (ca, *trust):
            with open(f"{c}/ca-cert.pem") as f:
                out.write(f.read())
    for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = f"{path}/{role}.ext"
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                    f"extendedKeyUsage={eku}\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "basicConstraints=CA:FALSE\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{path}/{role}-key.pem", "-out", f"{path}/{role}.csr",
                "-subj", "/O=DWCP e2e/CN=localhost")
        openssl("x509", "-req", "-in", f"{path}/{role}.csr", "-CA", f"{ca}/ca-cert.pem",
                "-CAkey", f"{ca}/ca-key.pem", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                "-days", "2", "-out", f"{path}/{role}-cert.pem", "-extfile", ext)
        os.unlink(ext)
        os.unlink(f"{path}/{role}.csr")
        os.chmod(f"{path}/{role}-key.pem", 0o600)
    return path


def object_add(vm, oid, qom_type, **props):
    vm.qmp.cmd("object-add", {"qom-type": qom_type, "id": oid, **props})


def tls_case(src, dst, port, params):
    """tls-creds on both sides. Sets up the destination (which must be
    started with -incoming defer) and the source, then checks what must
    fail against the waiting destination; returns when the source is set
    up for the migration that must succeed."""
    pki = os.path.join(WORK, "pki")
    ca, other = make_ca(f"{pki}/ca", "DWCP e2e CA"), make_ca(f"{pki}/other-ca", "another CA")
    dst_dir, src_dir = make_host(f"{pki}/dst", ca), make_host(f"{pki}/src", ca)
    foreign_dir = make_host(f"{pki}/foreign", other)              # trusts another CA only
    stranger_dir = make_host(f"{pki}/stranger", other, [ca])      # trusts ours, cert from another CA
    psk_dir = f"{pki}/psk"
    os.makedirs(psk_dir)
    with open(f"{psk_dir}/keys.psk", "w") as f:
        f.write("qemu:" + os.urandom(16).hex() + "\n")

    # QEMU's trace of every channel it sets up, and of its own TLS
    # handshakes (which must not happen: libdwcp does TLS): see
    # check_no_qemu_tls()
    for vm in (src, dst):
        for pattern in ("migration_set_*_channel", "migration_tls*", "multifd_tls*"):
            vm.qmp.cmd("trace-event-set-state", {"name": pattern, "enable": True})
    object_add(dst, "tls0", "tls-creds-x509", dir=dst_dir, endpoint="server")
    dst.qmp.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
    dst.qmp.cmd("migrate-incoming", {"uri": f"dwcp:127.0.0.1:{port}"})
    for oid, d in (("tls0", src_dir), ("foreign", foreign_dir), ("stranger", stranger_dir)):
        object_add(src, oid, "tls-creds-x509", dir=d, endpoint="client")
    object_add(src, "psk0", "tls-creds-psk", dir=psk_dir, endpoint="client", username="qemu")
    uri = f"dwcp:127.0.0.1:{port}?{params}"

    def refused(creds, args, want, name):
        src.qmp.cmd("migrate-set-parameters", {"tls-creds": creds})
        reply = src.qmp.raw("migrate", args)
        desc = reply.get("error", {}).get("desc", "")
        check(name, "error" in reply and want in desc, desc)

    refused("psk0", {"uri": uri}, "tls-creds 'psk0' is a tls-creds-psk object",
            "tls-creds naming a PSK object refused")
    refused("tls0", {"uri": uri + "&insecure=1"}, "insecure=1 conflicts with tls-creds",
            "insecure=1 with tls-creds refused")
    # Since 10.2 a tls-creds-x509 directory may hold more identities
    # (client-cert-N.pem...), of which QEMU's TLS picks one per peer;
    # libdwcp reads only client-cert.pem, so the series refuses them.
    # (QEMU 10.0 ignores those files, so the 10.0 series does not check.)
    v = src.qmp.cmd("query-version")["qemu"]
    if (v["major"], v["minor"]) >= (10, 2):
        multi_dir = f"{pki}/multi"
        shutil.copytree(src_dir, multi_dir)
        for f in ("client-cert", "client-key"):
            shutil.copy2(f"{src_dir}/{f}.pem", f"{multi_dir}/{f}-0.pem")
        object_add(src, "multi", "tls-creds-x509", dir=multi_dir, endpoint="client")
        refused("multi", {"uri": uri}, f"{multi_dir}/client-cert-0.pem is a further identity",
                "a tls-creds directory with a second identity refused")
    check("source running after the refusals", src.qmp.status() == "running")

    def fails(creds, hostname, want, name):
        src.qmp.cmd("migrate-set-parameters", {"tls-creds": creds, "tls-hostname": hostname})
        src.qmp.cmd("migrate", {"uri": uri})
        info = wait_migration(src, 30)
        desc = info.get("error-desc", "")
        check(f"{name}: the migration fails naming the TLS failure",
              info.get("status") == "failed" and "TLS" in desc and want in desc,
              f"{info.get('status')}: {desc}")
        check(f"{name}: source still running", src.qmp.status() == "running")
        dst_info = dst.qmp.migrate_status()
        check(f"{name}: destination still waiting, nothing received",
              dst.qmp.status() == "inmigrate" and dst_info.get("status") in (None, "none", "setup"),
              f"{dst.qmp.status()} {dst_info}")

    fails("foreign", "", "certificate signed by an unknown CA",
          "destination's certificate from a CA the source does not trust")
    fails("stranger", "", "rejected our certificate",
          "source's client certificate from a CA the destination does not trust")
    fails("tls0", "wrong.example", "name mismatch: expected wrong.example",
          "tls-hostname the destination's certificate does not carry")
    with open(dst.stderr.name) as f:
        log_text = f.read()
    check("destination's log names the refused TLS connection",
          "libdwcp: refused a connection" in log_text and "TLS" in log_text,
          log_text.strip().splitlines()[-1] if log_text.strip() else "empty")
    # the real one: our CA, the name the certificate carries
    src.qmp.cmd("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "localhost"})


def check_no_qemu_tls(src, dst, label, channels):
    """With tls-creds set, every channel must still be a plain
    qio-channel-dwcp on both sides (QEMU's trace events), never wrapped in
    QEMU's own TLS (qio-channel-tls, migration_tls_*/multifd_tls_* events)."""
    logs = {}
    for vm in (src, dst):
        with open(vm.stderr.name, errors="replace") as f:
            logs[vm.name] = f.read()
    out = re.findall(r"migration_set_outgoing_channel .*ioctype=(\S+)", logs[src.name])
    inc = re.findall(r"migration_set_incoming_channel .*ioctype=(\S+)", logs[dst.name])
    qemu_tls = [line for text in logs.values() for line in text.splitlines()
                if "qio-channel-tls" in line or re.match(r"(migration|multifd)_tls", line)]
    check(f"{label}: QEMU adds no TLS of its own (every channel qio-channel-dwcp)",
          out == ["qio-channel-dwcp"] and inc == ["qio-channel-dwcp"] * channels and not qemu_tls,
          f"outgoing {out}, incoming {inc}, QEMU TLS events {qemu_tls[:3]}")


def migrate(src, n, streams, codec, multifd, form, transport="dwcp"):
    port = free_port()
    tls = transport == "dwcp+tls-creds"
    # Clear text on this loopback test but for the tls-creds case (TLS
    # itself is covered by tests/tests/security.rs).
    params = f"{'' if tls else 'insecure=1&'}streams={streams}&codec={codec}"
    label = f"#{n} streams={streams} codec={codec} multifd={'on' if multifd else 'off'} ({form})"
    if tls:
        label = f"#{n} tls-creds streams={streams} codec={codec} multifd={'on' if multifd else 'off'}"
    if transport == "tcp":
        label = f"#{n} tcp: multifd={'on' if multifd else 'off'} (QEMU's own transport)"
    if transport == "dwcp" and form == "cmdline":
        dst = VM(f"dst{n}", f"dwcp:127.0.0.1:{port}?insecure=1")
    else:
        dst = VM(f"dst{n}", "defer")
    for vm in (src, dst):
        vm.qmp.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "multifd", "state": multifd}]})
        if multifd:
            vm.qmp.cmd("migrate-set-parameters", {"multifd-channels": 4})
    if transport == "tcp":
        dst.qmp.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    elif tls:
        tls_case(src, dst, port, params)
    elif form == "qapi":
        dst.qmp.cmd("migrate-incoming", {"channels": [{
            "channel-type": "main",
            "addr": {"transport": "dwcp", "host": "127.0.0.1", "port": str(port), "params": params}}]})
    elif form == "uri":
        dst.qmp.cmd("migrate-incoming", {"uri": f"dwcp:127.0.0.1:{port}?insecure=1"})
    hb_before = len(src.heartbeats())
    t0 = time.time()
    if form == "qapi":
        src.qmp.cmd("migrate", {"channels": [{
            "channel-type": "main",
            "addr": {"transport": "dwcp", "host": "127.0.0.1", "port": str(port), "params": params}}]})
    elif transport == "tcp":
        src.qmp.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    else:
        src.qmp.cmd("migrate", {"uri": f"dwcp:127.0.0.1:{port}?{params}"})
    info = wait_migration(src)
    wall = time.time() - t0
    ok = check(f"migration {label} completes", info.get("status") == "completed",
               f"{info.get('status')} {info.get('error-desc', '')}")
    if not ok:
        dst.stop()
        return None
    ram = info.get("ram", {})
    timings.append((label, info.get("total-time"), info.get("downtime"), ram.get("transferred", 0)))
    log(f"  {wall:.1f} s wall, total-time {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
        f"{ram.get('transferred', 0) >> 20} MiB transferred, multifd bytes {ram.get('multifd-bytes', 0) >> 20} MiB")
    check(f"source guest was running during {label}", len(src.heartbeats()) > hb_before)
    # destination: incoming completed, paused (-S / defer without autostart)
    deadline = time.time() + 30
    while time.time() < deadline and dst.qmp.status() not in ("paused", "prelaunch"):
        time.sleep(0.2)
    check(f"{label}: source postmigrate, destination paused",
          src.qmp.status() == "postmigrate" and dst.qmp.status() in ("paused", "prelaunch"),
          f"{src.qmp.status()} / {dst.qmp.status()}")
    a, b = ram_digest(src, "src"), ram_digest(dst, "dst")
    check(f"{label}: destination RAM identical ({a[1] >> 20} MiB)", a == b and a[1] == MEM_MB << 20)
    if tls:
        check_no_qemu_tls(src, dst, label, 1 + (4 if multifd else 0))
    dst.qmp.cmd("cont")
    ok = dst.wait_serial(r"DWCP-HB seq=\d+ .*errors=\d+(.|\n)*DWCP-HB seq=\d+ .*errors=\d+", 60)
    hbs = dst.heartbeats()
    check(f"{label}: guest continues on the destination with errors=0",
          ok and len(hbs) >= 2 and all(e == 0 for _, _, e in hbs) and "DWCP-ERROR" not in dst.serial_text(),
          f"{len(hbs)} heartbeats, last {hbs[-1] if hbs else None}")
    src.stop()
    return dst


def main():
    os.makedirs(WORK, exist_ok=True)
    t0 = time.time()
    src = VM("src0")
    ready = src.wait_serial(r"DWCP-READY", 180)
    if not check("source guest boots (DWCP-READY)", ready):
        print(src.serial_text()[-2000:])
        src.stop()
        return 1
    # let it run a little: heartbeats, some dirtying
    src.wait_serial(r"DWCP-HB seq=3 ", 30)
    bench = os.environ.get("BENCH") == "1"
    if not bench:
        failure_cases(src)
    vm = src
    matrix = BENCH_MATRIX if bench else MATRIX
    for n, (streams, codec, multifd, form, transport) in enumerate(matrix, 1):
        nxt = migrate(vm, n, streams, codec, multifd, form, transport)
        if nxt is None:
            break
        vm = nxt
    # the final guest: a full verification sweep after the last switch-over
    swept0 = vm.heartbeats()[-1][1] if vm.heartbeats() else 0
    ok = vm.wait_serial(r"swept=%d " % (swept0 + 2), 90)
    hbs = vm.heartbeats()
    check("final guest completes two more verification sweeps with errors=0",
          ok and all(e == 0 for _, _, e in hbs), f"last {hbs[-1] if hbs else None}")
    vm.stop()
    log("migration | total-time ms | downtime ms | transferred MiB")
    for label, total, down, sent in timings:
        log(f"{label} | {total} | {down} | {sent >> 20}")
    failed = [n for n, ok in results if not ok]
    log(f"{len(results) - len(failed)}/{len(results)} checks passed in {time.time() - t0:.0f} s")
    for n in failed:
        log(f"FAILED: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
