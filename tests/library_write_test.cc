// The write path against two oracles: an in-memory model of the guest
// content, and qemu-img (check must be clean, compare must be identical).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "block/endian.h"
#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/task_group.h"
#include "qcow2/create.h"
#include "qcow2/image.h"
#include "tests/testutil.h"
#include "uring/reactor.h"

namespace uqcow::qcow2 {
namespace {

using testing::run_command;
using testing::Succeeded;
using testing::TempDir;

struct Model {
  std::vector<std::byte> bytes;
  explicit Model(uint64_t size) : bytes(size) {}
  void write(uint64_t off, std::span<const std::byte> d) { std::copy(d.begin(), d.end(), bytes.begin() + off); }
  void zero(uint64_t off, uint64_t len) { std::fill_n(bytes.begin() + off, len, std::byte{0}); }
  void save(const std::string& path) const {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
};

class WriteTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!testing::require_tool("qemu-img")) return;
    auto r = uring::Reactor::create();
    ASSERT_TRUE(r.ok()) << r.error().message();
    reactor_ = std::move(r).value();
  }
  TempDir dir_;
  std::unique_ptr<uring::Reactor> reactor_;
};

Task<Status> random_ops(Disk& disk, Model& model, uint64_t seed, int ops, bool concurrent) {
  std::mt19937_64 rng(seed);
  const uint64_t size = disk.size();
  std::vector<std::vector<std::byte>> buffers;
  TaskGroup group;
  Status first;
  auto record = [&first](Status s) {
    if (!s.ok() && first.ok()) first = s;
  };
  auto one = [&](uint64_t off, std::span<const std::byte> data) -> Task<void> {
    record(co_await disk.write(off, data));
  };
  for (int i = 0; i < ops; ++i) {
    uint64_t len = 1 + rng() % (200 << 10);
    uint64_t off = rng() % (size - len);
    if (rng() % 3 == 0) off &= ~uint64_t{4095};
    buffers.emplace_back(len);
    auto& b = buffers.back();
    for (auto& x : b) x = std::byte(rng());
    // Concurrent writes never overlap (the model would not know the order),
    // except on purpose within one cluster (see Concurrent test).
    model.write(off, b);
    if (concurrent) {
      group.spawn(one(off, b));
      if (group.active() >= 16) co_await group.join();
    } else {
      co_await one(off, b);
    }
  }
  co_await group.join();
  co_return first;
}

TEST_P(WriteTest, RandomWritesMatchModelAndQemuImgCheckIsClean) {
  const std::string img = dir_.file("w.qcow2"), raw = dir_.file("w.raw");
  const uint64_t size = 64ull << 20;
  CreateOptions co;
  co.size = size;
  ASSERT_TRUE(parse_create_options(GetParam(), co).ok());
  ASSERT_TRUE(sync_wait(*reactor_, create_image(img, co)).ok());
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "check", img}))) << "fresh image not clean";
  Model model(size);
  OpenOptions oo;
  oo.read_only = false;
  auto disk = sync_wait(*reactor_, open_disk(img, oo));
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  // Sequential, overlapping writes (later ones overwrite earlier ones).
  Status s = sync_wait(*reactor_, random_ops(**disk, model, 1, 200, false));
  ASSERT_TRUE(s.ok()) << s.message();
  // Read back through the engine before closing.
  std::vector<std::byte> back(size);
  ASSERT_TRUE(sync_wait(*reactor_, (*disk)->read(0, back)).ok());
  EXPECT_TRUE(back == model.bytes);
  ASSERT_TRUE(sync_wait(*reactor_, (*disk)->close()).ok());
  model.save(raw);
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img})));
}

