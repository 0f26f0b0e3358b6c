// Google Benchmark micro-benchmarks of the qcow2 layer: the cached read path
// (with its heap-allocation and lock counts), L2 cache lookup hit/miss, L2
// entry decode, refcount entry access at every width, cluster compression.
//
//   bazel run -c opt //bench:qcow2_bench
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "block/endian.h"
#include "block/open.h"
#include "engine/sync_wait.h"
#include "qcow2/cache.h"
#include "qcow2/compress.h"
#include "qcow2/create.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/refcount_entry.h"
#include "uring/aligned_buffer.h"
#include "uring/raw_file.h"
#include "uring/reactor.h"

// Every malloc in the process is counted, so a benchmark can report heap
// allocations per operation. (operator new goes through malloc.)
static std::atomic<uint64_t> g_mallocs{0};
extern "C" void* __libc_malloc(size_t);
extern "C" void* malloc(size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}

namespace uqcow {
namespace {

std::string image_path(const char* name) { return std::string("/dev/shm/uqcow-qcow2-bench-") + name; }

// A fully written 64 MiB qcow2 image (every cluster allocated).
const std::string& allocated_image() {
  static std::string path = [] {
    std::string p = image_path("read.qcow2");
    auto reactor = uring::Reactor::create();
    qcow2::CreateOptions co;
    co.size = 64ull << 20;
    co.preallocation = qcow2::Preallocation::kMetadata;
    Status s = sync_wait(**reactor, qcow2::create_image(p, co));
    if (!s.ok()) std::abort();
    return p;
  }();
  return path;
}

// The cached read path: 4 KiB reads at random offsets of an image whose L2
// cache covers it, one at a time. Reports heap allocations and metadata lock
// acquisitions per read; both must be 0.
void BM_CachedRead4k(benchmark::State& state) {
  const std::string& path = allocated_image();  // before this thread's reactor exists
  auto reactor = uring::Reactor::create();
  OpenOptions o;
  o.cache_clean_interval = 0;
  auto disk = sync_wait(**reactor, open_disk(path, o));
  if (!disk.ok()) {
    state.SkipWithError(disk.error().message().c_str());
    return;
  }
  auto* img = dynamic_cast<qcow2::Qcow2Image*>(disk->get());
  AlignedBuffer buf(4096);
  std::mt19937_64 rng(1);
  const uint64_t blocks = img->size() / 4096;
  auto warm = [&]() -> Task<void> {
    for (uint64_t b = 0; b < blocks; b += 16) (void)co_await img->read(b * 4096, buf.span());
  };
  sync_wait(**reactor, warm());
  uint64_t reads = 0;
  uint64_t mallocs_before = g_mallocs.load(), locks_before = img->metadata_lock_acquisitions();
  for (auto _ : state) {
    auto one = [&]() -> Task<Status> { co_return co_await img->read((rng() % blocks) * 4096, buf.span()); };
    Status s = sync_wait(**reactor, one());
    if (!s.ok()) state.SkipWithError(s.message().c_str());
    ++reads;
  }
  state.counters["mallocs_per_read"] = static_cast<double>(g_mallocs.load() - mallocs_before) / static_cast<double>(reads);
  state.counters["locks_per_read"] =
      static_cast<double>(img->metadata_lock_acquisitions() - locks_before) / static_cast<double>(reads);
  state.SetItemsProcessed(static_cast<int64_t>(reads));
  (void)sync_wait(**reactor, (*disk)->close());
}
BENCHMARK(BM_CachedRead4k);

// A fully written 64 MiB LUKS (aes-256-xts-plain64) image.
constexpr char kBenchPassphrase[] = "bench";
const std::string& encrypted_image() {
  static std::string path = [] {
    std::string p = image_path("luks.qcow2");
    auto reactor = uring::Reactor::create();
    qcow2::CreateOptions co;
    co.size = 64ull << 20;
    co.encryption = qcow2::CryptMethod::kLuks;
    co.luks.iter_time_ms = 10;
    co.passphrase = kBenchPassphrase;
    if (!sync_wait(**reactor, qcow2::create_image(p, co)).ok()) std::abort();
    OpenOptions o;
    o.read_only = false;
    o.passphrase = kBenchPassphrase;
    auto disk = sync_wait(**reactor, open_disk(p, o));
    if (!disk.ok()) std::abort();
    AlignedBuffer buf(1 << 20);
    auto fill = [&]() -> Task<Status> {
      for (uint64_t off = 0; off < co.size; off += buf.size()) UQ_CO_TRY(co_await (*disk)->write(off, buf.span()));
      co_return co_await (*disk)->close();
    };
    if (!sync_wait(**reactor, fill()).ok()) std::abort();
    return p;
  }();
  return path;
}

// The encrypted cached paths: 4 KiB reads (decrypt in place) or in-place
// writes (encrypt into a pooled bounce buffer) at random offsets, one at a
// time. Reports heap allocations per request; the steady state must be 0.
void BM_Encrypted4k(benchmark::State& state) {
  const bool write = state.range(0);
  const std::string& path = encrypted_image();  // before this thread's reactor exists
  auto reactor = uring::Reactor::create();
  OpenOptions o;
  o.read_only = !write;
  o.cache_clean_interval = 0;
  o.passphrase = kBenchPassphrase;
  auto disk = sync_wait(**reactor, open_disk(path, o));
  if (!disk.ok()) {
    state.SkipWithError(disk.error().message().c_str());
    return;
  }
  AlignedBuffer buf(4096);
  std::mt19937_64 rng(1);
  const uint64_t blocks = (*disk)->size() / 4096;
  auto one = [&](uint64_t offset) -> Task<Status> {
    if (write) co_return co_await (*disk)->write(offset, buf.span());
    co_return co_await (*disk)->read(offset, buf.span());
  };
  for (uint64_t b = 0; b < blocks; b += 16) (void)sync_wait(**reactor, one(b * 4096));  // warm the caches
  uint64_t requests = 0;
  const uint64_t mallocs_before = g_mallocs.load();
  for (auto _ : state) {
    Status s = sync_wait(**reactor, one((rng() % blocks) * 4096));
    if (!s.ok()) state.SkipWithError(s.message().c_str());
    ++requests;
  }
  state.counters["mallocs_per_op"] =
      static_cast<double>(g_mallocs.load() - mallocs_before) / static_cast<double>(requests);
  state.SetItemsProcessed(static_cast<int64_t>(requests));
  (void)sync_wait(**reactor, (*disk)->close());
}
BENCHMARK(BM_Encrypted4k)->Arg(0)->Arg(1)->ArgName("write");

// MetadataCache::lookup on a hit (LRU move to front included) and a miss.
void BM_L2CacheLookup(benchmark::State& state) {
  const bool hit = state.range(0);
  auto reactor = uring::Reactor::create();
  std::string path = image_path("cache.raw");
  auto file = RawFile::open(path, {.read_only = false, .create = true});
  (void)(*file)->truncate(64 << 20);
  auto cache = qcow2::MetadataCache::create("L2", **file, 4096, 1024);
  auto fill = [&]() -> Task<void> {
    for (uint64_t i = 0; i < 1024; ++i) (void)co_await (*cache)->get(i * 4096);
  };
  sync_wait(**reactor, fill());
  uint64_t i = 0;
  for (auto _ : state) {
    uint64_t off = hit ? (i * 7919 % 1024) * 4096 : (1024 + i % 4096) * 4096;
    benchmark::DoNotOptimize((*cache)->lookup(off));
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(i));
  unlink(path.c_str());
}
BENCHMARK(BM_L2CacheLookup)->Arg(1)->Arg(0)->ArgName("hit");

// Decoding L2 entries into subcluster types (standard and extended L2).
void BM_L2EntryDecode(benchmark::State& state) {
  const bool extended = state.range(0);
  const auto g = qcow2::Geometry::make(16, extended);
  std::vector<uint64_t> entries(4096);
  std::mt19937_64 rng(3);
  for (auto& e : entries) e = ((rng() % 100000) << 16) | (rng() % 2 ? qcow2::kOflagCopied : 0);
  uint64_t i = 0;
  for (auto _ : state) {
    uint64_t e = entries[i & 4095];
    benchmark::DoNotOptimize(qcow2::subcluster_type(g, e, extended ? 0xffffull : 0, i & 31, true));
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(i));
}
BENCHMARK(BM_L2EntryDecode)->Arg(0)->Arg(1)->ArgName("extended");

// Reading and incrementing one refcount at each width (refcount_order 0..6).
void BM_RefcountUpdate(benchmark::State& state) {
  const uint32_t order = static_cast<uint32_t>(state.range(0));
  std::vector<uint8_t> block(65536, 0);
  const uint64_t entries = 65536ull * 8 >> order;
  const uint64_t max = qcow2::max_refcount(order);
  uint64_t i = 0;
  for (auto _ : state) {
    uint64_t idx = (i * 2654435761u) % entries;
    uint64_t v = qcow2::get_refcount_entry(block.data(), idx, order);
    qcow2::set_refcount_entry(block.data(), idx, order, v == max ? 0 : v + 1);
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(i));
}
BENCHMARK(BM_RefcountUpdate)->DenseRange(0, 6)->ArgName("refcount_order");

// Compressing and decompressing a 64 KiB cluster of mixed data.
void BM_ClusterCompression(benchmark::State& state) {
  const auto type = state.range(0) ? qcow2::CompressionType::kZstd : qcow2::CompressionType::kZlib;
  const bool decompress = state.range(1);
  std::vector<uint8_t> in(65536), out(65536), back(65536);
  std::mt19937_64 rng(5);
  for (size_t i = 0; i < in.size(); ++i) in[i] = (i / 512) % 3 == 0 ? static_cast<uint8_t>(rng()) : static_cast<uint8_t>(i / 97);
  auto n = qcow2::compress_cluster(type, in, out);
  if (!n.ok() || *n == 0) {
    state.SkipWithError("data did not compress");
    return;
  }
  for (auto _ : state) {
    if (decompress) {
      Status s = qcow2::decompress_cluster(type, std::span<const uint8_t>(out.data(), *n), back);
      benchmark::DoNotOptimize(s.ok());
    } else {
      auto r = qcow2::compress_cluster(type, in, out);
      benchmark::DoNotOptimize(r.ok());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 65536);
}
BENCHMARK(BM_ClusterCompression)
    ->ArgsProduct({{0, 1}, {0, 1}})
    ->ArgNames({"zstd", "decompress"});

}  // namespace
}  // namespace uqcow

BENCHMARK_MAIN();
