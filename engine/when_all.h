// when_all: run several tasks concurrently and resume when all have finished.
//
//   auto [a, b] = co_await when_all(read_a(), read_b());   // tuple
//   std::vector<Status> r = co_await when_all(std::move(tasks));
//
// Each task starts in turn (running until its first suspension). The awaiting
// coroutine is resumed by symmetric transfer from the final_suspend of the
// task that finishes last, or does not suspend at all if every task finished
// synchronously. Void results appear as std::monostate in tuples.
#pragma once

#include <coroutine>
#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "engine/task.h"

namespace uqcow {
namespace detail {

struct WhenAllCounter {
  std::size_t remaining;
  std::coroutine_handle<> parent;
};

template <class T>
using NonVoid = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

// A child coroutine that awaits one task and stores its result.
template <class T>
struct WhenAllChild {
  struct promise_type {
    WhenAllCounter* counter = nullptr;
    static void* operator new(std::size_t size) { return frame_pool::allocate(size); }
    static void operator delete(void* p, std::size_t size) noexcept {
      frame_pool::deallocate(p, size);
    }
    WhenAllChild get_return_object() {
      return WhenAllChild{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    struct Final {
      bool await_ready() noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<promise_type> h) noexcept {
        WhenAllCounter* c = h.promise().counter;
        if (--c->remaining == 0) return c->parent;
        return std::noop_coroutine();
      }
      void await_resume() noexcept {}
    };
    Final final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };

  explicit WhenAllChild(std::coroutine_handle<promise_type> h) : h_(h) {}
  WhenAllChild(WhenAllChild&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  WhenAllChild(const WhenAllChild&) = delete;
  ~WhenAllChild() {
    if (h_) h_.destroy();
  }
  void start(WhenAllCounter* c) {
    h_.promise().counter = c;
    h_.resume();
  }

  std::coroutine_handle<promise_type> h_;
};

template <class T>
WhenAllChild<T> make_child(Task<T> task, std::optional<NonVoid<T>>& out) {
  if constexpr (std::is_void_v<T>) {
    co_await std::move(task);
    out.emplace();
  } else {
    out.emplace(co_await std::move(task));
  }
}

// Awaiter shared by both forms: starts every child, suspends unless all
// finished synchronously.
template <class Children>
struct WhenAllAwaiter {
  Children& children;
  WhenAllCounter counter;
  bool await_ready() noexcept { return counter.remaining == 1; }
  bool await_suspend(std::coroutine_handle<> parent) noexcept {
    counter.parent = parent;
    for (auto& c : children) c.start(&counter);
    return --counter.remaining != 0;
  }
  void await_resume() noexcept {}
};

}  // namespace detail

template <class T>
Task<std::vector<detail::NonVoid<T>>> when_all(std::vector<Task<T>> tasks) {
  using V = detail::NonVoid<T>;
  std::vector<std::optional<V>> slots(tasks.size());
  std::vector<detail::WhenAllChild<T>> children;
  children.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    children.push_back(detail::make_child(std::move(tasks[i]), slots[i]));
  }
  co_await detail::WhenAllAwaiter<decltype(children)>{children, {children.size() + 1, {}}};
  std::vector<V> out;
  out.reserve(slots.size());
  for (auto& s : slots) out.push_back(std::move(*s));
  co_return out;
}

template <class... Ts>
Task<std::tuple<detail::NonVoid<Ts>...>> when_all(Task<Ts>... tasks) {
  std::tuple<std::optional<detail::NonVoid<Ts>>...> slots;
  auto build = [&]<std::size_t... I>(std::index_sequence<I...>) {
    // Children of different types, started uniformly through a small array of
    // type-erased starters.
    return std::make_tuple(detail::make_child(std::move(tasks), std::get<I>(slots))...);
  };
  auto children = build(std::index_sequence_for<Ts...>{});
  struct Starter {
    std::coroutine_handle<> h;
    void (*set)(std::coroutine_handle<>, detail::WhenAllCounter*);
    void start(detail::WhenAllCounter* c) { set(h, c); }
  };
  std::vector<Starter> starters;
  std::apply(
      [&](auto&... c) {
        (starters.push_back(Starter{c.h_, [](std::coroutine_handle<> h, detail::WhenAllCounter* ctr) {
                                      using P = typename std::remove_reference_t<
                                          decltype(c)>::promise_type;
                                      auto typed = std::coroutine_handle<P>::from_address(h.address());
                                      typed.promise().counter = ctr;
                                      typed.resume();
                                    }}),
         ...);
      },
      children);
  co_await detail::WhenAllAwaiter<decltype(starters)>{starters, {sizeof...(Ts) + 1, {}}};
  co_return std::apply([](auto&... s) { return std::make_tuple(std::move(*s)...); }, slots);
}

}  // namespace uqcow
