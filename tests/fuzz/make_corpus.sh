#!/usr/bin/env bash
# Rebuilds the fuzzers' seed corpus (tests/fuzz/corpus/) with qemu-img and
# qemu-io: one small image per qcow2 variant. The corpus is committed, so the
# regression tests and the fuzzers never need qemu. Keep it near 1 MiB:
# small virtual sizes and mostly small clusters.
#
# usage: tests/fuzz/make_corpus.sh [OUTPUT_DIR]   (default: tests/fuzz/corpus)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/corpus"}
for tool in qemu-img qemu-io; do
  command -v "$tool" >/dev/null || { echo "make_corpus: $tool is needed" >&2; exit 1; }
done
mkdir -p "$out"
cd "$out"
rm -f ./*.qcow2

create() {  # NAME OPTIONS SIZE [qemu-img create args...]
  local name=$1 opts=$2 size=$3
  shift 3
  qemu-img create -q -f qcow2 -o "$opts" "$@" "$name" "$size"
}
io() {  # NAME qemu-io commands...
  local name=$1
  shift
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f qcow2 "${args[@]}" "$name" >/dev/null
}
# A write pattern that touches a partial cluster, a zeroed range and a discard.
writes=("write -P 0x11 0 3k" "write -P 0x22 5k 1k" "write -z 8k 2k" "write -P 0x33 20k 4k" "discard 20k 1k")

create v2-c512.qcow2 compat=0.10,cluster_size=512 64k
io v2-c512.qcow2 "${writes[@]}"

for bits in 1 2 4 8 16 32 64; do
  create "v3-c512-rc$bits.qcow2" "cluster_size=512,refcount_bits=$bits" 64k
  io "v3-c512-rc$bits.qcow2" "${writes[@]}"
done

create v3-c4k.qcow2 cluster_size=4k 256k
io v3-c4k.qcow2 "${writes[@]}" "write -P 0x44 200k 8k"

create v3-c64k.qcow2 cluster_size=64k 1M
io v3-c64k.qcow2 "write -P 0x55 1000 3000"

create extl2-c16k.qcow2 cluster_size=16k,extended_l2=on 256k
io extl2-c16k.qcow2 "write -P 0x66 0 1k" "write -P 0x67 3k 2k" "write -z 16k 4k" "write -P 0x68 40k 16k" "discard 44k 1k"

create zlib-c4k.qcow2 cluster_size=4k,compression_type=zlib 64k
io zlib-c4k.qcow2 "write -c -P 0x77 0 4k" "write -c -P 0x78 8k 8k" "write -P 0x79 20k 1k"

create zstd-c4k.qcow2 cluster_size=4k,compression_type=zstd 64k
io zstd-c4k.qcow2 "write -c -P 0x88 0 4k" "write -c -P 0x89 8k 8k" "write -P 0x8a 20k 1k"

create base-c1k.qcow2 cluster_size=1k 32k
io base-c1k.qcow2 "write -P 0x99 0 32k"
create backing-c1k.qcow2 cluster_size=1k 32k -b base-c1k.qcow2 -F qcow2
io backing-c1k.qcow2 "write -P 0x9a 1k 1k" "write -z 4k 2k" "discard 8k 1k"

create v2-backing-c512.qcow2 compat=0.10,cluster_size=512 32k -b base-c1k.qcow2 -F qcow2
io v2-backing-c512.qcow2 "write -P 0x9b 512 1k"

create snapshots-c1k.qcow2 cluster_size=1k 32k
io snapshots-c1k.qcow2 "write -P 0xaa 0 4k"
qemu-img snapshot -c first snapshots-c1k.qcow2
io snapshots-c1k.qcow2 "write -P 0xab 2k 4k" "discard 0 1k"
qemu-img snapshot -c second snapshots-c1k.qcow2

create datafile-c1k.qcow2 cluster_size=1k,data_file=datafile-c1k.data 32k
io datafile-c1k.qcow2 "write -P 0xbb 0 3k"
rm -f datafile-c1k.data  # the fuzzers never open it (it would be a second input)

create lazy-dirty-c1k.qcow2 cluster_size=1k,lazy_refcounts=on 32k
io lazy-dirty-c1k.qcow2 "write -P 0xcc 0 5k" abort 2>/dev/null || true

create bitmaps-c1k.qcow2 cluster_size=1k 32k
io bitmaps-c1k.qcow2 "write -P 0xdd 0 2k"
qemu-img bitmap --add bitmaps-c1k.qcow2 b0

# Persistent bitmaps with data: b0 enabled at 512-byte granules (a bitmap
# table of two entries, both data clusters), b1 disabled with a bit set.
# Then one damaged copy per directory, extension and table field
# (bitmap_seeds.py), each refused by QEMU unless the script says it is valid.
create bitmaps-base-c512.qcow2 cluster_size=512 4M
qemu-img bitmap --add -g 512 bitmaps-base-c512.qcow2 b0
qemu-img bitmap --add -g 64k bitmaps-base-c512.qcow2 b1
io bitmaps-base-c512.qcow2 "write -P 0xe1 0 512"
qemu-img bitmap --disable bitmaps-base-c512.qcow2 b1
io bitmaps-base-c512.qcow2 "write -P 0xe2 3M 512"
python3 "$here/bitmap_seeds.py" bitmaps-base-c512.qcow2 .

du -cb ./*.qcow2 | tail -1
