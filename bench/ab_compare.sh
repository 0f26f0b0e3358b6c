#!/usr/bin/env bash
# A/B comparison of two uqcow builds on the same machine, images and
# workloads, runs alternating between the builds: the check that a change
# does not slow the hot paths (issue "overlapping requests": 4 KiB randread
# and randwrite IOPS at least 0.97x the previous build, in the same run).
#
#   bench/ab_compare.sh [BASE_REV]          # default BASE_REV: HEAD~1
#
# Builds //tools:uqcow -c opt at BASE_REV (in a temporary git worktree with
# its own Bazel output base) and from the working tree, then measures
#   randread   4 KiB QD32 on a fully allocated 1 GiB image (cached L2)
#   randwrite  4 KiB QD32 on the same image (in place: COPIED clusters)
#   alloc      4 KiB QD32 random allocating writes on a fresh 2 GiB image
# in /dev/shm, UQCOW_AB_REPEAT times each (default 5, alternating A and B),
# UQCOW_AB_RUNTIME seconds per run (default 3), and prints the medians and
# the ratio B/A. CPU ns per I/O is printed too: less noisy than IOPS on a
# shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_REV=${1:-HEAD~1}
REPEAT=${UQCOW_AB_REPEAT:-5}
RUNTIME=${UQCOW_AB_RUNTIME:-3}

work=$(mktemp -d /dev/shm/uqcow-ab.XXXXXX)
tree=$(mktemp -d /tmp/uqcow-ab-tree.XXXXXX)
cleanup() {
  set +e
  rm -rf "$work"
  git worktree remove --force "$tree" >/dev/null 2>&1
  rm -rf "$tree"
}
trap cleanup EXIT

if [[ -n ${UQCOW_AB_A:-} ]]; then
  cp "$UQCOW_AB_A" "$work/uqcow-a"
else
  base_sha=$(git rev-parse "$BASE_REV")
  git worktree add --detach -f "$tree" "$base_sha" >/dev/null 2>&1
  echo "ab_compare: building A = $(git log -1 --format='%h %s' "$base_sha")" >&2
  (cd "$tree" && bazel build -c opt //tools:uqcow >&2)
  cp "$(cd "$tree" && bazel info -c opt bazel-bin 2>/dev/null)/tools/uqcow" "$work/uqcow-a"
  (cd "$tree" && bazel shutdown >/dev/null 2>&1 || true)
fi
if [[ -n ${UQCOW_AB_B:-} ]]; then
  cp "$UQCOW_AB_B" "$work/uqcow-b"
else
  echo "ab_compare: building B = working tree ($(git log -1 --format='%h' HEAD)$(git diff --quiet || echo ', modified'))" >&2
  bazel build -c opt //tools:uqcow >&2
  cp "$(bazel info -c opt bazel-bin 2>/dev/null)/tools/uqcow" "$work/uqcow-b"
fi

qemu-img create -q -f qcow2 -o preallocation=falloc "$work/full.qcow2" 1G
results="$work/results.tsv"
: >"$results"
run() {  # run BUILD WORKLOAD IMAGE ARGS...
  local build=$1 workload=$2 image=$3; shift 3
  "$work/uqcow-$build" bench --bs 4k --depth 32 --runtime "$RUNTIME" --output json "$@" "$image" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1], sys.argv[2], j["iops"], j["cpu_ns_per_io"], sep="\t")' \
      "$build" "$workload" >>"$results"
  tail -n 1 "$results" >&2
}
for ((i = 0; i < REPEAT; i++)); do
  for build in a b; do
    run "$build" randread "$work/full.qcow2" --rw randread
    run "$build" randwrite "$work/full.qcow2" --rw randwrite
    rm -f "$work/alloc.qcow2"
    qemu-img create -q -f qcow2 "$work/alloc.qcow2" 2G
    run "$build" alloc "$work/alloc.qcow2" --rw randwrite
  done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line]
def med(build, workload, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == build and r[1] == workload)
print(f"{'workload':<10} {'A IOPS':>10} {'B IOPS':>10} {'B/A':>6}   {'A ns/IO':>8} {'B ns/IO':>8}")
for w in ("randread", "randwrite", "alloc"):
    a, b = med("a", w, 2), med("b", w, 2)
    print(f"{w:<10} {a:>10.0f} {b:>10.0f} {b / a:>6.3f}   {med('a', w, 3):>8.0f} {med('b', w, 3):>8.0f}")
PY
