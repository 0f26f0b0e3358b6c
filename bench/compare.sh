#!/usr/bin/env bash
# The comparison asked for in issue "uqcow bench", run by hand: uqcow against
# the raw file, fio and qemu-img bench, on the same machine and images, in one
# go. Prints every run as it finishes, then the ratios against the targets.
#
#   bench/compare.sh                       # about 2 to 3 minutes
#   UQCOW_CMP_RUNTIME=2 bench/compare.sh   # shorter runs
#
# Environment:
#   UQCOW               the uqcow binary (default: build //tools:uqcow -c opt,
#                       with bazel ${BAZEL_STARTUP}, as quickstart.sh does)
#   UQCOW_CMP_RUNTIME   seconds per time-based run (default 5)
#   UQCOW_CMP_COUNT     requests per counted strided read/in-place run
#                       (default 200000 per second of runtime)
#   UQCOW_CMP_REPEAT    runs per measurement, alternating the tools; the
#                       ratios use the median run (default 1; on a shared
#                       machine use 5 with UQCOW_CMP_RUNTIME=2)
#   UQCOW_CMP_ALLOC_SIZE  virtual size of the fresh images for allocating
#                       writes (default 2G; qemu-img fills most of it on tmpfs)
#   UQCOW_CMP_INSN      0 skips the instructions-per-I/O section
#   UQCOW_CMP_DISK_DIR  directory on a disk-backed filesystem (default /var/tmp)
#
# Every figure depends on the machine and on what else runs on it: compare
# figures from the same run only.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${UQCOW_CMP_RUNTIME:-5}
COUNT=${UQCOW_CMP_COUNT:-$(python3 -c "print(int(200000 * $RUNTIME))")}
REPEAT=${UQCOW_CMP_REPEAT:-1}
ALLOC_SIZE=${UQCOW_CMP_ALLOC_SIZE:-2G}
DISK_DIR=${UQCOW_CMP_DISK_DIR:-/var/tmp}
DEPTH=32
STEP_KIB=68  # qemu-img bench -S 68k: each 4 KiB request lands in a new 64 KiB cluster

for tool in qemu-img fio python3; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is missing (tools/bootstrap.sh installs it)" >&2; exit 1; }
done
if [[ -z ${UQCOW:-} ]]; then
  bazel ${BAZEL_STARTUP:-} build -c opt //tools:uqcow >&2
  UQCOW="$(bazel ${BAZEL_STARTUP:-} info -c opt bazel-bin 2>/dev/null)/tools/uqcow"
fi

