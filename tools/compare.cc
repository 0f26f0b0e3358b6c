// uqcow compare: compares the guest-visible content of two images like
// `qemu-img compare`, with its messages and exit codes:
//   0 identical, 1 different, 2 an image cannot be opened (or bad usage),
//   3 a block status query failed, 4 a read failed.
//
// qemu-img walks the images in order; this walks them with several workers,
// each comparing 2 MiB chunks, and keeps the outcome (mismatch or error) with
// the lowest offset, which is what the sequential walk would have met first.
// Workers stop taking chunks past that offset. As in qemu-img, a mismatch is
// reported at the start of the first 512-byte sector that differs, ranges
// that both images report as zeros are not read, and with different sizes the
// tail of the larger image must read as zeros (unless -s, strict, which also
// requires equal sizes and equal block status flags).
#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <optional>
#include <string>

#include "block/chain_status.h"
#include "block/open.h"
#include "engine/task_group.h"
#include "engine/when_all.h"
#include "tools/cli.h"
#include "uring/aligned_buffer.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow compare [-U] [-f FMT] [-F FMT] [-s] [-p] [-q] FILE1 FILE2";
constexpr char kDescription[] =
    "Compares the guest-visible content of FILE1 and FILE2 (through their backing chains).\n"
    "Exit status: 0 identical, 1 different, 2 cannot open, 3 block status error, 4 read error.\n"
    "Images of different sizes compare equal if the extra part reads as zeros, unless -s.";

constexpr uint64_t kChunkBytes = 2ull << 20;
constexpr int kWorkers = 8;
constexpr uint64_t kSectorSize = 512;

enum ExitCode { kIdentical = 0, kDifferent = 1, kOpenFailed = 2, kStatusFailed = 3, kReadFailed = 4 };

// One image of the comparison.
struct Side {
  Side(Disk& d, std::string n) : disk(d), name(std::move(n)), status(d) {}
  Disk& disk;
  std::string name;
  ChainStatusReader status;
};

// What ends the comparison early: a mismatch or an error at `offset`.
struct Outcome {
  uint64_t offset = 0;
  int exit_code = kDifferent;
  std::string message;  // mismatches go to stdout, errors to stderr
};

struct CompareJob {
  Side& a;
  Side* b;  // null when checking the tail of the larger image alone
  bool strict = false;
  uint64_t next = 0;  // start of the next chunk to hand out
  uint64_t end = 0;
  std::optional<Outcome> first;  // the outcome with the lowest offset so far
  Progress& progress;
  uint64_t progress_base = 0;
  uint64_t done = 0;

  // Keeps the outcome the sequential walk would have met first.
  void record(Outcome o) {
    if (!first || o.offset < first->offset) first = std::move(o);
  }
  bool decided_before(uint64_t offset) const { return first && first->offset <= offset; }
};

// Start of the first 512-byte sector (counted from the start of the buffers)
// where they differ; `b` null means all zeros. qemu-img's compare_buffers()
// and find_nonzero().
std::optional<uint64_t> first_difference(const std::byte* a, const std::byte* b, uint64_t n) {
  if (b && std::memcmp(a, b, n) == 0) return std::nullopt;
  for (uint64_t i = 0; i < n; i += kSectorSize) {
    const uint64_t len = std::min(kSectorSize, n - i);
    const bool same = b ? std::memcmp(a + i, b + i, len) == 0
                        : a[i] == std::byte{0} && std::memcmp(a + i, a + i + 1, len - 1) == 0;
    if (!same) return i;
  }
  return std::nullopt;
}

// The flags of qemu's bdrv_block_status_above(), compared in strict mode.
int status_flags(const ChainStatus& st, uint64_t offset, uint64_t size) {
  enum { kData = 0x01, kZero = 0x02, kOffsetValid = 0x04, kAllocated = 0x10, kEof = 0x20 };
  int flags = 0;
  if (st.data) flags |= kData;
  if (st.zero) flags |= kZero;
  if (st.has_offset) flags |= kOffsetValid;
  if (st.allocated || st.past_backing_end) flags |= kAllocated;
  if (offset + st.length == size) flags |= kEof;
  return flags;
}

// Reads [offset, offset + n) of `side` into `buf`, or zeros if `zero`.
Task<bool> read_side(CompareJob& job, Side& side, uint64_t offset, std::span<std::byte> buf, bool zero) {
  if (zero) {
    std::memset(buf.data(), 0, buf.size());
    co_return true;
  }
  Status s = co_await side.disk.read(offset, buf);
  if (!s.ok()) {
    job.record({offset, kReadFailed,
                "Error while reading offset " + std::to_string(offset) + " of " + side.name + ": " + s.message()});
    co_return false;
  }
  co_return true;
}

