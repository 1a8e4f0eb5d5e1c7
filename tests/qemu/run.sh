#!/bin/sh
# End-to-end test of QEMU's dwcp: transport: builds (or reuses) the patched
# QEMU and the test guest, then runs e2e.py (see its docstring for the
# cases). ~2-4 min on 2 cores once QEMU is cached (the first QEMU build is
# ~5-10 min). KEEP=1 keeps the work directory (logs, serial output).
# Exit 0 = every check passed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
qemu=${QEMU:-$("$root/qemu-patches/build.sh" | tail -1)}
"$root/tests/guest/build.sh" >/dev/null
work=$(mktemp -d /tmp/dwcp-qemu-e2e.XXXXXX)
rc=0
python3 "$here/e2e.py" "$qemu" "$root/tests/guest/out" "$work" || rc=$?
if [ "${KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
    echo "tests/qemu: logs in $work"
else
    rm -rf "$work"
fi
exit $rc
