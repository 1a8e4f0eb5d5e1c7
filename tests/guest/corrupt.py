#!/usr/bin/env python3
"""corrupt.py GUEST_RAM_FILE AREA_DUMP FIRST_IDX

Finds a page of the workload's fill area (AREA_DUMP, written by
`dwcp-workload --dump`, same fill/seed, dirty=0 so pages are still generation 0)
whose content occurs exactly once in the guest RAM file (a QEMU
memory-backend-file with share=on), flips one bit of it in place and prints the
page index.  Tries indices FIRST_IDX, FIRST_IDX+97, ..."""
import mmap
import sys

PAGE = 4096


def main():
    ram_path, dump_path, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(dump_path, "rb") as f:
        dump = f.read()
    npages = len(dump) // PAGE
    cands = {}
    for k in range(32):
        idx = (first + 97 * k) % npages
        page = dump[idx * PAGE:(idx + 1) * PAGE]
        if page.count(0) < PAGE // 2:  # skip zero-ish pages
            cands.setdefault(page, idx)
    hits = {page: [] for page in cands}
    with open(ram_path, "r+b") as f:
        ram = mmap.mmap(f.fileno(), 0)
        for off in range(0, len(ram), PAGE):
            chunk = ram[off:off + PAGE]
            if chunk in hits:
                hits[chunk].append(off)
        for page, offs in hits.items():
            if len(offs) == 1 and sum(1 for p in cands if p == page) == 1:
                idx = cands[page]
                # unique in guest RAM; must also be unique in the area (not a dup source)
                if dump.count(page) != 1:
                    continue
                ram[offs[0] + 1000] ^= 0x01
                ram.flush()
                print(idx)
                return
    sys.exit("corrupt.py: no uniquely placed page found")


if __name__ == "__main__":
    main()
