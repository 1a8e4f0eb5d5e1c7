#!/usr/bin/env python3
"""Minimal QMP client: qmp.py SOCKET COMMAND [JSON-ARGUMENTS]

Connects to a QEMU QMP unix socket, negotiates capabilities, runs one command
and prints its "return" value as JSON (exit 1 and the error on failure).
Waits up to 10 s for the socket to appear."""
import json
import socket
import sys
import time


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, cmd = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    deadline = time.time() + 10
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    f = s.makefile("rw")

    def call(name, arguments=None):
        msg = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("qmp: connection closed")
            reply = json.loads(line)
            if "return" in reply or "error" in reply:  # skip events
                return reply

    json.loads(f.readline())  # greeting
    call("qmp_capabilities")
    reply = call(cmd, args)
    if "error" in reply:
        print(json.dumps(reply["error"]))
        sys.exit(1)
    print(json.dumps(reply["return"]))


if __name__ == "__main__":
    main()
