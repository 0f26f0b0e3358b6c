#!/usr/bin/env bash
# Builds the fuzz targets with clang (--config=fuzz: libFuzzer, ASan, UBSan)
# and runs each for SECONDS seconds, starting from the committed seed corpus
# plus the crash reproducers. New interesting inputs go to a scratch corpus
# (out/NAME/corpus), never into the committed one; crashes to out/NAME/.
# Prints each target's execution count and whether it found anything.
#
# usage: tests/fuzz/run.sh [SECONDS] [TARGET...]
#   SECONDS   per target (default 60)
#   TARGET    fuzz_header fuzz_open_read fuzz_check fuzz_write (default: all)
# Needs clang 14 and libclang-rt-14-dev (tools/bootstrap.sh installs them).
# Environment: OUTPUT_BASE (default ~/.cache/bazel-uqcow-fuzz, kept apart
# from the gcc build's), OUT (default /tmp/uqcow-fuzz).
set -euo pipefail

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_header fuzz_open_read fuzz_check fuzz_write)

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
output_base=${OUTPUT_BASE:-$HOME/.cache/bazel-uqcow-fuzz}
out=${OUT:-/tmp/uqcow-fuzz}
bazel=${BAZEL:-bazel}

cd "$root"
labels=()
for t in "${targets[@]}"; do labels+=("//tests/fuzz:$t"); done
"$bazel" --output_base="$output_base" build --config=fuzz "${labels[@]}"
bin=$("$bazel" --output_base="$output_base" info --config=fuzz bazel-bin 2>/dev/null)

# The targets write each input to a file (and fsync repairs): keep that in
# memory when /dev/shm is there.
scratch=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && scratch=/dev/shm
status=0
summary=()
for t in "${targets[@]}"; do
  dir="$out/$t"
  mkdir -p "$dir/corpus"
  log="$dir/fuzz.log"
  reproducers=()
  [ -d "$here/regressions/$t" ] && reproducers=("$here/regressions/$t")
  echo "== $t: ${seconds}s, log $log" >&2
  set +e
  (cd "$dir" && TMPDIR="$scratch" "$bin/tests/fuzz/$t" -max_total_time="$seconds" -rss_limit_mb=2048 \
      -timeout=10 -print_final_stats=1 -artifact_prefix="$dir/" \
      corpus "$here/corpus" "${reproducers[@]}") >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(find "$dir" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \
      -o -name 'leak-*' \) | wc -l)
  line="$t: ${runs:-?} executions in ${seconds}s, exit $rc, $crashes artifact(s) in $dir"
  summary+=("$line")
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then status=1; fi
done
printf '%s\n' "${summary[@]}"
exit $status
