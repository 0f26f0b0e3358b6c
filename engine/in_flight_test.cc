#include "engine/in_flight.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "engine/event.h"
#include "engine/sync_wait.h"
#include "engine/task_group.h"

namespace uqcow {
namespace {

// A request: waits to be admitted, holds a ticket until `done` is set.
Task<void> request(InFlightTracker& t, Event& done, std::vector<int>& log, int id) {
  if (!t.admitting()) co_await t.wait_admitted();
  InFlightTracker::Ticket ticket(t);
  log.push_back(id);
  co_await done.wait();
  log.push_back(-id);
}

TEST(InFlightTracker, DrainWaitsForRequestsAndHoldsBackNewOnes) {
  InFlightTracker t;
  Event first_done, second_done, drained;
  std::vector<int> log;
  auto drainer = [&]() -> Task<void> {
    co_await t.drain();
    DrainedSection section(t);
    log.push_back(100);  // inside the section: no request in flight
    EXPECT_EQ(t.in_flight(), 0u);
    co_await drained.wait();
  };
  auto body = [&]() -> Task<void> {
    TaskGroup g;
    g.spawn(request(t, first_done, log, 1));
    g.spawn(drainer());
    g.spawn(request(t, second_done, log, 2));  // arrives during the drain
    EXPECT_EQ(t.in_flight(), 1u);
    EXPECT_FALSE(t.admitting());
    first_done.set();
    second_done.set();
    drained.set();
    co_await g.join();
  };
  sync_wait(body());
  // Request 2 started only after the section closed.
  EXPECT_EQ(log, (std::vector<int>{1, -1, 100, 2, -2}));
  EXPECT_TRUE(t.admitting());
}

TEST(InFlightTracker, GracePeriodEndsWhenOlderRequestsFinish) {
  InFlightTracker t;
  EXPECT_TRUE(t.grace_period_over(t.stamp()));  // nothing in flight
  auto a = std::make_unique<InFlightTracker::Ticket>(t);
  auto b = std::make_unique<InFlightTracker::Ticket>(t);
  const uint64_t stamp = t.stamp();  // a and b may still use the resource
  InFlightTracker::Ticket c(t);      // c started after: it cannot
  EXPECT_FALSE(t.grace_period_over(stamp));
  a.reset();  // out of order: the oldest is gone first
  EXPECT_FALSE(t.grace_period_over(stamp));
  b.reset();
  EXPECT_TRUE(t.grace_period_over(stamp));
  EXPECT_FALSE(t.grace_period_over(t.stamp()));  // c is older than now
  EXPECT_EQ(t.in_flight(), 1u);
}

TEST(InFlightTracker, MiddleTicketLeavesListIntact) {
  InFlightTracker t;
  std::vector<std::unique_ptr<InFlightTracker::Ticket>> tickets;
  for (int i = 0; i < 5; ++i) tickets.push_back(std::make_unique<InFlightTracker::Ticket>(t));
  const uint64_t after_second = tickets[2]->seq();
  tickets[2].reset();
  tickets[4].reset();
  tickets[0].reset();
  EXPECT_EQ(t.in_flight(), 2u);
  EXPECT_FALSE(t.grace_period_over(after_second));  // ticket 1 is still older
  tickets[1].reset();
  EXPECT_TRUE(t.grace_period_over(after_second));
  tickets[3].reset();
  EXPECT_EQ(t.in_flight(), 0u);
}

TEST(InFlightTracker, NestedDrainedSections) {
  InFlightTracker t;
  auto body = [&]() -> Task<void> {
    co_await t.drain();
    {
      DrainedSection outer(t);
      co_await t.drain();  // nothing in flight: returns at once
      { DrainedSection inner(t); }
      EXPECT_FALSE(t.admitting());
    }
    EXPECT_TRUE(t.admitting());
  };
  sync_wait(body());
}

}  // namespace
}  // namespace uqcow
