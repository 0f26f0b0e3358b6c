// Unit tests of the allocations-in-flight list alone, on the engine's ready
// queue (no ring, no image): who waits, who is shortened, who restarts.
#include "qcow2/inflight.h"

#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include "engine/event.h"
#include "engine/sync_wait.h"
#include "engine/task_group.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kCluster = 65536;

TEST(AllocationsInFlight, NoOverlapKeepsTheLength) {
  AllocationsInFlight list(kCluster);
  CoMutex lock;
  AllocationsInFlight::Allocation a(list, 4 * kCluster, 6 * kCluster);
  auto body = [&]() -> Task<void> {
    auto guard = co_await lock.scoped_lock();
    uint64_t len = 4 * kCluster;
    Status s = co_await list.wait_for_dependencies(0, len, lock, guard);
    EXPECT_TRUE(s.ok());
    EXPECT_EQ(len, 4 * kCluster);
    len = 2 * kCluster;  // after the allocation
    s = co_await list.wait_for_dependencies(6 * kCluster + 100, len, lock, guard);
    EXPECT_TRUE(s.ok());
    EXPECT_EQ(len, 2 * kCluster);
  };
  sync_wait(body());
}

TEST(AllocationsInFlight, OneFurtherOnShortensTheRequest) {
  AllocationsInFlight list(kCluster);
  CoMutex lock;
  AllocationsInFlight::Allocation a(list, 3 * kCluster, 4 * kCluster);
  AllocationsInFlight::Allocation b(list, 2 * kCluster, 3 * kCluster);
  auto body = [&]() -> Task<void> {
    auto guard = co_await lock.scoped_lock();
    // From the middle of cluster 0 for 4 clusters: stops before cluster 2.
    uint64_t len = 4 * kCluster;
    Status s = co_await list.wait_for_dependencies(kCluster / 2, len, lock, guard);
    EXPECT_TRUE(s.ok());
    EXPECT_EQ(len, 2 * kCluster - kCluster / 2);
    EXPECT_TRUE(lock.locked());
  };
  sync_wait(body());
}

TEST(AllocationsInFlight, OneOnTheFirstClusterMakesTheRequestWaitAndRestart) {
  AllocationsInFlight list(kCluster);
  CoMutex lock;
  std::optional<AllocationsInFlight::Allocation> a;
  a.emplace(list, kCluster, 2 * kCluster);
  Event done_writing;
  std::vector<int> order;
  auto owner = [&]() -> Task<void> {
    co_await done_writing.wait();
    auto guard = co_await lock.scoped_lock();  // the waiter must have released it
    order.push_back(1);
    a.reset();  // linked: unregister, wake the waiter
    order.push_back(2);
  };
  auto waiter = [&]() -> Task<void> {
    auto guard = co_await lock.scoped_lock();
    uint64_t len = kCluster;
    Status s = co_await list.wait_for_dependencies(kCluster + 512, len, lock, guard);
    order.push_back(3);
    EXPECT_EQ(s.code(), EAGAIN) << "restart: the plan may be stale";
    EXPECT_TRUE(lock.locked()) << "returns with the lock held";
    EXPECT_TRUE(list.empty());
    // The second pass finds nothing in the way.
    len = kCluster;
    s = co_await list.wait_for_dependencies(kCluster + 512, len, lock, guard);
    EXPECT_TRUE(s.ok());
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(waiter());
    g.spawn(owner());
    done_writing.set();
    co_await g.join();
  };
  sync_wait(body());
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

TEST(AllocationsInFlight, OverlappingWaitCoversEveryAllocationInTheRange) {
  AllocationsInFlight list(kCluster);
  CoMutex lock;
  std::optional<AllocationsInFlight::Allocation> a, b;
  a.emplace(list, 0, kCluster);
  b.emplace(list, 5 * kCluster, 6 * kCluster);
  Event release_a, release_b, a_finished;
  bool zeroed = false;
  auto zero = [&]() -> Task<void> {
    auto guard = co_await lock.scoped_lock();
    co_await list.wait_for_overlapping(0, 8 * kCluster, lock, guard);
    EXPECT_TRUE(list.empty()) << "both allocations finished first";
    zeroed = true;
  };
  auto finish = [&](Event& e, std::optional<AllocationsInFlight::Allocation>& x, Event* finished) -> Task<void> {
    co_await e.wait();
    {
      auto guard = co_await lock.scoped_lock();
      x.reset();  // wakes the zero write, which runs before us again
    }
    if (finished) finished->set();
  };
  auto drive = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(zero());
    g.spawn(finish(release_a, a, &a_finished));
    g.spawn(finish(release_b, b, nullptr));
    release_a.set();
    co_await a_finished.wait();
    EXPECT_FALSE(zeroed) << "b is still in flight";
    release_b.set();
    co_await g.join();
  };
  sync_wait(drive());
  EXPECT_TRUE(zeroed);
}

}  // namespace
}  // namespace uqcow::qcow2
