#include <gtest/gtest.h>

#include "engine/event.h"
#include "engine/result.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/task_group.h"
#include "engine/when_all.h"

namespace uqcow {
namespace {

Task<int> answer() { co_return 42; }
Task<int> add(int a) { co_return a + co_await answer(); }

TEST(Task, ChainsAndReturnsValues) { EXPECT_EQ(sync_wait(add(1)), 43); }

Task<int> deep(int n) {
  if (n == 0) co_return 0;
  co_return 1 + co_await deep(n - 1);
}

TEST(Task, DeepChain) { EXPECT_EQ(sync_wait(deep(10000)), 10000); }

// A million tasks that complete synchronously, awaited in a loop: symmetric
// transfer returns to the loop each time instead of nesting a native frame
// per iteration, so the stack does not grow.
Task<long> many_sync_completions(int n) {
  long sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await answer();
  co_return sum;
}

TEST(Task, SynchronousCompletionsDoNotGrowTheStack) {
  EXPECT_EQ(sync_wait(many_sync_completions(1000000)), 42L * 1000000);
}

TEST(Task, LazyUntilAwaited) {
  bool ran = false;
  auto body = [&]() -> Task<void> {
    ran = true;
    co_return;
  };
  auto t = body();
  EXPECT_FALSE(ran);
  sync_wait(std::move(t));
  EXPECT_TRUE(ran);
}

TEST(Task, DestroyUnstartedFreesFrame) {
  auto t = answer();
  EXPECT_TRUE(t.valid());
}  // ASan reports a leak if the frame were not destroyed.

Task<Status> fails() { co_return Error(EIO, "boom"); }

TEST(Task, ErrorsAreValues) {
  Status s = sync_wait(fails());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EIO);
  EXPECT_EQ(s.message(), "boom");
}

TEST(WhenAll, VectorCollectsInOrder) {
  std::vector<Task<int>> tasks;
  for (int i = 0; i < 10; ++i) tasks.push_back([](int v) -> Task<int> { co_return v * v; }(i));
  auto r = sync_wait(when_all(std::move(tasks)));
  ASSERT_EQ(r.size(), 10u);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(r[i], i * i);
}

TEST(WhenAll, WaitsForSuspendedChildren) {
  Event ev;
  int finished = 0;
  auto waiter = [&]() -> Task<int> {
    co_await ev.wait();
    ++finished;
    co_return 7;
  };
  auto setter = [&]() -> Task<void> {
    ev.set();
    co_return;
  };
  auto [a, b, c] = sync_wait(when_all(waiter(), waiter(), setter()));
  EXPECT_EQ(a, 7);
  EXPECT_EQ(b, 7);
  (void)c;
  EXPECT_EQ(finished, 2);
}

TEST(WhenAll, EmptyVector) {
  auto r = sync_wait(when_all(std::vector<Task<void>>{}));
  EXPECT_TRUE(r.empty());
}

TEST(TaskGroup, JoinWaitsForAll) {
  Event go;
  int done = 0;
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    for (int i = 0; i < 100; ++i) {
      g.spawn([](Event& e, int& d) -> Task<void> {
        co_await e.wait();
        ++d;
      }(go, done));
    }
    EXPECT_EQ(g.active(), 100u);
    go.set();
    co_await g.join();
    EXPECT_EQ(g.active(), 0u);
  };
  sync_wait(body());
  EXPECT_EQ(done, 100);
}

TEST(Event, SetBeforeWaitDoesNotSuspend) {
  Event e;
  e.set();
  auto t = [&]() -> Task<int> {
    co_await e.wait();
    co_return 1;
  };
  EXPECT_EQ(sync_wait(t()), 1);
}

TEST(SyncWait, BlockedTaskAbortsInsteadOfHanging) {
  EXPECT_DEATH(
      {
        Event never;
        auto blocked = [&]() -> Task<void> { co_await never.wait(); };
        sync_wait(blocked());
      },
      "blocked");
}

}  // namespace
}  // namespace uqcow
