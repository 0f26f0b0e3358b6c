#!/usr/bin/env python3
"""Damaged variants of a qcow2 image with persistent bitmaps, for the seed
corpus (make_corpus.sh calls this on an image qemu-img made).

usage: bitmap_seeds.py BASE.qcow2 OUTPUT_DIR

BASE must hold at least two bitmaps (a directory of two entries with two-byte
names), the first with a bitmap table of at least two entries whose first is
a data cluster. Each variant changes one thing (docs/interop/qcow2.txt,
"Bitmaps"): a field of the bitmaps extension, of the first directory entry,
or of the first bitmap table. Some are valid (an IN_USE bitmap, an all-ones
table entry, the extension left behind by a program without bitmap support);
the rest are refused by QEMU. The fuzzers mutate from all of them.
"""
import struct
import sys

BITMAPS_EXT = 0x23852875


def find_extension(img):
    """Offset of the bitmaps extension's data (after type and length)."""
    pos = struct.unpack_from(">I", img, 100)[0]  # header_length
    while pos + 8 <= len(img):
        ext_type, length = struct.unpack_from(">II", img, pos)
        if ext_type == 0:
            break
        if ext_type == BITMAPS_EXT:
            return pos + 8
        pos += 8 + ((length + 7) & ~7)
    sys.exit("bitmap_seeds: no bitmaps extension in the base image")


def main():
    base_path, out = sys.argv[1], sys.argv[2]
    base = bytearray(open(base_path, "rb").read())
    ext = find_extension(base)
    nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", base, ext)
    entry = dir_off  # the first directory entry
    table_off, table_size = struct.unpack_from(">QI", base, entry)
    second = entry + ((24 + struct.unpack_from(">H", base, entry + 18)[0] + 7) & ~7)
    data0 = struct.unpack_from(">Q", base, table_off)[0] & 0x00FFFFFFFFFFFE00
    assert nb >= 2 and table_size >= 2 and data0, "unexpected base image layout"
    l1_off = struct.unpack_from(">Q", base, 40)[0]
    reftable_off = struct.unpack_from(">Q", base, 48)[0]
    cluster = 1 << struct.unpack_from(">I", base, 20)[0]
    past_eof = (len(base) + cluster - 1) // cluster * cluster + 64 * cluster  # aligned, beyond the file

    def put(img, fmt, at, value):
        struct.pack_into(fmt, img, at, value)

    # name -> list of (format, offset, value) patches
    variants = {
        # The extension.
        "ext-nb-more": [(">I", ext, nb + 1)],
        "ext-nb-fewer": [(">I", ext, nb - 1)],
        "ext-nb-zero": [(">I", ext, 0)],
        "ext-reserved": [(">I", ext + 4, 1)],
        "ext-dirsize-short": [(">Q", ext + 8, dir_size - 8)],
        "ext-dirsize-huge": [(">Q", ext + 8, 1 << 40)],
        "ext-diroff-unaligned": [(">Q", ext + 16, dir_off + 8)],
        "ext-diroff-past-eof": [(">Q", ext + 16, past_eof)],
        "ext-diroff-header": [(">Q", ext + 16, 0)],
        "autoclear-cleared": [(">Q", 88, 0)],  # valid: the bitmaps are ignored
        # The first directory entry.
        "table-offset-unaligned": [(">Q", entry, table_off + 8)],
        "table-offset-zero": [(">Q", entry, 0)],
        "table-offset-past-eof": [(">Q", entry, past_eof)],
        "table-offset-l1": [(">Q", entry, l1_off)],
        "table-size-zero": [(">I", entry + 8, 0)],
        "table-size-short": [(">I", entry + 8, table_size - 1)],
        "table-size-huge": [(">I", entry + 8, 0x8000001)],
        "flags-in-use": [(">I", entry + 12, 3)],  # valid: inconsistent
        "flags-reserved": [(">I", entry + 12, 0x6)],
        "type": [(">B", entry + 16, 2)],
        "granularity-small": [(">B", entry + 17, 8)],
        "granularity-large": [(">B", entry + 17, 32)],
        "granularity-coarser": [(">B", entry + 17, 10)],  # the table no longer fits the size
        "name-size-zero": [(">H", entry + 18, 0)],
        "name-size-past-dir": [(">H", entry + 18, 1000)],
        "extra-data": [(">I", entry + 20, 8)],
        "duplicate-names": [(">B", second + 24 + 1, base[entry + 24 + 1])],
        # The first bitmap table.
        "entry-all-ones": [(">Q", table_off, 1)],  # valid: every bit set
        "entry-all-ones-with-offset": [(">Q", table_off, data0 | 1)],
        "entry-reserved-bits": [(">Q", table_off, data0 | (1 << 60))],
        "entry-unaligned": [(">Q", table_off, data0 + 8)],
        "entry-past-eof": [(">Q", table_off, past_eof)],
        "entry-reftable": [(">Q", table_off, reftable_off)],
        "entry-l1": [(">Q", table_off, l1_off)],
        "entry-own-table": [(">Q", table_off, table_off)],
        "entry-shared": [(">Q", table_off + 8, data0)],  # two entries, one cluster
    }
    for name, patches in variants.items():
        img = bytearray(base)
        for fmt, at, value in patches:
            put(img, fmt, at, value)
        with open(f"{out}/bitmaps-{name}.qcow2", "wb") as f:
            f.write(img)
    # A bitmap table that runs into the end of the file: the file cut there.
    with open(f"{out}/bitmaps-truncated-table.qcow2", "wb") as f:
        f.write(base[: table_off + 8])


if __name__ == "__main__":
    main()