// Concurrent allocating writes whose byte ranges are disjoint but share
// clusters: two writes into the same unallocated cluster, writes that span a
// cluster whose allocation is in flight. Every byte has one writer, so the
// model is exact whatever the completion order.
TEST_P(WriteTest, ConcurrentWritesSharingClustersMatchModel) {
  const std::string img = dir_.file("c.qcow2"), raw = dir_.file("c.raw");
  const uint64_t size = 16ull << 20;
  CreateOptions co;
  co.size = size;
  ASSERT_TRUE(parse_create_options(GetParam(), co).ok());
  ASSERT_TRUE(sync_wait(*reactor_, create_image(img, co)).ok());
  OpenOptions oo;
  oo.read_only = false;
  auto disk = sync_wait(*reactor_, open_disk(img, oo));
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  Model model(size);
  // Cut [0, 4 MiB) into random disjoint pieces and write them all at once in
  // a random order.
  std::mt19937_64 rng(7);
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  for (uint64_t off = 0; off < (4ull << 20);) {
    uint64_t len = 1 + rng() % 20000;
    if (rng() % 4 == 0) len = 1 + rng() % 300;  // many small ones share a cluster
    pieces.emplace_back(off, std::min<uint64_t>(len, (4ull << 20) - off));
    off += len + (rng() % 5 == 0 ? rng() % 70000 : 0);  // and some holes
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);
  std::vector<std::vector<std::byte>> data;
  for (auto [off, len] : pieces) {
    data.emplace_back(len);
    for (auto& b : data.back()) b = std::byte(rng());
    model.write(off, data.back());
  }
  Status first;
  auto one = [&](size_t i) -> Task<void> {
    Status st = co_await (*disk)->write(pieces[i].first, data[i]);
    if (!st.ok() && first.ok()) first = st;
  };
  auto all = [&]() -> Task<void> {
    TaskGroup g;
    for (size_t i = 0; i < pieces.size(); ++i) g.spawn(one(i));
    co_await g.join();
  };
  sync_wait(*reactor_, all());
  ASSERT_TRUE(first.ok()) << first.message();
  std::vector<std::byte> back(size);
  ASSERT_TRUE(sync_wait(*reactor_, (*disk)->read(0, back)).ok());
  EXPECT_TRUE(back == model.bytes);
  ASSERT_TRUE(sync_wait(*reactor_, (*disk)->close()).ok());
  model.save(raw);
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img})));
}

// Zero writes and discards mixed with data writes, against the model.
TEST_P(WriteTest, ZeroWritesAndDiscardsMatchModel) {
  const std::string img = dir_.file("z.qcow2"), raw = dir_.file("z.raw");
  const uint64_t size = 32ull << 20;
  CreateOptions co;
  co.size = size;
  ASSERT_TRUE(parse_create_options(GetParam(), co).ok());
  ASSERT_TRUE(sync_wait(*reactor_, create_image(img, co)).ok());
  OpenOptions oo;
  oo.read_only = false;
  auto disk = sync_wait(*reactor_, open_disk(img, oo));
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  Model model(size);
  std::mt19937_64 rng(11);
  auto body = [&]() -> Task<Status> {
    for (int i = 0; i < 300; ++i) {
      uint64_t len = 1 + rng() % (300 << 10);
      uint64_t off = rng() % (size - len);
      int kind = static_cast<int>(rng() % 4);
      if (kind <= 1) {
        std::vector<std::byte> b(len);
        for (auto& x : b) x = std::byte(rng());
        model.write(off, b);
        UQ_CO_TRY(co_await (*disk)->write(off, b));
      } else if (kind == 2) {
        model.zero(off, len);
        UQ_CO_TRY(co_await (*disk)->write_zeroes(off, len, rng() % 2));
      } else {
        // Discard leaves the content undefined only where the image cannot
        // say zero; without a backing file qcow2 v3 reads zeros, v2 too.
        Status st = co_await (*disk)->discard(off, len);
        UQ_CO_TRY(st);
        std::vector<std::byte> now(len);
        UQ_CO_TRY(co_await (*disk)->read(off, now));
        // Whatever the discard did, the model follows what reads show, and
        // that must be either the old data or zeros, byte by byte.
        for (uint64_t k = 0; k < len; ++k) {
          if (now[k] != model.bytes[off + k] && now[k] != std::byte{0}) {
            co_return Error(EIO, "discard produced data that was never written at " + std::to_string(off + k));
          }
        }
        model.write(off, now);
      }
    }
    co_return Status();
  };
  Status s = sync_wait(*reactor_, body());
  ASSERT_TRUE(s.ok()) << s.message();
  ASSERT_TRUE(sync_wait(*reactor_, (*disk)->close()).ok());
  model.save(raw);
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img})));
}

INSTANTIATE_TEST_SUITE_P(Layouts, WriteTest,
                         ::testing::Values("cluster_size=64k", "cluster_size=512", "cluster_size=2M",
                                           "cluster_size=4k,refcount_bits=1", "refcount_bits=64",
                                           "compat=0.10", "extended_l2=on", "lazy_refcounts=on",
                                           "cluster_size=512,refcount_bits=2"));

}  // namespace
}  // namespace uqcow::qcow2

