#!/usr/bin/env bash
# The main job: install what is missing, build, and run a short benchmark on
# a temporary image in /dev/shm (random writes that allocate, random reads,
# and an L2 cache-size sweep drawn to a plot).
set -euo pipefail
cd "$(dirname "$0")/.."

tools/bootstrap.sh
bazel ${BAZEL_STARTUP:-} build -c opt //tools:uqcow
uqcow="$(bazel ${BAZEL_STARTUP:-} info -c opt bazel-bin 2>/dev/null)/tools/uqcow"

work=$(mktemp -d /dev/shm/uqcow-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
img="$work/demo.qcow2"
out="${UQCOW_OUT:-$PWD/bench/out}"
mkdir -p "$out"

"$uqcow" create -q -f qcow2 "$img" 1G
echo "== 4 KiB random writes into an empty 1 GiB image (allocating), QD32"
"$uqcow" bench --rw randwrite --bs 4k --depth 32 --runtime 3 "$img"
echo
echo "== fill the image, then 4 KiB random reads, QD32"
"$uqcow" bench --rw write --bs 1M --depth 8 --count 1024 "$img" >/dev/null
"$uqcow" bench --rw randread --bs 4k --depth 32 --runtime 3 "$img"
echo
"$uqcow" bench --advise "$img"
echo "== L2 cache-size sweep (4 KiB random reads, 4 KiB slices)"
"$uqcow" bench --rw randread --bs 4k --depth 32 --runtime 2 --l2-cache-entry-size 4k \
  --sweep l2-cache-size=16k,32k,64k,128k,256k --csv "$out/sweep.csv" --plot "$out/sweep.svg" "$img"
if command -v qemu-img >/dev/null; then
  echo
  echo "== qemu-img check of the benchmarked image"
  qemu-img check "$img"
fi
