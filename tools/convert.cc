// uqcow convert: writes the guest-visible content of an image (or of one of
// its internal snapshots) to a raw file, like `qemu-img convert -O raw`.
//
// The output is sparse: it starts as one hole of the virtual size, ranges
// that the backing chain reports as zeros are skipped without being read, and
// of the data read only the 4 KiB blocks that are not all zeros are written.
// Several workers copy 2 MiB chunks concurrently to keep requests in flight.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine/task_group.h"
#include "qcow2/open.h"
#include "tools/chain_status.h"
#include "tools/cli.h"
#include "uring/aligned_buffer.h"
#include "uring/raw_file.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow convert [-f FMT] [-O raw] [-l SNAPSHOT] [-p] SRC DST";
constexpr char kDescription[] =
    "Writes the guest-visible content of SRC (through its backing chain) to DST as a sparse\n"
    "raw file of the virtual size. DST is created or truncated. -l reads an internal snapshot\n"
    "of SRC instead of its current state. Writing qcow2 (-O qcow2) is not available yet.";

constexpr uint64_t kChunkBytes = 2ull << 20;
constexpr int kWorkers = 8;
// The granularity at which read data is checked for zeros (qemu-img -S 4k).
constexpr uint64_t kSparseBlock = 4096;

bool all_zero(const std::byte* p, size_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

struct ConvertJob {
  ConvertJob(Disk& s, RawFile& d, bool progress) : src(s), dst(d), status(s), progress(progress) {}
  Disk& src;
  RawFile& dst;
  ChainStatusReader status;
  uint64_t next = 0;  // start of the next chunk to hand out
  uint64_t done = 0;  // bytes copied
  Status error;       // the first failure; workers stop taking chunks
  Progress progress;
};

// Writes the 4 KiB blocks (aligned to guest offsets) of `data` that are not
// all zeros, merging neighbours into one request. The output already reads
// zeros everywhere else.
Task<Status> write_nonzero(RawFile& dst, uint64_t offset, std::span<const std::byte> data) {
  size_t run_start = 0;
  bool in_run = false;
  for (size_t pos = 0; pos < data.size();) {
    const uint64_t boundary = (offset + pos) / kSparseBlock * kSparseBlock + kSparseBlock;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(boundary - offset, data.size()) - pos);
    const bool zero = all_zero(data.data() + pos, n);
    if (!zero && !in_run) run_start = pos;
    if (zero && in_run) UQ_CO_TRY(co_await dst.co_write(offset + run_start, data.subspan(run_start, pos - run_start)));
    in_run = !zero;
    pos += n;
  }
  if (in_run) UQ_CO_TRY(co_await dst.co_write(offset + run_start, data.subspan(run_start)));
  co_return Status();
}

// Reads guest range [run_start, run_end) into its place in `buf` (which
// holds the chunk starting at `chunk_start`) and writes what is not zeros.
Task<Status> copy_run(ConvertJob& job, uint64_t chunk_start, std::byte* buf, uint64_t run_start,
                      uint64_t run_end) {
  if (run_end == run_start) co_return Status();
  std::span<std::byte> data(buf + (run_start - chunk_start), run_end - run_start);
  UQ_CO_TRY(co_await job.src.read(run_start, data));
  co_return co_await write_nonzero(job.dst, run_start, data);
}

// Copies guest range [start, start + len) (len <= kChunkBytes) through `buf`:
// ranges that read as zeros are skipped, neighbouring data ranges are read
// with one request.
Task<Status> convert_chunk(ConvertJob& job, uint64_t start, uint64_t len, std::byte* buf) {
  const uint64_t end = start + len;
  uint64_t run_start = start, run_end = start;  // data not copied yet
  for (uint64_t offset = start; offset < end;) {
    auto st = co_await job.status.status(offset, end - offset);
    if (!st.ok()) co_return std::move(st).error().with_context("block status");
    offset += st->length;
    if (st->zero) {
      UQ_CO_TRY(co_await copy_run(job, start, buf, run_start, run_end));
      run_start = offset;
    }
    run_end = offset;
  }
  co_return co_await copy_run(job, start, buf, run_start, run_end);
}

// Takes chunks in offset order until none are left or one failed.
Task<void> convert_worker(ConvertJob& job) {
  AlignedBuffer buf(kChunkBytes);
  const uint64_t size = job.src.size();
  while (job.error.ok() && job.next < size) {
    const uint64_t start = job.next;
    const uint64_t len = std::min(kChunkBytes, size - start);
    job.next += len;
    Status s = co_await convert_chunk(job, start, len, buf.data());
    if (!s.ok()) {
      if (job.error.ok()) job.error = std::move(s);
      co_return;
    }
    job.done += len;
    job.progress.update(job.done, size);
  }
}

Task<Status> copy_to(Disk& src, const std::string& dst_path, bool progress) {
  auto dst = RawFile::open(dst_path, RawFileOptions{.read_only = false, .create = true});
  if (!dst.ok()) co_return std::move(dst).error();
  // Truncating to 0 first drops whatever DST held: every byte not written
  // below must read as zero.
  UQ_CO_TRY((*dst)->truncate(0));
  UQ_CO_TRY((*dst)->truncate(src.size()));
  ConvertJob job(src, **dst, progress);
  TaskGroup workers;
  for (int i = 0; i < kWorkers; ++i) workers.spawn(convert_worker(job));
  co_await workers.join();
  if (!job.error.ok()) co_return job.error;
  job.progress.finish();
  co_return Status();
}

Task<int> convert_task(std::string src_path, std::string dst_path, OpenOptions options, bool progress) {
  auto src = co_await open_disk(src_path, options);
  if (!src.ok()) co_return fail(src.error());
  Status copied = co_await copy_to(**src, dst_path, progress);
  Status closed = co_await (*src)->close();
  if (!copied.ok()) co_return fail(copied);
  if (!closed.ok()) co_return fail(closed);
  co_return 0;
}

// -l takes qemu-img's forms: "snapshot.id=ID", "snapshot.name=NAME", or an
// id or name.
std::string snapshot_key(const std::string& arg) {
  for (const char* prefix : {"snapshot.id=", "snapshot.name="}) {
    if (arg.rfind(prefix, 0) == 0) return arg.substr(std::strlen(prefix));
  }
  return arg;
}

}  // namespace

int cmd_convert(int argc, char** argv) {
  Args args;
  args.option("-O,--target-format", "output format: raw (the default; qcow2 is not available yet)", "FMT")
      .option("-l,--snapshot", "convert an internal snapshot (ID, NAME, snapshot.id=ID or snapshot.name=NAME)",
              "SNAPSHOT")
      .flag("-p,--progress", "show progress on stderr (when it is a terminal)");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  const std::string out_format = args.get_or("-O", "raw");
  if (out_format == "qcow2") {
    return fail("convert: -O qcow2 is not supported yet (writing qcow2 images lands with the write "
                "path); use -O raw");
  }
  if (out_format != "raw") return fail("convert: output format '" + out_format + "' is not supported (use -O raw)");
  if (args.positional().size() != 2) return fail("convert: expecting a source and a destination file name (see --help)");
  auto options = open_options(args, /*read_only=*/true);
  if (!options.ok()) return fail(options.error());
  if (auto snapshot = args.get("-l")) options->snapshot = snapshot_key(*snapshot);
  return run(convert_task(args.positional()[0], args.positional()[1], std::move(*options), args.has("-p")));
}

}  // namespace uqcow::cli
