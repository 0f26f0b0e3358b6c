// CoQueue: a wait queue of coroutines, after QEMU's CoQueue.
//
// co_await queue.wait() suspends until wake_one()/wake_all(). The usual
// pattern is a condition loop:
//     while (!condition()) co_await queue.wait();
// Woken coroutines run from the thread's ready queue, in FIFO order, after
// the waker reaches its own next suspension point. Waiter nodes live in the
// waiters' frames. With a CoMutex, use wait(mutex): it releases the mutex
// while waiting and re-takes it before returning (like qemu_co_queue_wait).
#pragma once

#include <coroutine>

#include "engine/co_mutex.h"
#include "engine/ready_queue.h"
#include "engine/task.h"

namespace uqcow {

class CoQueue {
 public:
  CoQueue() = default;
  CoQueue(const CoQueue&) = delete;
  CoQueue& operator=(const CoQueue&) = delete;

  class WaitAwaiter : private Resumable {
   public:
    explicit WaitAwaiter(CoQueue& q) : q_(q) {}
    bool await_ready() noexcept { return false; }
    // Suspends at the tail of the queue; resumed from the ready queue after a
    // wake_one()/wake_all() that reached this waiter.
    void await_suspend(std::coroutine_handle<> h) noexcept {
      handle = h;
      next = nullptr;
      if (q_.tail_) {
        q_.tail_->next = this;
      } else {
        q_.head_ = this;
      }
      q_.tail_ = this;
    }
    void await_resume() noexcept {}

   private:
    friend class CoQueue;
    CoQueue& q_;
  };

  WaitAwaiter wait() { return WaitAwaiter(*this); }

  // Releases `mutex` (which the caller holds), waits for a wake, re-acquires
  // `mutex`, returns. The caller must re-check its condition afterwards.
  Task<void> wait(CoMutex& mutex) {
    WaitAwaiter w(*this);
    mutex.unlock();
    co_await w;
    co_await mutex.lock();
  }

  // Queues the oldest waiter to run. Returns false if there was none.
  bool wake_one() {
    WaitAwaiter* w = head_;
    if (!w) return false;
    head_ = static_cast<WaitAwaiter*>(w->next);
    if (!head_) tail_ = nullptr;
    this_thread_ready_queue().push(w);
    return true;
  }

  // Queues every current waiter to run. Returns how many.
  unsigned wake_all() {
    unsigned n = 0;
    while (wake_one()) ++n;
    return n;
  }

  bool empty() const { return head_ == nullptr; }

 private:
  WaitAwaiter* head_ = nullptr;
  WaitAwaiter* tail_ = nullptr;
};

}  // namespace uqcow
