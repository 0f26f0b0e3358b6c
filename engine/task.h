// Task<T>: a lazy, move-only coroutine that produces a T.
//
// A Task does nothing until it is awaited (or handed to sync_wait / a
// TaskGroup). Awaiting it starts it inside await_suspend. Two ways back:
// - it finishes before its first suspension: await_suspend returns false and
//   the awaiter simply continues, so a loop over a million synchronously
//   completing tasks never nests native frames (whatever the compiler does
//   with symmetric transfer at -O0 or under ASan);
// - it suspends (on I/O, a lock...): when it later finishes, final_suspend
//   transfers straight to the awaiter (symmetric transfer).
// The awaiter owns the Task object and therefore its frame: destroying the
// Task destroys the frame.
//
// Errors travel as values (Status / Result<T>); exceptions are not part of
// the contract, and one escaping a task terminates the process.
#pragma once

#include <coroutine>
#include <cstddef>
#include <exception>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>

#include "engine/frame_pool.h"

namespace uqcow {

template <class T = void>
class Task;

namespace detail {

struct PromiseBase {
  // kStarting: being run from inside the awaiter's await_suspend;
  // kFinishedInline: finished while still kStarting;
  // kDetached: suspended at least once, the awaiter has returned.
  enum class Start : unsigned char { kDetached, kStarting, kFinishedInline };

  std::coroutine_handle<> continuation = std::noop_coroutine();
  Start start = Start::kDetached;

  static void* operator new(std::size_t size) { return frame_pool::allocate(size); }
  static void operator delete(void* p, std::size_t size) noexcept {
    frame_pool::deallocate(p, size);
  }

  std::suspend_always initial_suspend() noexcept { return {}; }

  struct FinalAwaiter {
    bool await_ready() noexcept { return false; }
    template <class P>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) noexcept {
      PromiseBase& p = h.promise();
      if (p.start == Start::kStarting) {
        p.start = Start::kFinishedInline;  // the awaiter continues by itself
        return std::noop_coroutine();
      }
      return p.continuation;
    }
    void await_resume() noexcept {}
  };
  FinalAwaiter final_suspend() noexcept { return {}; }

  void unhandled_exception() noexcept { std::terminate(); }
};

template <class T>
struct Promise : PromiseBase {
  std::optional<T> value;

  Task<T> get_return_object() noexcept;
  template <class U>
    requires std::is_convertible_v<U&&, T>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
};

template <>
struct Promise<void> : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() noexcept {}
};

}  // namespace detail

template <class T>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::Promise<T>;
  using value_type = T;

  Task() = default;
  explicit Task(std::coroutine_handle<promise_type> h) : h_(h) {}
  Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  Task& operator=(Task&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { reset(); }

  bool valid() const { return bool(h_); }
  bool done() const { return h_ && h_.done(); }

  // co_await task: suspends the caller and starts the task (symmetric
  // transfer); the caller is resumed from the task's final_suspend.
  auto operator co_await() && noexcept {
    struct Awaiter {
      std::coroutine_handle<promise_type> h;
      bool await_ready() noexcept { return !h || h.done(); }
      // Runs the task until it finishes or first suspends. Returns false
      // (caller continues at once) if it finished; otherwise the caller is
      // resumed from the task's final_suspend.
      bool await_suspend(std::coroutine_handle<> caller) noexcept {
        auto& p = h.promise();
        p.continuation = caller;
        p.start = detail::PromiseBase::Start::kStarting;
        h.resume();
        if (p.start == detail::PromiseBase::Start::kFinishedInline) return false;
        p.start = detail::PromiseBase::Start::kDetached;
        return true;
      }
      T await_resume() {
        if constexpr (!std::is_void_v<T>) return std::move(*h.promise().value);
      }
    };
    return Awaiter{h_};
  }

  // For runners (sync_wait, TaskGroup, when_all): the raw handle.
  std::coroutine_handle<promise_type> handle() const { return h_; }

 private:
  void reset() {
    if (h_) h_.destroy();
    h_ = {};
  }
  std::coroutine_handle<promise_type> h_;
};

namespace detail {
template <class T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}
}  // namespace detail

}  // namespace uqcow
