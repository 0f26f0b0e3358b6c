// Fuzz target: the write path on an arbitrary image. The input is opened
// read-write (a copy in the private directory, no backing file, the smallest
// caches, every overlap check) and takes a fixed mix of writes, zero writes,
// a discard and a compressed write, some in flight together, then a flush
// and close. On a damaged image the engine must refuse (EIO, corrupt bit)
// rather than crash, corrupt memory or write without bound.
//
// Persistent dirty bitmaps: the open loads the image's and sets them in
// use; before the writes, the last of several is removed (its clusters are
// freed at close) and a new enabled one is added, so that close stores
// bitmaps (new data clusters, tables, directory and header, the old ones
// freed) on every image that opens, over whatever refcounts it has.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/when_all.h"
#include "qcow2/image.h"
#include "tests/fuzz/fuzz_util.h"

namespace uqcow::fuzz {
namespace {

Task<void> exercise(const std::string& path) {
  OpenOptions options;
  options.read_only = false;
  options.format = "qcow2";
  options.no_backing = true;
  options.l2_cache_size = 1;
  options.refcount_cache_size = 1;
  options.cache_clean_interval = 0;
  options.overlap_check = OverlapCheck::kAll;
  Result<std::unique_ptr<Disk>> opened = co_await open_disk(path, options);
  if (!opened.ok()) co_return;
  std::unique_ptr<Disk> disk = std::move(opened).value();
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(disk.get());
  const uint64_t size = disk->size();
  const uint64_t cs = image != nullptr ? image->geometry().cluster_size : 65536;
  if (image != nullptr) {
    auto bitmaps = image->bitmap_list();
    if (bitmaps.size() >= 2) (void)image->bitmap_remove(bitmaps.back().name);
    // Coarse enough that the bitmap stays small (at most 2^20 granules).
    uint64_t granularity = 65536;
    while (granularity < (uint64_t{1} << 31) && size / granularity > (uint64_t{1} << 20)) granularity <<= 1;
    (void)image->bitmap_add("fuzz", granularity, true);
  }
  if (size >= 2 * cs) {
    std::vector<std::byte> data(3 * cs + 1000, std::byte{0x5a});
    const uint64_t mid = size / 2 / cs * cs;
    const uint64_t len = std::min<uint64_t>(data.size(), size - mid);
    std::vector<Task<Status>> batch;
    batch.push_back(disk->write(100, std::span<const std::byte>(data.data(), std::min<uint64_t>(cs, size - 100))));
    batch.push_back(disk->write(mid, std::span<const std::byte>(data.data(), len)));
    batch.push_back(disk->write_zeroes(size - cs, cs, true));
    std::vector<Status> first = co_await when_all(std::move(batch));
    (void)first;  // errors are expected on damaged images
    Status zeroed = co_await disk->write_zeroes(cs / 2, cs, false);
    Status discarded = co_await disk->discard(0, 2 * cs);
    (void)zeroed;
    (void)discarded;
    if (image != nullptr) {
      Status compressed = co_await image->write_compressed(0, std::span<const std::byte>(data.data(), cs));
      (void)compressed;
    }
    Status flushed = co_await disk->flush();
    (void)flushed;
  }
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
