#!/usr/bin/env bash
# Snapshot create / delete time, uqcow against qemu-img, run by hand:
# the same image (1 GiB allocated out of 2 GiB, 64 KiB clusters, in
# /dev/shm), copied once per tool and run, `snapshot -c` then `snapshot -d`,
# each timed as a whole process run (wall clock, median of the repeats).
# Every result image is checked with qemu-img check.
#
#   bench/snapshot_bench.sh                  # about a minute
#   UQCOW_SNAP_REPEAT=9 bench/snapshot_bench.sh
#
# Environment:
#   UQCOW              the uqcow binary (default: build //tools:uqcow -c opt)
#   UQCOW_SNAP_REPEAT  runs per tool, alternating the tools (default 5)
#   UQCOW_SNAP_ALLOC   bytes allocated in the image (default 1G)
#   UQCOW_SNAP_CLUSTER cluster size (default 64k)
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${UQCOW_SNAP_REPEAT:-5}
ALLOC=${UQCOW_SNAP_ALLOC:-1G}
CLUSTER=${UQCOW_SNAP_CLUSTER:-64k}

for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "snapshot_bench.sh: $tool is missing (tools/bootstrap.sh installs it)" >&2; exit 1; }
done
if [[ -z ${UQCOW:-} ]]; then
  bazel ${BAZEL_STARTUP:-} build -c opt //tools:uqcow >&2
  UQCOW="$(bazel ${BAZEL_STARTUP:-} info -c opt bazel-bin 2>/dev/null)/tools/uqcow"
fi

dir=$(mktemp -d /dev/shm/uqcow-snapbench.XXXXXX)
trap 'rm -rf "$dir"' EXIT

base="$dir/base.qcow2"
qemu-img create -q -f qcow2 -o cluster_size="$CLUSTER" "$base" 2G
# Allocated by qemu-io so that neither tool wrote the image it is timed on.
qemu-io -c "write -P 0x5a 0 $ALLOC" "$base" >/dev/null

# Prints the wall-clock seconds of one command run.
timed() {
  python3 - "$@" <<'EOF'
import subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
if r.returncode != 0:
    sys.exit(f"{' '.join(sys.argv[1:])} -> exit {r.returncode}")
print(f"{time.perf_counter() - t:.6f}")
EOF
}

declare -A times
for ((i = 0; i < REPEAT; i++)); do
  for tool in uqcow qemu-img; do
    img="$dir/$tool.qcow2"
    cp --sparse=always "$base" "$img"
    if [[ $tool == uqcow ]]; then cmd=("$UQCOW"); else cmd=(qemu-img); fi
    times[$tool,create]+="$(timed "${cmd[@]}" snapshot -c s1 "$img") "
    times[$tool,delete]+="$(timed "${cmd[@]}" snapshot -d s1 "$img") "
    qemu-img check -q "$img" || { echo "snapshot_bench.sh: qemu-img check failed on $tool's image" >&2; exit 1; }
  done
done

median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf 'snapshot of an image with %s allocated (%s clusters), %d runs each, median wall clock\n' "$ALLOC" "$CLUSTER" "$REPEAT"
printf '%-8s %12s %12s %8s\n' op uqcow qemu-img ratio
for op in create delete; do
  u=$(median "${times[uqcow,$op]}")
  q=$(median "${times[qemu-img,$op]}")
  awk -v op="$op" -v u="$u" -v q="$q" 'BEGIN {printf "%-8s %10.1fms %10.1fms %7.2fx\n", op, u * 1000, q * 1000, q / u}'
done
echo "(ratio = qemu-img time / uqcow time; above 1 means uqcow is faster)"
