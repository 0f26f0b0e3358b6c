// InFlightTracker: the requests in flight on one object (an image), with
// drained sections and grace periods. After QEMU's in_flight counter and
// bdrv_drained_begin/end, plus the grace periods of RCU.
//
// - Every request holds a Ticket for its whole duration. The Ticket lives in
//   the request's coroutine frame; registering and unregistering are O(1)
//   pointer updates and never allocate.
// - Drained section: co_await drain() stops admitting new requests and
//   returns once every registered request has finished; end_drain() admits
//   them again. Requests check admitting() before taking a Ticket and, if
//   not, co_await wait_admitted(). Sections nest.
// - Grace periods: tickets are numbered in the order they were taken, and
//   stay in that order in the list, so the head is the oldest request in
//   flight. Something that new requests can no longer reach (say, a host
//   cluster whose L2 entry was just cleared) may still be used by requests
//   that started earlier; take stamp() when it becomes unreachable, and reuse
//   it only once grace_period_over(stamp): every request that could have
//   reached it has finished.
//
// Not thread-safe: one tracker belongs to one reactor thread.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>

#include "engine/co_queue.h"
#include "engine/task.h"

namespace uqcow {

class InFlightTracker {
 public:
  InFlightTracker() = default;
  InFlightTracker(const InFlightTracker&) = delete;
  InFlightTracker& operator=(const InFlightTracker&) = delete;
  ~InFlightTracker() { assert(!head_ && "InFlightTracker destroyed with requests in flight"); }

  // One request in flight, from construction to destruction. Never moved.
  class Ticket {
   public:
    explicit Ticket(InFlightTracker& t) : tracker_(t), seq_(t.next_seq_++) {
      prev_ = t.tail_;
      if (t.tail_) t.tail_->next_ = this; else t.head_ = this;
      t.tail_ = this;
      ++t.count_;
    }
    ~Ticket() {
      InFlightTracker& t = tracker_;
      if (prev_) prev_->next_ = next_; else t.head_ = next_;
      if (next_) next_->prev_ = prev_; else t.tail_ = prev_;
      --t.count_;
      if (!t.head_) t.idle_.wake_all();  // a drain() may be waiting
    }
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    uint64_t seq() const { return seq_; }

   private:
    friend class InFlightTracker;
    InFlightTracker& tracker_;
    const uint64_t seq_;
    Ticket* prev_ = nullptr;
    Ticket* next_ = nullptr;
  };

  // False inside a drained section: a new request must wait_admitted().
  bool admitting() const { return drain_depth_ == 0; }

  // Suspends until no drained section is open; resumed from the ready queue
  // by the end_drain() that closes the last one.
  Task<void> wait_admitted() {
    while (drain_depth_ != 0) co_await admit_.wait();
  }

  // Opens a drained section and suspends until no request is in flight;
  // resumed from the ready queue by the destructor of the last Ticket. Must
  // not be called from inside a request (it would wait for itself).
  Task<void> drain() {
    ++drain_depth_;
    while (head_) co_await idle_.wait();
  }

  // Closes a drained section; the last one re-admits waiting requests.
  void end_drain() {
    assert(drain_depth_ > 0);
    if (--drain_depth_ == 0) admit_.wake_all();
  }

  // The stamp of "now": every request in flight started before it.
  uint64_t stamp() const { return next_seq_; }
  // True once every request that started before `stamp` has finished.
  bool grace_period_over(uint64_t stamp) const { return !head_ || head_->seq_ >= stamp; }

  std::size_t in_flight() const { return count_; }

 private:
  Ticket* head_ = nullptr;  // oldest request in flight
  Ticket* tail_ = nullptr;  // newest
  std::size_t count_ = 0;
  uint64_t next_seq_ = 1;
  unsigned drain_depth_ = 0;
  CoQueue idle_;   // drain() waiting for the last ticket
  CoQueue admit_;  // requests waiting for the drained section to end
};

// Closes a drained section on scope exit (co_await tracker.drain() first).
class [[nodiscard]] DrainedSection {
 public:
  explicit DrainedSection(InFlightTracker& t) : t_(&t) {}
  DrainedSection(const DrainedSection&) = delete;
  DrainedSection& operator=(const DrainedSection&) = delete;
  ~DrainedSection() {
    if (t_) t_->end_drain();
  }
 private:
  InFlightTracker* t_;
};

}  // namespace uqcow
