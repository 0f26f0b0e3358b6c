// CoMutex: an asynchronous mutex for coroutines on one thread, after QEMU's
// CoMutex.
//
// - FIFO hand-off: unlock() with waiters passes ownership straight to the
//   oldest waiter; the mutex never becomes free in between, so nobody can
//   barge in and there is no thundering herd.
// - Waiter nodes live in the awaiting coroutine's frame: locking allocates
//   nothing.
// - The woken waiter is pushed on the thread's ready queue, not resumed
//   inside unlock(): the unlocking coroutine keeps running to its next
//   suspension point first.
//
// Not thread-safe: one CoMutex belongs to one reactor thread.
#pragma once

#include <cassert>
#include <coroutine>
#include <cstdint>

#include "engine/ready_queue.h"

namespace uqcow {

class CoMutex {
 public:
  CoMutex() = default;
  CoMutex(const CoMutex&) = delete;
  CoMutex& operator=(const CoMutex&) = delete;
  ~CoMutex() { assert(!head_ && "CoMutex destroyed with waiters"); }

  class LockAwaiter : private Resumable {
   public:
    explicit LockAwaiter(CoMutex& m) : mutex_(m) {}
    // Does not suspend when the mutex is free (it is taken at once).
    bool await_ready() noexcept {
      ++mutex_.acquisitions_;
      if (!mutex_.locked_) {
        mutex_.locked_ = true;
        return true;
      }
      return false;
    }
    // Suspends at the tail of the wait list. Resumed from the ready queue
    // after the previous holder's unlock() handed ownership over.
    void await_suspend(std::coroutine_handle<> h) noexcept {
      handle = h;
      next = nullptr;
      if (mutex_.tail_) {
        mutex_.tail_->next = this;
      } else {
        mutex_.head_ = this;
      }
      mutex_.tail_ = this;
    }
    void await_resume() noexcept {}

   private:
    friend class CoMutex;
    CoMutex& mutex_;
  };

  // RAII ownership, returned by co_await scoped_lock(). unlock() may be called
  // early; the destructor then does nothing.
  class [[nodiscard]] Guard {
   public:
    explicit Guard(CoMutex* m) : m_(m) {}
    Guard(Guard&& o) noexcept : m_(o.m_) { o.m_ = nullptr; }
    // Releases what this guard holds, then takes over `o`'s ownership (the
    // usual way to re-acquire: `guard = co_await m.scoped_lock();`).
    Guard& operator=(Guard&& o) noexcept {
      if (this != &o) {
        unlock();
        m_ = o.m_;
        o.m_ = nullptr;
      }
      return *this;
    }
    ~Guard() { unlock(); }
    void unlock() {
      if (m_) m_->unlock();
      m_ = nullptr;
    }
    bool owns_lock() const { return m_ != nullptr; }

   private:
    CoMutex* m_;
  };

  class ScopedLockAwaiter {
   public:
    explicit ScopedLockAwaiter(CoMutex& m) : inner_(m), m_(m) {}
    bool await_ready() noexcept { return inner_.await_ready(); }
    void await_suspend(std::coroutine_handle<> h) noexcept { inner_.await_suspend(h); }
    Guard await_resume() noexcept { return Guard(&m_); }

   private:
    LockAwaiter inner_;
    CoMutex& m_;
  };

  // co_await lock(): acquire; see LockAwaiter for where it suspends.
  LockAwaiter lock() { return LockAwaiter(*this); }
  // co_await scoped_lock(): acquire and get a Guard that unlocks on scope exit.
  ScopedLockAwaiter scoped_lock() { return ScopedLockAwaiter(*this); }

  bool try_lock() {
    if (locked_) return false;
    ++acquisitions_;
    locked_ = true;
    return true;
  }

  // Releases the mutex, or hands it to the oldest waiter, which is queued to
  // run on this thread's ready queue (still owning the mutex).
  void unlock() {
    assert(locked_);
    if (LockAwaiter* w = head_) {
      head_ = static_cast<LockAwaiter*>(w->next);
      if (!head_) tail_ = nullptr;
      this_thread_ready_queue().push(w);
      return;
    }
    locked_ = false;
  }

  bool locked() const { return locked_; }
  bool has_waiters() const { return head_ != nullptr; }
  // How many times the mutex was taken (or waited for): lets benchmarks
  // show that a path takes no lock.
  uint64_t acquisitions() const { return acquisitions_; }

 private:
  bool locked_ = false;
  uint64_t acquisitions_ = 0;
  LockAwaiter* head_ = nullptr;
  LockAwaiter* tail_ = nullptr;
};

}  // namespace uqcow
