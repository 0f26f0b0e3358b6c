#include "engine/co_mutex.h"

#include <gtest/gtest.h>

#include <vector>

#include "engine/co_queue.h"
#include "engine/event.h"
#include "engine/sync_wait.h"
#include "engine/task_group.h"

namespace uqcow {
namespace {

TEST(CoMutex, UncontendedLockDoesNotSuspend) {
  CoMutex m;
  auto t = [&]() -> Task<int> {
    co_await m.lock();
    EXPECT_TRUE(m.locked());
    m.unlock();
    co_return 1;
  };
  EXPECT_EQ(sync_wait(t()), 1);
  EXPECT_FALSE(m.locked());
}

TEST(CoMutex, ContendedIsFifoAndExclusive) {
  CoMutex m;
  Event release;
  std::vector<int> order;
  int inside = 0;
  auto worker = [&](int id) -> Task<void> {
    auto g = co_await m.scoped_lock();
    EXPECT_EQ(++inside, 1);
    order.push_back(id);
    if (id == 0) co_await release.wait();  // hold while the others queue up
    --inside;
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    for (int i = 0; i < 1000; ++i) g.spawn(worker(i));
    EXPECT_TRUE(m.has_waiters());
    release.set();
    co_await g.join();
  };
  sync_wait(body());
  ASSERT_EQ(order.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(order[i], i);
  EXPECT_FALSE(m.locked());
}

TEST(CoMutex, UnlockHandsOwnershipToWaiter) {
  CoMutex m;
  bool waiter_got_it = false;
  // Coroutine lambdas are named so that their captures outlive the frames.
  auto waiter = [&]() -> Task<void> {
    co_await m.lock();
    waiter_got_it = true;
    m.unlock();
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    co_await m.lock();
    g.spawn(waiter());
    m.unlock();
    // Ownership went to the waiter: the mutex never became free, so a barger
    // cannot take it.
    EXPECT_TRUE(m.locked());
    EXPECT_FALSE(m.try_lock());
    co_await g.join();
  };
  sync_wait(body());
  EXPECT_TRUE(waiter_got_it);
  EXPECT_FALSE(m.locked());
}

TEST(CoMutex, GuardUnlocksEarlyAndOnScopeExit) {
  CoMutex m;
  auto t = [&]() -> Task<void> {
    {
      auto g = co_await m.scoped_lock();
      EXPECT_TRUE(g.owns_lock());
      g.unlock();
      EXPECT_FALSE(m.locked());
      EXPECT_FALSE(g.owns_lock());
    }
    EXPECT_FALSE(m.locked());
    {
      auto g = co_await m.scoped_lock();
      EXPECT_TRUE(m.locked());
    }
    EXPECT_FALSE(m.locked());
  };
  sync_wait(t());
}

TEST(CoQueue, WakeOneIsFifoWakeAllWakesRest) {
  CoQueue q;
  std::vector<int> woken;
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    for (int i = 0; i < 5; ++i) {
      g.spawn([](CoQueue& q, std::vector<int>& w, int id) -> Task<void> {
        co_await q.wait();
        w.push_back(id);
      }(q, woken, i));
    }
    EXPECT_TRUE(q.wake_one());
    co_await [&]() -> Task<void> { co_return; }();
    EXPECT_EQ(q.wake_all(), 4u);
    EXPECT_FALSE(q.wake_one());
    co_await g.join();
  };
  sync_wait(body());
  EXPECT_EQ(woken, (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(CoQueue, WaitReleasesAndRetakesMutex) {
  CoMutex m;
  CoQueue q;
  bool flag = false;
  auto waiter = [&]() -> Task<void> {
    co_await m.lock();
    while (!flag) co_await q.wait(m);
    EXPECT_TRUE(m.locked());
    m.unlock();
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(waiter());
    co_await m.lock();  // available: the waiter released it inside wait()
    flag = true;
    q.wake_all();
    m.unlock();
    co_await g.join();
  };
  sync_wait(body());
  EXPECT_FALSE(m.locked());
}

}  // namespace
}  // namespace uqcow