namespace uqcow::qcow2 {
namespace {

// QEMU's overlap check: an L2 entry that (by corruption) points at the
// refcount table must not let a guest write clobber it. The write fails with
// EIO, the image is marked corrupt on disk, and the refcount table is intact.
TEST(OverlapCheck, WriteIntoMetadataIsRefusedAndMarksTheImageCorrupt) {
  UQ_REQUIRE_TOOL("qemu-img");
  TempDir dir;
  const std::string img = dir.file("o.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-f", "qcow2", img, "64M"})));
  ASSERT_TRUE(Succeeded(run_command({"qemu-io", "-c", "write -P 0x11 0 64k", img})));
  // Layout of a fresh 64k-cluster image: refcount table at 0x10000, L2 table
  // at 0x40000. Point guest cluster 0 at the refcount table (COPIED set).
  {
    std::fstream f(img, std::ios::in | std::ios::out | std::ios::binary);
    uint8_t entry[8];
    store_be64(entry, 0x10000 | kOflagCopied);
    f.seekp(0x40000);
    f.write(reinterpret_cast<char*>(entry), 8);
  }
  std::vector<char> table_before(512);
  {
    std::ifstream f(img, std::ios::binary);
    f.seekg(0x10000);
    f.read(table_before.data(), 512);
  }
  auto reactor = uring::Reactor::create();
  ASSERT_TRUE(reactor.ok());
  OpenOptions oo;
  oo.read_only = false;
  auto disk = sync_wait(**reactor, open_disk(img, oo));
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  std::vector<std::byte> data(4096, std::byte{0xee});
  Status s = sync_wait(**reactor, (*disk)->write(0, data));
  EXPECT_EQ(s.code(), EIO) << s.message();
  EXPECT_NE(s.message().find("refcount table"), std::string::npos) << s.message();
  Status again = sync_wait(**reactor, (*disk)->write(1 << 20, data));
  EXPECT_EQ(again.code(), EIO) << "writes after the corruption must be refused";
  (void)sync_wait(**reactor, (*disk)->close());
  disk->reset();
  std::vector<char> table_after(512);
  {
    std::ifstream f(img, std::ios::binary);
    f.seekg(0x10000);
    f.read(table_after.data(), 512);
    uint8_t incompat[8];
    f.seekg(72);
    f.read(reinterpret_cast<char*>(incompat), 8);
    EXPECT_TRUE(load_be64(incompat) & kIncompatCorrupt) << "corrupt bit not set on disk";
  }
  EXPECT_EQ(table_before, table_after) << "the refcount table was overwritten";
  // A read-write open of a corrupt image is refused; read-only works.
  auto rw = sync_wait(**reactor, open_disk(img, oo));
  EXPECT_FALSE(rw.ok());
  OpenOptions ro;
  auto r = sync_wait(**reactor, open_disk(img, ro));
  EXPECT_TRUE(r.ok());
  if (r.ok()) (void)sync_wait(**reactor, (*r)->close());
}

}  // namespace
}  // namespace uqcow::qcow2

namespace uqcow::qcow2 {
namespace {

// Guest offsets and host offsets above 4 GiB: an 8 GiB image preallocated
// (metadata) by qemu-img puts data clusters up to 8 GiB into the (sparse)
// file; grown to 12 GiB, new clusters are allocated past 8 GiB. Writes at
// both go through uqcow and are read back by qemu-io.
TEST(LargeOffsets, WritesAbove4GiBGuestAndHost) {
  UQ_REQUIRE_TOOL("qemu-img");
  TempDir dir;
  const std::string img = dir.file("big.qcow2");
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata", img, "8G"})));
  auto reactor = uring::Reactor::create();
  ASSERT_TRUE(reactor.ok());
  OpenOptions oo;
  oo.read_only = false;
  auto disk = sync_wait(**reactor, open_disk(img, oo));
  ASSERT_TRUE(disk.ok()) << disk.error().message();
  auto* q = dynamic_cast<Qcow2Image*>(disk->get());
  ASSERT_NE(q, nullptr);
  ASSERT_TRUE(sync_wait(**reactor, q->resize(12ull << 30)).ok());
  const uint64_t in_place = (7ull << 30) + 12345, allocating = (11ull << 30) + 777;
  std::vector<std::byte> a(100000, std::byte{0x4a}), b(100000, std::byte{0x4b});
  ASSERT_TRUE(sync_wait(**reactor, q->write(in_place, a)).ok());
  ASSERT_TRUE(sync_wait(**reactor, q->write(allocating, b)).ok());
  auto st = sync_wait(**reactor, q->block_status(in_place, 1));
  ASSERT_TRUE(st.ok());
  EXPECT_GT(st->host_offset, 4ull << 30) << "the preallocated cluster should sit above 4 GiB";
  auto st2 = sync_wait(**reactor, q->block_status(allocating, 1));
  ASSERT_TRUE(st2.ok());
  EXPECT_GT(st2->host_offset, 8ull << 30) << "a new cluster should be allocated past the preallocated ones";
  ASSERT_TRUE(sync_wait(**reactor, (*disk)->close()).ok());
  disk->reset();
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", img})));
  EXPECT_TRUE(Succeeded(run_command({"qemu-io", "-r", "-c", "read -P 0x4a " + std::to_string(in_place) + " 100000", "-c",
                                     "read -P 0x4b " + std::to_string(allocating) + " 100000", "-c",
                                     "read -P 0 " + std::to_string(9ull << 30) + " 65536", img})));
}

}  // namespace
}  // namespace uqcow::qcow2
