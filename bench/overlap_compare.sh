#!/usr/bin/env bash
# The cost of the overlap check on the write path (issue 13): 4 KiB QD32
# random writes with --overlap-check none, constant, cached (QEMU's default)
# and all, runs alternating between the levels, on one build.
#
#   bench/overlap_compare.sh
#
#   inplace  in-place writes (COPIED clusters) over a 1 GiB qcow2 image that
#            has an internal snapshot whose tables are all distinct from the
#            active ones (made with preallocation=falloc, snapshot -c, then
#            every cluster rewritten), so `all` checks a non-empty inactive
#            L1 and L2 set on every write
#   alloc    random allocating writes on a fresh 2 GiB image (every write
#            checks its new cluster, every new L2 table its cluster)
#
# Images live in /dev/shm. UQCOW_OVERLAP_REPEAT runs of each (default 3),
# UQCOW_OVERLAP_RUNTIME seconds per run (default 3). Prints the median IOPS
# and CPU ns per I/O of each level and its IOPS ratio to `none`; then, as
# IOPS on a shared 2-core machine swing by more than the check costs, the
# user-space instructions per write of each level (callgrind, runs of N and
# 2N requests so that start-up cancels out; UQCOW_OVERLAP_COUNT=N, default
# 20000; UQCOW_OVERLAP_CALLGRIND=0 skips them). Between the two, QEMU's own
# cost of each level on the in-place image (qemu-img bench; its ratios to
# `none` are the comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${UQCOW_OVERLAP_REPEAT:-3}
RUNTIME=${UQCOW_OVERLAP_RUNTIME:-3}
COUNT=${UQCOW_OVERLAP_COUNT:-20000}
CALLGRIND=${UQCOW_OVERLAP_CALLGRIND:-1}

work=$(mktemp -d /dev/shm/uqcow-overlap.XXXXXX)
trap 'rm -rf "$work"' EXIT

bazel build -c opt //tools:uqcow >&2
uqcow="$(bazel info -c opt bazel-bin 2>/dev/null)/tools/uqcow"

qemu-img create -q -f qcow2 -o preallocation=falloc "$work/snap.qcow2" 1G
"$uqcow" snapshot -c s1 "$work/snap.qcow2"
"$uqcow" bench --rw write --bs 1M --depth 4 --count 1024 --overlap-check none "$work/snap.qcow2" >/dev/null

results="$work/results.tsv"
: >"$results"
run() {  # run LEVEL WORKLOAD IMAGE ARGS...
  local level=$1 workload=$2 image=$3; shift 3
  "$uqcow" bench --bs 4k --depth 32 --runtime "$RUNTIME" --output json --overlap-check "$level" "$@" "$image" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], j["iops"], j["cpu_ns_per_io"], sep="\t")' \
      "$level" "$workload" >>"$results"
  tail -n 1 "$results" >&2
}
levels=(none constant cached all)
for ((i = 0; i < REPEAT; i++)); do
  for level in "${levels[@]}"; do
    run "$level" inplace "$work/snap.qcow2" --rw randwrite
    rm -f "$work/alloc.qcow2"
    qemu-img create -q -f qcow2 "$work/alloc.qcow2" 2G
    run "$level" alloc "$work/alloc.qcow2" --rw randwrite
  done
done

echo "uqcow $(git log -1 --format=%h)$(git diff --quiet || echo +), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line]
def med(level, workload, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == level and r[1] == workload)
print(f"{'workload':<9} {'level':<9} {'IOPS':>10} {'vs none':>8} {'ns/IO':>8}")
for w in ("inplace", "alloc"):
    base = med("none", w, 2)
    for level in ("none", "constant", "cached", "all"):
        iops = med(level, w, 2)
        print(f"{w:<9} {level:<9} {iops:>10.0f} {iops / base:>8.3f} {med(level, w, 3):>8.0f}")
PY

# The peer: QEMU's own cost of each level on the same in-place image, with
# qemu-img bench (4 KiB sequential writes, QD32, io_uring, writeback), the
# median of REPEAT runs of QEMU_COUNT writes. Compare the ratios to `none`
# of the two tools, not their IOPS (different workload shapes).
QEMU_COUNT=${UQCOW_OVERLAP_QEMU_COUNT:-200000}
echo
echo "qemu-img bench -w -s 4k -d 32 -i io_uring -c $QEMU_COUNT on the in-place image, --image-opts overlap-check=LEVEL"
printf '%-9s %10s %8s\n' level IOPS "vs none"
qbase=""
for level in "${levels[@]}"; do
  secs=()
  for ((i = 0; i < REPEAT; i++)); do
    secs+=("$(qemu-img bench -w -s 4k -d 32 -c "$QEMU_COUNT" -i io_uring -t writeback \
      --image-opts "driver=qcow2,file.filename=$work/snap.qcow2,overlap-check=$level" |
      awk '/Run completed/ {print $4}')")
  done
  med=$(printf '%s\n' "${secs[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')
  iops=$(python3 -c "print(round($QEMU_COUNT / $med))")
  [[ -n $qbase ]] || qbase=$iops
  printf '%-9s %10d %8.3f\n' "$level" "$iops" "$(python3 -c "print($iops / $qbase)")"
done

[[ $CALLGRIND == 1 ]] || exit 0
instructions() {  # instructions LEVEL COUNT IMAGE ARGS... -> user-space instructions of the whole run
  local level=$1 count=$2 image=$3; shift 3
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$uqcow" bench --bs 4k --depth 32 \
    --count "$count" --overlap-check "$level" "$@" "$image" >/dev/null 2>&1
  awk '/^(summary|totals):/ {print $2; exit}' "$work/cg.out"
}
echo
echo "user-space instructions per 4 KiB write (callgrind, ($COUNT x 2 run) - ($COUNT run)) / $COUNT"
printf '%-9s %-9s %10s %12s\n' workload level instr/IO "vs none"
for w in inplace alloc; do
  base=""
  for level in "${levels[@]}"; do
    per_run=()
    for count in "$COUNT" $((COUNT * 2)); do
      if [[ $w == inplace ]]; then
        per_run+=("$(instructions "$level" "$count" "$work/snap.qcow2" --rw randwrite)")
      else
        rm -f "$work/alloc.qcow2"
        qemu-img create -q -f qcow2 "$work/alloc.qcow2" 2G
        per_run+=("$(instructions "$level" "$count" "$work/alloc.qcow2" --rw randwrite)")
      fi
    done
    per_io=$(( (per_run[1] - per_run[0]) / COUNT ))
    [[ -n $base ]] || base=$per_io
    printf '%-9s %-9s %10d %+12d\n' "$w" "$level" "$per_io" $((per_io - base))
  done
done
