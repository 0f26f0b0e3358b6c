// Unit tests of the simulation's own machinery: the scheduler's order is a
// function of its seed, effects happen at completion, flushes make exactly
// the changes completed before them durable, and crash images tear writes
// at sector granularity.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "engine/sync_wait.h"
#include "engine/task_group.h"
#include "tests/sim/sim_device.h"

namespace uqcow::sim {
namespace {

std::span<const std::byte> as_bytes_of(const std::vector<uint8_t>& v) { return std::as_bytes(std::span(v)); }

struct Rig {
  explicit Rig(uint64_t seed, SimDelays delays = {}, size_t size = 64 << 10)
      : scheduler(seed, delays),
        storage(std::make_shared<SimStorage>(std::vector<uint8_t>(size, 0))),
        device(scheduler, storage, "sim.img", false) {}
  SimScheduler scheduler;
  std::shared_ptr<SimStorage> storage;
  SimDevice device;
};

Task<void> write_then_record(SimDevice& dev, uint64_t offset, std::vector<uint8_t>& data, int index,
                             std::vector<int>& finished) {
  Status s = co_await dev.co_write(offset, as_bytes_of(data));
  EXPECT_TRUE(s.ok()) << s.message();
  finished.push_back(index);
}

// Runs 64 concurrent writes (same workload each time); returns the order in
// which they finished.
std::vector<int> completion_order(uint64_t seed, uint64_t* hash = nullptr) {
  Rig rig(seed, {.probability = 0.25, .max_steps = 16});
  std::vector<std::vector<uint8_t>> buffers;
  for (int i = 0; i < 64; ++i) buffers.emplace_back(512, static_cast<uint8_t>(i));
  std::vector<int> finished;
  TaskGroup group;
  for (int i = 0; i < 64; ++i) group.spawn(write_then_record(rig.device, uint64_t(i) * 512, buffers[i], i, finished));
  sync_wait(rig.scheduler, group.join());
  EXPECT_EQ(finished.size(), 64u);
  EXPECT_EQ(rig.scheduler.completions(), 64u);
  if (hash) *hash = rig.scheduler.order_hash();
  return finished;
}

TEST(SimScheduler, SameSeedSameCompletionOrder) {
  uint64_t h1 = 0, h2 = 0, h3 = 0;
  std::vector<int> a = completion_order(42, &h1);
  std::vector<int> b = completion_order(42, &h2);
  std::vector<int> c = completion_order(43, &h3);
  EXPECT_EQ(a, b);
  EXPECT_EQ(h1, h2);
  EXPECT_NE(a, c) << "another seed should give another order";
  EXPECT_NE(h1, h3);
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NE(a, sorted) << "64 concurrent requests completed in submission order";
}

TEST(SimScheduler, RunOnceReportsIdle) {
  Rig rig(1);
  EXPECT_FALSE(rig.scheduler.run_once());
  std::vector<uint8_t> buf(16);
  Status s = sync_wait(rig.scheduler, rig.device.co_read(0, std::as_writable_bytes(std::span(buf))));
  EXPECT_TRUE(s.ok());
  EXPECT_FALSE(rig.scheduler.run_once());
}

Task<void> read_into(SimDevice& dev, uint64_t offset, std::vector<uint8_t>& out) {
  Status s = co_await dev.co_read(offset, std::as_writable_bytes(std::span(out)));
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST(SimScheduler, EffectsHappenAtCompletion) {
  // A read and a write of the same bytes in flight together: the read sees
  // the write exactly when the write completed first. Both outcomes occur
  // over a few seeds.
  std::set<bool> saw_write;
  for (uint64_t seed = 0; seed < 32; ++seed) {
    Rig rig(seed);
    std::vector<uint8_t> data(4096, 0xab), got(4096, 0x11);
    TaskGroup group;
    group.spawn(read_into(rig.device, 0, got));
    std::vector<int> finished;
    group.spawn(write_then_record(rig.device, 0, data, 0, finished));
    EXPECT_EQ(rig.scheduler.pending(), 2u);
    EXPECT_EQ(rig.storage->bytes()[0], 0) << "a write landed before it completed";
    sync_wait(rig.scheduler, group.join());
    EXPECT_TRUE(std::all_of(got.begin(), got.end(), [&](uint8_t b) { return b == got[0]; })) << "torn read";
    EXPECT_TRUE(got[0] == 0 || got[0] == 0xab);
    saw_write.insert(got[0] == 0xab);
  }
  EXPECT_EQ(saw_write.size(), 2u);
}

TEST(SimStorage, FlushCoversChangesCompletedBeforeItWasIssued) {
  Rig rig(7, {.probability = 0});
  std::vector<uint8_t> a(512, 0xaa), b(512, 0xbb);
  ASSERT_TRUE(sync_wait(rig.scheduler, rig.device.co_write(0, as_bytes_of(a))).ok());
  // b completes while the flush is in flight (or after): not covered.
  TaskGroup group;
  std::vector<int> finished;
  Status flushed;
  auto flush = [&]() -> Task<void> { flushed = co_await rig.device.co_flush(); };
  group.spawn(flush());
  group.spawn(write_then_record(rig.device, 512, b, 1, finished));
  sync_wait(rig.scheduler, group.join());
  ASSERT_TRUE(flushed.ok());
  EXPECT_EQ(rig.storage->durable()[0], 0xaa);
  EXPECT_EQ(rig.storage->durable()[512], 0) << "a write completed after the flush was issued became durable";
  EXPECT_EQ(rig.storage->bytes()[512], 0xbb);
  ASSERT_TRUE(sync_wait(rig.scheduler, rig.device.co_flush()).ok());
  EXPECT_EQ(rig.storage->durable()[512], 0xbb);
}

TEST(SimStorage, CrashImagesTearAtSectorGranularity) {
  // One durable write, one completed but unflushed, one in flight; crash
  // images must contain the durable one, and each sector of the others
  // either whole or not at all; over many draws some are torn.
  Rig rig(3, {.probability = 0});
  std::vector<uint8_t> durable(4096, 0x11), unflushed(8192, 0x22), inflight(8192 + 700, 0x33);
  ASSERT_TRUE(sync_wait(rig.scheduler, rig.device.co_write(0, as_bytes_of(durable))).ok());
  ASSERT_TRUE(sync_wait(rig.scheduler, rig.device.co_flush()).ok());
  ASSERT_TRUE(sync_wait(rig.scheduler, rig.device.co_write(4096, as_bytes_of(unflushed))).ok());
  TaskGroup group;
  std::vector<int> finished;
  group.spawn(write_then_record(rig.device, 10000, inflight, 0, finished));  // not sector aligned
  ASSERT_EQ(rig.scheduler.pending(), 1u);
  auto in_flight = rig.scheduler.in_flight_changes(*rig.storage);
  ASSERT_EQ(in_flight.size(), 1u);

  std::mt19937_64 rng(99);
  CrashStats stats;
  std::vector<std::vector<uint8_t>> images;
  for (int i = 0; i < 200; ++i) images.push_back(rig.storage->crash_image(rng, in_flight, stats));
  sync_wait(rig.scheduler, group.join());  // before any ASSERT can return

  struct Range {
    uint64_t begin, end;
    uint8_t value;
  };
  const Range writes[] = {{4096, 4096 + 8192, 0x22}, {10000, 10000 + 8192 + 700, 0x33}};
  int mixed_images = 0;
  for (size_t i = 0; i < images.size(); ++i) {
    const std::vector<uint8_t>& img = images[i];
    ASSERT_GE(img.size(), 4096u + 8192u);
    for (size_t b = 0; b < 4096; ++b) ASSERT_EQ(img[b], 0x11) << "durable byte " << b << " lost";
    // Within each file sector, a write's bytes land all together or not at
    // all (the later write wins where both landed).
    std::set<bool> landed;
    for (const Range& w : writes) {
      for (uint64_t lo = w.begin; lo < w.end;) {
        const uint64_t hi = std::min(w.end, (lo / kSimSector + 1) * kSimSector);
        const bool here = lo < img.size() && img[lo] == w.value;
        for (uint64_t b = lo; b < hi; ++b) {
          const bool other = b < img.size() && img[b] != 0 && img[b] != w.value;  // overwritten by the other write
          if (!other) {
            ASSERT_EQ(b < img.size() && img[b] == w.value, here) << "torn inside a sector at " << b;
          }
        }
        if (w.value == 0x33) landed.insert(here);
        lo = hi;
      }
    }
    if (landed.size() == 2) ++mixed_images;
  }
  EXPECT_GT(stats.torn, 0u);
  EXPECT_GT(mixed_images, 0) << "no crash image had only part of the in-flight write";
  EXPECT_EQ(stats.candidates, 400u);
}

}  // namespace
}  // namespace uqcow::sim
