#!/usr/bin/env bash
# NBD server comparison, run by hand: fio's nbd engine against `uqcow serve`
# and against `qemu-nbd -t --aio=io_uring`, serving copies of the same
# fully allocated qcow2 image in /dev/shm over a unix socket, 4 KiB random
# reads and writes at QD32, the servers alternating, in one run.
#
#   bench/nbd_compare.sh                       # about 2 minutes
#   UQCOW_NBD_RUNTIME=5 UQCOW_NBD_REPEAT=5 bench/nbd_compare.sh
#
# Environment:
#   UQCOW              the uqcow binary (default: build //tools:uqcow -c opt)
#   UQCOW_NBD_RUNTIME  seconds per fio run (default 10)
#   UQCOW_NBD_REPEAT   runs per server and workload; the median counts (default 3)
#   UQCOW_NBD_SIZE     image size (default 1G)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${UQCOW_NBD_RUNTIME:-10}
REPEAT=${UQCOW_NBD_REPEAT:-3}
SIZE=${UQCOW_NBD_SIZE:-1G}

for tool in qemu-img qemu-io qemu-nbd fio python3; do
  command -v "$tool" >/dev/null || { echo "nbd_compare.sh: $tool is missing (tools/bootstrap.sh installs it)" >&2; exit 1; }
done
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
  echo "nbd_compare.sh: this fio has no nbd engine" >&2
  exit 1
fi
if [[ -z ${UQCOW:-} ]]; then
  bazel ${BAZEL_STARTUP:-} build -c opt //tools:uqcow >&2
  UQCOW="$(bazel ${BAZEL_STARTUP:-} info -c opt bazel-bin 2>/dev/null)/tools/uqcow"
fi

dir=$(mktemp -d /dev/shm/uqcow-nbdcmp.XXXXXX)
server=""
cleanup() {
  set +e
  if [[ -n $server ]]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

base="$dir/base.qcow2"
qemu-img create -q -f qcow2 "$base" "$SIZE"
# Fully allocated by qemu-io, so that random writes overwrite in place and
# random reads read data, for both servers alike.
qemu-io -c "write -P 0x5a 0 $SIZE" "$base" >/dev/null

sock="$dir/nbd.sock"
start_server() {  # $1 = uqcow | qemu-nbd, $2 = image
  rm -f "$sock"
  if [[ $1 == uqcow ]]; then
    "$UQCOW" serve --socket "$sock" "$2" &
  else
    qemu-nbd -t --aio=io_uring --cache=writeback -f qcow2 -k "$sock" "$2" &
  fi
  server=$!
  for _ in $(seq 200); do
    [[ -S $sock ]] && return 0
    sleep 0.05
  done
  echo "nbd_compare.sh: $1 did not open $sock" >&2
  exit 1
}
stop_server() {
  kill -TERM "$server"
  wait "$server" || true
  server=""
}

# One fio run; prints the IOPS (fio's nbd engine prints a line before the JSON).
run_fio() {  # $1 = randread | randwrite
  fio --name=nbd --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$1" --bs=4k --iodepth=32 \
    --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --output-format=json |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))'
}

declare -A iops
for ((i = 0; i < REPEAT; i++)); do
  for rw in randread randwrite; do
    for srv in uqcow qemu-nbd; do
      img="$dir/$srv.qcow2"
      [[ -f $img ]] || cp --sparse=always "$base" "$img"
      start_server "$srv" "$img"
      v=$(run_fio "$rw")
      stop_server
      iops[$srv,$rw]+="$v "
      printf '%-9s %-10s run %d: %8d IOPS\n' "$srv" "$rw" "$((i + 1))" "$v"
    done
  done
done
for srv in uqcow qemu-nbd; do
  qemu-img check -q "$dir/$srv.qcow2" || { echo "nbd_compare.sh: qemu-img check failed after $srv" >&2; exit 1; }
done

median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
printf 'fio --ioengine=nbd, 4 KiB, QD32, %ss runs, %s image in /dev/shm, median of %d\n' "$RUNTIME" "$SIZE" "$REPEAT"
printf '%-10s %12s %12s %8s\n' workload uqcow qemu-nbd ratio
for rw in randread randwrite; do
  u=$(median "${iops[uqcow,$rw]}")
  q=$(median "${iops[qemu-nbd,$rw]}")
  awk -v rw="$rw" -v u="$u" -v q="$q" 'BEGIN {printf "%-10s %12d %12d %7.2fx\n", rw, u, q, u / q}'
done
echo "(target: uqcow >= 1.5x qemu-nbd)"
