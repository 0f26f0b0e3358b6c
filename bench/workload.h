// The benchmark engine behind `uqcow bench`: a workload description, the
// per-job runner (depth coroutines on one reactor) and its measurements.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bench/histogram.h"
#include "block/disk.h"
#include "engine/result.h"
#include "engine/task.h"

namespace uqcow::bench {

enum class Pattern { kRandRead, kRandWrite, kRandRW, kRead, kWrite };

Result<Pattern> parse_pattern(const std::string& name);
const char* pattern_name(Pattern p);

struct Workload {
  Pattern pattern = Pattern::kRandRead;
  unsigned rwmix_read = 50;     // percent reads for randrw
  uint64_t block_size = 4096;
  unsigned depth = 32;          // requests in flight
  double runtime_s = 0;         // stop after this long (if > 0) ...
  uint64_t count = 0;           // ... or after this many requests (if > 0)
  double warmup_s = 0;          // run, then discard the measurements
  uint64_t offset = 0;          // range [offset, offset + size)
  uint64_t size = 0;            // 0: to the end of the disk
  uint64_t step = 0;            // sequential stride (qemu-img bench -S); 0: block size
  uint64_t seed = 1;
  uint64_t flush_interval = 0;  // flush after every N writes (0: never)
  bool verify = false;          // stamp writes and check them afterwards
};

struct JobResult {
  uint64_t ios = 0;
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t bytes = 0;
  double seconds = 0;
  double cpu_seconds = 0;       // thread CPU time (user + system)
  LatencyHistogram latency;
  uint64_t verified_blocks = 0;
  uint64_t verify_errors = 0;
  std::string first_verify_error;
};

// Called about once a second with the I/Os completed so far in this job.
using ProgressFn = std::function<void(uint64_t ios, double elapsed_s)>;

// Runs the workload on `disk` from the calling thread's reactor. Errors of
// individual requests abort the run and are returned.
Task<Result<JobResult>> run_job(Disk& disk, const Workload& w, ProgressFn progress);

}  // namespace uqcow::bench
