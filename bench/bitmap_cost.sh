#!/usr/bin/env bash
# The cost of dirty tracking on the write path (issue 15): 4 KiB QD32
# random writes to an image without bitmaps and to the same image with one
# enabled persistent bitmap (qemu-img bitmap --add, 64 KiB granules), runs
# alternating between the two, on one build. Target: with the bitmap at
# least 0.97x the IOPS without.
#
#   bench/bitmap_cost.sh
#
#   inplace  in-place writes (COPIED clusters) over a fully allocated 1 GiB
#            image (preallocation=falloc)
#   alloc    random allocating writes on a fresh 2 GiB image
#
# Images live in /dev/shm. UQCOW_BITMAP_REPEAT runs of each (default 5),
# UQCOW_BITMAP_RUNTIME seconds per run (default 3). Prints the median IOPS and
# CPU ns per I/O of each and the ratio; then, as IOPS on a shared 2-core
# machine swing by more than tracking costs, the user-space instructions per
# write (callgrind, runs of N and 2N requests so that start-up and the
# store at close cancel out; UQCOW_BITMAP_COUNT=N, default 20000;
# UQCOW_BITMAP_CALLGRIND=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${UQCOW_BITMAP_REPEAT:-5}
RUNTIME=${UQCOW_BITMAP_RUNTIME:-3}
COUNT=${UQCOW_BITMAP_COUNT:-20000}
CALLGRIND=${UQCOW_BITMAP_CALLGRIND:-1}

work=$(mktemp -d /dev/shm/uqcow-bitmap.XXXXXX)
trap 'rm -rf "$work"' EXIT

bazel build -c opt //tools:uqcow >&2
uqcow="$(bazel info -c opt bazel-bin 2>/dev/null)/tools/uqcow"

make_image() {  # make_image VARIANT WORKLOAD -> path
  local variant=$1 workload=$2 path="$work/$1-$2.qcow2"
  rm -f "$path"
  if [[ $workload == inplace ]]; then
    qemu-img create -q -f qcow2 -o preallocation=falloc "$path" 1G
  else
    qemu-img create -q -f qcow2 "$path" 2G
  fi
  [[ $variant == plain ]] || qemu-img bitmap --add "$path" tracked
  echo "$path"
}
inplace_plain=$(make_image plain inplace)
inplace_bitmap=$(make_image bitmap inplace)

results="$work/results.tsv"
: >"$results"
run() {  # run VARIANT WORKLOAD IMAGE
  local variant=$1 workload=$2 image=$3
  "$uqcow" bench --bs 4k --depth 32 --runtime "$RUNTIME" --output json --rw randwrite "$image" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], j["iops"], j["cpu_ns_per_io"], sep="\t")' \
      "$variant" "$workload" >>"$results"
  tail -n 1 "$results" >&2
}
for ((i = 0; i < REPEAT; i++)); do
  for variant in plain bitmap; do
    image=inplace_$variant
    run "$variant" inplace "${!image}"
    run "$variant" alloc "$(make_image "$variant" alloc)"
  done
done
# The bitmap still opens, and marks what the runs wrote.
qemu-img info "$inplace_bitmap" | grep -q 'name: tracked'

echo "uqcow $(git log -1 --format=%h)$(git diff --quiet || echo +), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line]
def med(variant, workload, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == variant and r[1] == workload)
print(f"{'workload':<9} {'variant':<8} {'IOPS':>10} {'vs plain':>9} {'ns/IO':>8}")
for w in ("inplace", "alloc"):
    base = med("plain", w, 2)
    for v in ("plain", "bitmap"):
        iops = med(v, w, 2)
        print(f"{w:<9} {v:<8} {iops:>10.0f} {iops / base:>9.3f} {med(v, w, 3):>8.0f}")
PY

[[ $CALLGRIND == 1 ]] || exit 0
instructions() {  # instructions COUNT IMAGE -> user-space instructions of the whole run
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$uqcow" bench --bs 4k --depth 32 \
    --count "$1" --rw randwrite "$2" >/dev/null 2>&1
  awk '/^(summary|totals):/ {print $2; exit}' "$work/cg.out"
}
echo
echo "user-space instructions per 4 KiB write (callgrind, ($COUNT x 2 run) - ($COUNT run)) / $COUNT"
printf '%-9s %-8s %10s %10s\n' workload variant instr/IO "vs plain"
for w in inplace alloc; do
  base=""
  for variant in plain bitmap; do
    per_run=()
    for count in "$COUNT" $((COUNT * 2)); do
      if [[ $w == inplace ]]; then
        image=inplace_$variant
        per_run+=("$(instructions "$count" "${!image}")")
      else
        per_run+=("$(instructions "$count" "$(make_image "$variant" alloc)")")
      fi
    done
    per_io=$(( (per_run[1] - per_run[0]) / COUNT ))
    [[ -n $base ]] || base=$per_io
    printf '%-9s %-8s %10d %+10d\n' "$w" "$variant" "$per_io" $((per_io - base))
  done
done