shm=$(mktemp -d /dev/shm/uqcow-compare.XXXXXX)
disk=""
child=""  # the measurement running now, stopped at once on INT or TERM
cleanup() {
  set +e  # errexit applies in traps too: a killed child must not stop the clean-up
  if [[ -n $child ]]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
  rm -rf "$shm"
  [[ -z $disk ]] || rm -rf "$disk"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

results="$shm/results.tsv"
helper="$shm/compare.py"
: >"$results"

# The helper runs one measurement, records it in $results and prints its row;
# `report` prints the ratios against the targets. CPU per I/O is that of the
# whole process (all threads, io_uring's io-wq workers included, and the
# tool's start-up), the same yardstick for uqcow, fio and qemu-img.
cat >"$helper" <<'PY'
import json, os, re, resource, signal, subprocess, sys

# subprocess.run kills the tool when an exception (this exit) interrupts it.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
results = os.environ["RESULTS"]
ROW = "  {:<62} {:>10} {:>10}  {}"

def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

def record(key, label, iops, cpu_ns, note):
    with open(results, "a") as f:
        f.write(f"{key}\t{iops}\t{cpu_ns}\t{label}\n")
    print(ROW.format(label, f"{iops:,.0f}", f"{cpu_ns:,.0f}", note), flush=True)

def run(kind, key, label, cmd):
    cpu0 = child_cpu()
    p = subprocess.run(cmd, capture_output=True, text=True)
    cpu = child_cpu() - cpu0
    if p.returncode != 0:
        print(ROW.format(label, "FAILED", "", (p.stderr or p.stdout).strip()[:200]), flush=True)
        return
    note = ""
    if kind == "uqcow":
        j = json.loads(p.stdout)
        ios, iops = j["ios"], j["iops"]
        note = f"reactor thread {j['cpu_ns_per_io']} ns/IO"
        if j["format"] == "qcow2":
            l2 = j["l2_cache"]
            note += f"; L2 {l2['bytes'] // 1024} KiB, {l2['misses']} misses"
    elif kind == "qemu":
        ios = int(re.search(r"Sending (\d+) ", p.stdout).group(1))
        secs = float(re.search(r"Run completed in ([0-9.]+) seconds", p.stdout).group(1))
        iops = ios / secs
        note = f"{ios} requests in {secs:.3f} s"
    elif kind == "fio":
        j = json.loads(p.stdout)["jobs"][0]
        ios = j["read"]["total_ios"] + j["write"]["total_ios"]
        iops = j["read"]["iops"] + j["write"]["iops"]
    record(key, label, iops, cpu * 1e9 / ios if ios else 0, note)

def insn(key, label, n, a, b):
    # Two runs of n and 2n requests: the difference leaves out start-up.
    per_io = (int(b) - int(a)) / int(n)
    with open(results, "a") as f:
        f.write(f"{key}\t{per_io}\t0\t{label}\n")
    print("  {:<62} {:>10}".format(label, f"{per_io:,.0f}"), flush=True)

def median_runs():
    # The run with the median IOPS of each measurement (the lower middle
    # one for an even count), with its CPU figure.
    runs = {}
    for line in open(results):
        key, iops, cpu, label = line.rstrip("\n").split("\t")
        runs.setdefault(key, []).append((float(iops), float(cpu), label))
    return {k: sorted(v)[(len(v) - 1) // 2] for k, v in runs.items()}

CHECKS = [
    # (what, numerator, denominator, target or None)
    ("1. qcow2 / raw, uqcow, 4K randread, tmpfs", "t1.qcow2", "t1.raw", 0.95),
    ("1. qcow2 (uqcow) / raw (fio io_uring), same", "t1.qcow2", "t1.fio", 0.90),
    ("2. uqcow / qemu-img bench, 4K read -S 68k, writeback", "t2.read.uq", "t2.read.qemu", 2.0),
    ("2. uqcow / qemu-img bench, 4K read -S 68k, -t none", "t2.readdirect.uq", "t2.readdirect.qemu", 2.0),
    ("2. uqcow / qemu-img bench, 4K alloc write -S 68k", "t2.write.uq", "t2.write.qemu", 2.0),
    ("3. uqcow / qemu-img bench, L2 cache 1/8, 4K read -S 68k", "t3.uq", "t3.qemu", 1.0),
    ("4. qcow2 / raw, uqcow -t none, ext4, 4K randread", "t4.qcow2", "t4.raw", 0.97),
    ("4. qcow2 (uqcow) / raw (fio direct=1), same", "t4.qcow2", "t4.fio", None),
    ("5. uqcow / qemu-img bench, 4K alloc write -S 64k", "t5.alloc.uq", "t5.alloc.qemu", None),
    ("5. uqcow / qemu-img bench, 4K in-place write -S 68k", "t5.inplace.uq", "t5.inplace.qemu", None),
    ("5. uqcow / qemu-img bench, 64K sequential alloc write", "t5.seq64.uq", "t5.seq64.qemu", None),
]

def report():
    rows = median_runs()
    print("  {:<56} {:>6} {:>7}  {:<15} {:>9}".format("", "IOPS", "", "", "CPU/IO"))
    print("  {:<56} {:>6} {:>7}  {:<15} {:>9}".format("left / right", "ratio", "target", "verdict", "ratio"))
    for what, a, b, target in CHECKS:
        if a not in rows or b not in rows or rows[b][0] == 0:
            continue
        ratio = rows[a][0] / rows[b][0]
        cpu = f"{rows[a][1] / rows[b][1]:.2f}" if rows[b][1] else "-"
        if target is None:
            verdict, tgt = "(no target)", "-"
        elif ratio >= target:
            verdict, tgt = "met", f">={target:g}"
        else:
            verdict, tgt = f"MISSED by {(1 - ratio / target) * 100:.0f}%", f">={target:g}"
        print("  {:<56} {:>6.2f} {:>7}  {:<15} {:>9}".format(what, ratio, tgt, verdict, cpu))
    if "insn.t2.uq" in rows and "insn.t2.qemu" in rows:
        print("  instructions per I/O, strided reads, qemu-img / uqcow: {:.2f}".format(
            rows["insn.t2.qemu"][0] / rows["insn.t2.uq"][0]))

{"run": lambda: run(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]),
 "insn": lambda: insn(*sys.argv[2:7]),
 "report": report}[sys.argv[1]]()
PY
export RESULTS="$results"
# In the background and waited for, so that a trap runs without waiting for
# the end of the measurement.
measure() {
  python3 "$helper" run "$@" &
  child=$!
  wait "$child" || true
  child=""
}

# A fresh, empty qcow2 image made by qemu-img, the same for both tools.
fresh() { rm -f "$1"; qemu-img create -q -f qcow2 -o cluster_size=64k "$1" "$2"; }
# Requests of a strided pattern that stay inside one pass of SIZE bytes, so
# that every write allocates a new cluster.
one_pass() { python3 -c "print(($1 - 4096) // ($2 * 1024) + 1)"; }
size_bytes() { python3 -c "s='$1'; print(int(s[:-1]) * {'K':1<<10,'M':1<<20,'G':1<<30}[s[-1]] if s[-1] in 'KMG' else int(s))"; }
UQB=("$UQCOW" bench --output json --depth "$DEPTH")
QIB=(qemu-img bench -d "$DEPTH" -i io_uring)
header() { echo; echo "== $*"; printf '  %-62s %10s %10s  %s\n' "run" "IOPS" "CPU ns/IO" "notes"; }

echo "uqcow bench comparison ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p')), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, Linux $(uname -r)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "uqcow $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (tree has local changes)'), $(qemu-img --version | head -1), $(fio --version)"
echo "uqcow binary: $UQCOW (built $(date -u -r "$UQCOW" '+%Y-%m-%d %H:%M UTC'))"
echo "runtime ${RUNTIME}s per timed run, count ${COUNT} per counted run, ${REPEAT} run(s) each, queue depth ${DEPTH}, 4 KiB requests unless stated"

echo "images: qcow2 made by uqcow create -o cluster_size=64k and filled with 1 MiB writes; raw = qemu-img"
echo "convert -O raw of it; fresh images for writes: qemu-img create -f qcow2 -o cluster_size=64k"
echo "CPU ns/IO: CPU time of the whole process (all threads, io_uring io-wq workers included) per request"
img="$shm/full.qcow2"
raw="$shm/full.raw"
"$UQCOW" create -q -f qcow2 -o cluster_size=64k "$img" 1G
"$UQCOW" bench --rw write --bs 1M --depth 8 --count 1024 "$img" >/dev/null
qemu-img convert -O raw "$img" "$raw"
coverage=$("$UQCOW" bench --advise "$img" | sed -n 's/.*(\([0-9]*\) bytes of L2 cache memory.*/\1/p')

header "1. 4 KiB random reads, QD32, fully allocated 1 GiB qcow2 (64 KiB clusters) in /dev/shm; default L2 cache ($((coverage / 1024)) KiB covers it)"
for _ in $(seq "$REPEAT"); do
  measure uqcow t1.qcow2 "uqcow qcow2 --rw randread" "${UQB[@]}" --rw randread --runtime "$RUNTIME" "$img"
  measure uqcow t1.raw "uqcow raw (qemu-img convert -O raw)" "${UQB[@]}" --rw randread --runtime "$RUNTIME" "$raw"
  measure fio t1.fio "fio io_uring randread raw" fio --name=randread --filename="$raw" \
    --ioengine=io_uring --rw=randread --bs=4k --iodepth="$DEPTH" --time_based --runtime="$RUNTIME" \
    --output-format=json
done

# qemu-img bench 7.2 wraps its offset modulo the image size, uqcow back to
# the start of the range. They agree only when the size is a multiple of the
# step: grow the image by 52 KiB to 15421 x 68 KiB. The grown tail is never
# read (the last request of a pass is at 15420 x 68 KiB < 1 GiB).
passes=$(( (1 << 30) / (STEP_KIB * 1024) + 1 ))
qemu-img resize -q "$img" $((passes * STEP_KIB * 1024))
header "2. strided 4 KiB requests, -S ${STEP_KIB}k from offset 0, QD32: uqcow --rw read|write --step ${STEP_KIB}k vs qemu-img bench (image grown to ${passes} x ${STEP_KIB} KiB so both wrap alike)"
for _ in $(seq "$REPEAT"); do
  measure uqcow t2.read.uq "uqcow --rw read --step ${STEP_KIB}k --count $COUNT (writeback)" \
    "${UQB[@]}" --rw read --step "${STEP_KIB}k" --count "$COUNT" "$img"
  measure qemu t2.read.qemu "qemu-img bench -t writeback -c $COUNT -s 4k -S ${STEP_KIB}k" \
    "${QIB[@]}" -f qcow2 -t writeback -c "$COUNT" -s 4k -S "${STEP_KIB}k" "$img"
done
# tmpfs has taken O_DIRECT since Linux 6.6.
if python3 -c "import os, sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT))" "$img" 2>/dev/null; then
  for _ in $(seq "$REPEAT"); do
    measure uqcow t2.readdirect.uq "uqcow -t none, same reads (tmpfs takes O_DIRECT)" \
      "${UQB[@]}" -t none --rw read --step "${STEP_KIB}k" --count "$COUNT" "$img"
    measure qemu t2.readdirect.qemu "qemu-img bench -t none, same reads" \
      "${QIB[@]}" -f qcow2 -t none -c "$COUNT" -s 4k -S "${STEP_KIB}k" "$img"
  done
else
  echo "  (skipped -t none: O_DIRECT is not supported on /dev/shm with this kernel)"
fi
alloc_bytes=$(size_bytes "$ALLOC_SIZE")
alloc_n=$(one_pass "$alloc_bytes" "$STEP_KIB")
w="$shm/alloc.qcow2"
for _ in $(seq "$REPEAT"); do
  fresh "$w" "$ALLOC_SIZE"
  measure uqcow t2.write.uq "uqcow --rw write --step ${STEP_KIB}k --count $alloc_n, fresh $ALLOC_SIZE" \
    "${UQB[@]}" --rw write --step "${STEP_KIB}k" --count "$alloc_n" "$w"
  qemu-img check -q "$w" || echo "  qemu-img check FAILED on the image uqcow wrote"
  used_uqcow=$(du -m "$w" | cut -f1)
  fresh "$w" "$ALLOC_SIZE"
  measure qemu t2.write.qemu "qemu-img bench -w -c $alloc_n -S ${STEP_KIB}k, fresh $ALLOC_SIZE" \
    "${QIB[@]}" -f qcow2 -t writeback -w -c "$alloc_n" -s 4k -S "${STEP_KIB}k" "$w"
  used_qemu=$(du -m "$w" | cut -f1)
  rm -f "$w"
done
echo "  (one pass: every write allocates a new cluster whose other 60 KiB must read as zeros; space used:"
echo "  uqcow ${used_uqcow} MiB, it leaves a hole past the end of the file; qemu-img ${used_qemu} MiB, it writes"
echo "  the zeros when the file system has no FALLOC_FL_ZERO_RANGE, as tmpfs)"

eighth=$((coverage / 8))  # of the 1 GiB before it grew: the tail cluster is never read
header "3. L2 cache 1/8 of full coverage: l2-cache-size=$((eighth / 1024))k, 4 KiB slices"
echo "  qemu-img bench has no random pattern: the comparison uses the strided reads of 2 for both tools;"
echo "  uqcow's random reads at the same cache size are listed for reference"
qemu_opts="driver=qcow2,file.filename=$img,l2-cache-size=$eighth,l2-cache-entry-size=4096"
for _ in $(seq "$REPEAT"); do
  measure uqcow t3.uq "uqcow --rw read --step ${STEP_KIB}k --count $COUNT, 1/8 cache" \
    "${UQB[@]}" --l2-cache-size "$eighth" --l2-cache-entry-size 4k --rw read --step "${STEP_KIB}k" --count "$COUNT" "$img"
  measure qemu t3.qemu "qemu-img bench --image-opts l2-cache-size=$((eighth / 1024))k,4k slices, same" \
    "${QIB[@]}" --image-opts -t writeback -c "$COUNT" -s 4k -S "${STEP_KIB}k" "$qemu_opts"
  measure uqcow t3.uq.rand "uqcow --rw randread (reference; QEMU cannot)" \
    "${UQB[@]}" --l2-cache-size "$eighth" --l2-cache-entry-size 4k --rw randread --runtime "$RUNTIME" "$img"
done

disk=$(mktemp -d "$DISK_DIR/uqcow-compare.XXXXXX")
header "4. O_DIRECT (-t none) on a disk-backed file: 1 GiB image in $DISK_DIR ($(df -T "$DISK_DIR" | awk 'NR == 2 {print $2 " on " $1}')), 4 KiB random reads QD32"
dimg="$disk/full.qcow2"
draw="$disk/full.raw"
"$UQCOW" create -q -f qcow2 -o cluster_size=64k "$dimg" 1G
"$UQCOW" bench -t none --rw write --bs 1M --depth 8 --count 1024 "$dimg" >/dev/null
qemu-img convert -t none -O raw "$dimg" "$draw"
sync
for _ in $(seq "$REPEAT"); do
  measure uqcow t4.qcow2 "uqcow -t none qcow2 --rw randread" "${UQB[@]}" -t none --rw randread --runtime "$RUNTIME" "$dimg"
  measure uqcow t4.raw "uqcow -t none raw" "${UQB[@]}" -t none --rw randread --runtime "$RUNTIME" "$draw"
  measure fio t4.fio "fio io_uring direct=1 randread raw (reference)" fio --name=randread \
    --filename="$draw" --direct=1 --ioengine=io_uring --rw=randread --bs=4k --iodepth="$DEPTH" \
    --time_based --runtime="$RUNTIME" --output-format=json
done
rm -rf "$disk"
disk=""

header "5. writes, QD32: uqcow random writes, and uqcow vs qemu-img bench -w on the same strided/sequential pattern"
alloc64_n=$(one_pass "$alloc_bytes" 64)
seq_n=$((alloc_bytes / 65536))
for _ in $(seq "$REPEAT"); do
  fresh "$w" "$ALLOC_SIZE"
  measure uqcow t5.alloc.rand.uq "uqcow --rw randwrite, empty $ALLOC_SIZE (allocating, then in place)" \
    "${UQB[@]}" --rw randwrite --runtime "$RUNTIME" "$w"
  fresh "$w" "$ALLOC_SIZE"
  measure uqcow t5.alloc.uq "uqcow --rw write --step 64k --count $alloc64_n, empty (all allocate)" \
    "${UQB[@]}" --rw write --step 64k --count "$alloc64_n" "$w"
  fresh "$w" "$ALLOC_SIZE"
  measure qemu t5.alloc.qemu "qemu-img bench -w -S 64k -c $alloc64_n, empty (all allocate)" \
    "${QIB[@]}" -f qcow2 -t writeback -w -c "$alloc64_n" -s 4k -S 64k "$w"
  rm -f "$w"
  measure uqcow t5.inplace.rand.uq "uqcow --rw randwrite, fully allocated (in place)" \
    "${UQB[@]}" --rw randwrite --runtime "$RUNTIME" "$img"
  measure uqcow t5.inplace.uq "uqcow --rw write --step ${STEP_KIB}k --count $COUNT, fully allocated" \
    "${UQB[@]}" --rw write --step "${STEP_KIB}k" --count "$COUNT" "$img"
  measure qemu t5.inplace.qemu "qemu-img bench -w -S ${STEP_KIB}k -c $COUNT, fully allocated" \
    "${QIB[@]}" -f qcow2 -t writeback -w -c "$COUNT" -s 4k -S "${STEP_KIB}k" "$img"
  fresh "$w" "$ALLOC_SIZE"
  measure uqcow t5.seq64.uq "uqcow --rw write --bs 64k --count $seq_n, empty (fills it)" \
    "${UQB[@]}" --rw write --bs 64k --count "$seq_n" "$w"
  fresh "$w" "$ALLOC_SIZE"
  measure qemu t5.seq64.qemu "qemu-img bench -w -s 64k -S 64k -c $seq_n, empty (fills it)" \
    "${QIB[@]}" -f qcow2 -t writeback -w -c "$seq_n" -s 64k -S 64k "$w"
  rm -f "$w"
done

if [[ ${UQCOW_CMP_INSN:-1} != 0 ]]; then
  # perf counts kernel and user instructions; callgrind (under a VM without a
  # PMU) counts user-space instructions only.
  if perf stat -x, -e instructions true 2>&1 >/dev/null | grep -q '^[0-9]'; then
    method=perf
    count_insn() { perf stat -x, -e instructions -- "$@" 2>&1 >/dev/null | awk -F, '$3 ~ /^instructions/ {print $1}' | tail -1; }
    what="instructions per I/O (perf stat -e instructions: user + kernel)"
  elif command -v valgrind >/dev/null; then
    method=callgrind
    count_insn() {
      valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 >/dev/null |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p' | tail -1
    }
    what="user-space instructions per I/O (callgrind Ir; perf stat -e instructions is not supported here; kernel not counted)"
  else
    method=""
  fi
  if [[ -n $method ]]; then
    echo
    echo "== $what, from two runs of N and 2N requests (the difference leaves out start-up)"
    insn_pair() {  # key label N fresh|same command-with-@N@-for-the-count
      local key=$1 label=$2 n=$3 image=$4 a b
      shift 4
      [[ $image != fresh ]] || fresh "$w" "$ALLOC_SIZE"
      a=$(count_insn "${@//@N@/$n}")
      [[ $image != fresh ]] || fresh "$w" "$ALLOC_SIZE"
      b=$(count_insn "${@//@N@/$((2 * n))}")
      if [[ -n $a && -n $b ]]; then
        python3 "$helper" insn "$key" "$label (N=$n)" "$n" "$a" "$b"
      else
        echo "  $label: not measured"
      fi
    }
    insn_pair insn.t1.qcow2 "uqcow qcow2 randread, L2 cached" 20000 same \
      "$UQCOW" bench --depth "$DEPTH" --rw randread --count @N@ "$img"
    insn_pair insn.t1.raw "uqcow raw randread" 20000 same \
      "$UQCOW" bench --depth "$DEPTH" --rw randread --count @N@ "$raw"
    insn_pair insn.t2.uq "uqcow qcow2 read --step ${STEP_KIB}k" 20000 same \
      "$UQCOW" bench --depth "$DEPTH" --rw read --step "${STEP_KIB}k" --count @N@ "$img"
    insn_pair insn.t2.qemu "qemu-img bench qcow2 -S ${STEP_KIB}k" 20000 same \
      qemu-img bench -d "$DEPTH" -i io_uring -f qcow2 -t writeback -c @N@ -s 4k -S "${STEP_KIB}k" "$img"
    # 2N requests within one pass of the fresh image, so that every write allocates.
    alloc_insn_n=$((alloc_n / 2 < 5000 ? alloc_n / 2 : 5000))
    insn_pair insn.t2w.uq "uqcow allocating write --step ${STEP_KIB}k" "$alloc_insn_n" fresh \
      "$UQCOW" bench --depth "$DEPTH" --rw write --step "${STEP_KIB}k" --count @N@ "$w"
    insn_pair insn.t2w.qemu "qemu-img bench -w allocating -S ${STEP_KIB}k" "$alloc_insn_n" fresh \
      qemu-img bench -d "$DEPTH" -i io_uring -f qcow2 -t writeback -w -c @N@ -s 4k -S "${STEP_KIB}k" "$w"
    rm -f "$w"
  fi
fi

echo
echo "== ratios (median of $REPEAT run(s); IOPS of the left over the right, process CPU per I/O likewise)"
python3 "$helper" report
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
