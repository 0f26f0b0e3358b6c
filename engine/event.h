// Event: a one-shot signal. co_await event.wait() returns at once if the event
// is set, else suspends until set(). set() queues every waiter on the thread's
// ready queue; later waits do not suspend. reset() re-arms it (only with no
// waiters).
#pragma once

#include <cassert>

#include "engine/co_queue.h"

namespace uqcow {

class Event {
 public:
  struct WaitAwaiter {
    Event& e;
    CoQueue::WaitAwaiter inner;
    bool await_ready() noexcept { return e.set_; }
    // Suspends until set(); resumed from the ready queue after set().
    void await_suspend(std::coroutine_handle<> h) noexcept { inner.await_suspend(h); }
    void await_resume() noexcept {}
  };

  WaitAwaiter wait() { return WaitAwaiter{*this, CoQueue::WaitAwaiter(waiters_)}; }

  void set() {
    set_ = true;
    waiters_.wake_all();
  }
  void reset() {
    assert(waiters_.empty());
    set_ = false;
  }
  bool is_set() const { return set_; }

 private:
  bool set_ = false;
  CoQueue waiters_;
};

}  // namespace uqcow