// Compares guest range [start, start + len) through the two buffers.
Task<void> compare_chunk(CompareJob& job, uint64_t start, uint64_t len, std::byte* buf_a, std::byte* buf_b) {
  const uint64_t end = start + len;
  for (uint64_t offset = start; offset < end;) {
    if (job.decided_before(offset)) co_return;
    // Ask about the rest of each image (not only this chunk) so that the
    // strict-mode EOF flag is the one qemu-img sees.
    const uint64_t size_a = job.a.disk.size();
    auto st_a = co_await job.a.status.status(offset, size_a - offset);
    if (!st_a.ok()) co_return job.record({offset, kStatusFailed, "Sector allocation test failed for " + job.a.name});
    uint64_t n = std::min(st_a->length, end - offset);
    bool zero_b = true;
    if (job.b) {
      const uint64_t size_b = job.b->disk.size();
      auto st_b = co_await job.b->status.status(offset, size_b - offset);
      if (!st_b.ok()) co_return job.record({offset, kStatusFailed, "Sector allocation test failed for " + job.b->name});
      if (job.strict && status_flags(*st_a, offset, size_a) != status_flags(*st_b, offset, size_b)) {
        co_return job.record({offset, kDifferent, "Strict mode: Offset " + std::to_string(offset) +
                                                      " block status mismatch!"});
      }
      n = std::min(n, st_b->length);
      zero_b = st_b->zero;
    }
    if (!st_a->zero || !zero_b) {
      std::span<std::byte> a(buf_a + (offset - start), n);
      std::span<std::byte> b = job.b ? std::span<std::byte>(buf_b + (offset - start), n) : std::span<std::byte>();
      if (job.b) {
        auto [ok_a, ok_b] = co_await when_all(read_side(job, job.a, offset, a, st_a->zero),
                                               read_side(job, *job.b, offset, b, zero_b));
        if (!ok_a || !ok_b) co_return;
      } else {
        bool ok_a = co_await read_side(job, job.a, offset, a, st_a->zero);
        if (!ok_a) co_return;
      }
      if (auto diff = first_difference(a.data(), job.b ? b.data() : nullptr, n)) {
        co_return job.record({offset + *diff, kDifferent,
                              "Content mismatch at offset " + std::to_string(offset + *diff) + "!"});
      }
    }
    offset += n;
  }
}

// Takes chunks in offset order until none are left or an outcome before the
// next chunk is known.
Task<void> compare_worker(CompareJob& job) {
  AlignedBuffer buf_a(kChunkBytes), buf_b(job.b ? kChunkBytes : 0);
  while (job.next < job.end && !job.decided_before(job.next)) {
    const uint64_t start = job.next;
    const uint64_t len = std::min(kChunkBytes, job.end - start);
    job.next += len;
    co_await compare_chunk(job, start, len, buf_a.data(), buf_b.data());
    job.done += len;
    job.progress.update(job.done, job.progress_base);
  }
}

// Compares [start, end) of `a` with `b` (or with zeros); returns the first
// outcome, if any.
Task<std::optional<Outcome>> compare_range(Side& a, Side* b, bool strict, uint64_t start, uint64_t end,
                                           Progress& progress, uint64_t progress_base) {
  CompareJob job{a, b, strict, start, end, std::nullopt, progress, progress_base, start};
  TaskGroup workers;
  for (int i = 0; i < kWorkers; ++i) workers.spawn(compare_worker(job));
  co_await workers.join();
  co_return std::move(job.first);
}

// Prints an outcome where qemu-img prints it and returns the exit code.
int report(const Outcome& o, bool quiet) {
  if (o.exit_code != kDifferent) return fail(o.message, o.exit_code);
  if (!quiet) std::printf("%s\n", o.message.c_str());
  return o.exit_code;
}

Task<int> compare_images(Side& a, Side& b, bool strict, bool quiet, Progress& progress) {
  const uint64_t size_a = a.disk.size(), size_b = b.disk.size();
  if (strict && size_a != size_b) {
    if (!quiet) std::printf("Strict mode: Image size mismatch!\n");
    co_return kDifferent;
  }
  const uint64_t common = std::min(size_a, size_b), larger = std::max(size_a, size_b);
  auto o = co_await compare_range(a, &b, strict, 0, common, progress, larger);
  if (o) co_return report(*o, quiet);
  if (size_a != size_b) {
    if (!quiet) std::printf("Warning: Image size mismatch!\n");
    Side& over = size_a > size_b ? a : b;
    auto o = co_await compare_range(over, nullptr, false, common, larger, progress, larger);
    if (o) {
      co_return report(*o, quiet);
    }
  }
  progress.finish();
  if (!quiet) std::printf("Images are identical.\n");
  co_return kIdentical;
}

Task<int> compare_task(std::string path_a, OpenOptions options_a, std::string path_b, OpenOptions options_b,
                       bool strict, bool quiet, bool show_progress) {
  Progress progress(show_progress && !quiet);
  auto a = co_await open_disk(path_a, options_a);
  if (!a.ok()) co_return fail(a.error(), kOpenFailed);
  auto b = co_await open_disk(path_b, options_b);
  if (!b.ok()) {
    (void)co_await (*a)->close();
    co_return fail(b.error(), kOpenFailed);
  }
  int rc;
  {
    Side side_a(**a, path_a), side_b(**b, path_b);
    rc = co_await compare_images(side_a, side_b, strict, quiet, progress);
  }
  std::fflush(stdout);
  Status closed_a = co_await (*a)->close();
  Status closed_b = co_await (*b)->close();
  if (!closed_a.ok()) co_return fail(closed_a, kReadFailed);
  if (!closed_b.ok()) co_return fail(closed_b, kReadFailed);
  co_return rc;
}

}  // namespace

int cmd_compare(int argc, char** argv) {
  Args args;
  args.option("-F,--b-format", "format of FILE2 (default: probe); -f gives the format of FILE1", "FMT")
      .flag("-s,--strict", "also require equal sizes and equal allocation status")
      .flag("-p,--progress", "show progress on stderr (when it is a terminal)")
      .flag("-q,--quiet", "print nothing but errors");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s, kOpenFailed);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 2) return fail("compare: expecting two image file names (see --help)", kOpenFailed);
  auto options_a = open_options(args, /*read_only=*/true);
  if (!options_a.ok()) return fail(options_a.error(), kOpenFailed);
  OpenOptions options_b = *options_a;
  options_b.format = args.get_or("-F", "");
  return run(compare_task(args.positional()[0], std::move(*options_a), args.positional()[1], std::move(options_b),
                          args.has("-s"), args.has("-q"), args.has("-p")));
}

}  // namespace uqcow::cli
