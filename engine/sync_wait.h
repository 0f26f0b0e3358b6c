// sync_wait: drive a Task to completion from plain (non-coroutine) code.
//
// sync_wait(loop, task) runs the task and then turns `loop` (anything with
// run_once(), e.g. a uring::Reactor) until the task has finished.
// sync_wait(task) has no event source: it only drains the thread's ready
// queue, so it suits tasks that wait on each other (CoMutex, Event) but never
// on I/O. If such a task blocks forever, sync_wait aborts with a message
// rather than hang.
#pragma once

#include <concepts>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <type_traits>
#include <utility>

#include "engine/ready_queue.h"
#include "engine/task.h"

namespace uqcow {

template <class L>
concept EventLoop = requires(L& l) {
  { l.run_once() } -> std::convertible_to<bool>;
};

namespace detail {

// A tiny eager coroutine that awaits the task and stores its outcome. It is
// owned by sync_wait's stack frame and destroyed there.
struct SyncWaitRunner {
  struct promise_type {
    static void* operator new(std::size_t size) { return frame_pool::allocate(size); }
    static void operator delete(void* p, std::size_t size) noexcept {
      frame_pool::deallocate(p, size);
    }
    SyncWaitRunner get_return_object() {
      return SyncWaitRunner{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
  explicit SyncWaitRunner(std::coroutine_handle<promise_type> handle) : h(handle) {}
  SyncWaitRunner(const SyncWaitRunner&) = delete;
  // Clang 14 moves the object get_return_object() returned into the
  // caller's result (GCC elides it); the moved-from runner owns nothing.
  SyncWaitRunner(SyncWaitRunner&& other) noexcept : h(std::exchange(other.h, nullptr)) {}
  ~SyncWaitRunner() {
    if (h) h.destroy();
  }
  bool done() const { return h.done(); }
  std::coroutine_handle<promise_type> h;
};

template <class T>
struct Outcome {
  std::optional<T> value;
  T take() { return std::move(*value); }
};
template <>
struct Outcome<void> {
  void take() {}
};

template <class T>
SyncWaitRunner run_task(Task<T>& task, Outcome<T>& out) {
  if constexpr (std::is_void_v<T>) {
    co_await std::move(task);
  } else {
    out.value.emplace(co_await std::move(task));
  }
}

[[noreturn]] inline void deadlock() {
  std::fputs("uqcow: sync_wait: the task is blocked and nothing can wake it\n", stderr);
  std::abort();
}

}  // namespace detail

// Turns `loop` until the task finishes. loop.run_once() returns false when it
// has nothing in flight and nothing ready, i.e. the task can never finish;
// that is reported and aborts instead of hanging.
template <EventLoop L, class T>
T sync_wait(L& loop, Task<T> task) {
  detail::Outcome<T> out;
  detail::SyncWaitRunner runner = detail::run_task(task, out);
  this_thread_ready_queue().drain();
  while (!runner.done()) {
    if (!loop.run_once()) detail::deadlock();
  }
  return out.take();
}

template <class T>
T sync_wait(Task<T> task) {
  detail::Outcome<T> out;
  detail::SyncWaitRunner runner = detail::run_task(task, out);
  this_thread_ready_queue().drain();
  if (!runner.done()) detail::deadlock();
  return out.take();
}

}  // namespace uqcow
