// Fuzz target: open an arbitrary image read-only (forced qcow2, no backing
// file, a small L2 cache so that slices are evicted), read the guest disk
// with several reads in flight, and walk block_status over it.
//
// Work is bounded whatever the header says: reads stop at kMaxReadBytes and
// the block_status walk at kMaxStatusBytes. Errors are expected (the input
// is mostly garbage); crashes, sanitizer reports, hangs and block_status
// answers that break its contract are the findings.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <vector>

#include "block/disk.h"
#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/when_all.h"
#include "tests/fuzz/fuzz_util.h"

namespace uqcow::fuzz {
namespace {

// Not a multiple of any cluster size, so reads start and end mid-cluster.
constexpr uint64_t kChunk = (192u << 10) - 3;
constexpr size_t kDepth = 4;

Task<void> read_all(Disk& disk) {
  const uint64_t end = std::min(disk.size(), kMaxReadBytes);
  std::vector<std::byte> buf(kChunk * kDepth);
  for (uint64_t pos = 0; pos < end; pos += kChunk * kDepth) {
    std::vector<Task<Status>> batch;
    for (size_t i = 0; i < kDepth && pos + i * kChunk < end; ++i) {
      uint64_t off = pos + i * kChunk;
      size_t len = static_cast<size_t>(std::min(kChunk, end - off));
      batch.push_back(disk.read(off, std::span<std::byte>(buf.data() + i * kChunk, len)));
    }
    std::vector<Status> results = co_await when_all(std::move(batch));
    (void)results;  // corruption errors are expected
  }
}

Task<void> walk_block_status(Disk& disk) {
  const uint64_t end = std::min(disk.size(), kMaxStatusBytes);
  uint64_t pos = 0;
  for (int calls = 0; pos < end && calls < 4096; ++calls) {
    Result<BlockStatus> st = co_await disk.block_status(pos, end - pos);
    if (!st.ok()) co_return;
    if (st->length == 0 || st->length > end - pos) {
      std::fprintf(stderr, "uqcow fuzz_open_read: block_status(%llu, %llu) returned length %llu\n",
                   static_cast<unsigned long long>(pos), static_cast<unsigned long long>(end - pos),
                   static_cast<unsigned long long>(st->length));
      std::abort();
    }
    pos += st->length;
  }
}

Task<void> exercise(const std::string& path) {
  OpenOptions options;
  options.read_only = true;
  options.format = "qcow2";
  options.no_backing = true;
  options.l2_cache_size = 4096;
  options.cache_clean_interval = 0;
  Result<std::unique_ptr<Disk>> opened = co_await open_disk(path, options);
  if (!opened.ok()) co_return;
  std::unique_ptr<Disk> disk = std::move(opened).value();
  co_await read_all(*disk);
  co_await walk_block_status(*disk);
  Status closed = co_await disk->close();
  (void)closed;
}

}  // namespace
}  // namespace uqcow::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace uqcow::fuzz;
  std::span<const uint8_t> input(data, size);
  if (!refers_only_to_private_files(input)) return -1;  // keep it out of the corpus
  std::string path = write_input(input);
  uqcow::sync_wait(reactor(), exercise(path));
  return 0;
}
