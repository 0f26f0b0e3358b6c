// TaskGroup: the owner of spawned (fire-and-forget) tasks.
//
// spawn(task) starts the task at once (it runs until its first suspension)
// and returns; the group keeps count. co_await join() suspends until every
// spawned task has finished. A spawned task's frame frees itself when it
// finishes, so nothing leaks as long as the group is joined before it is
// destroyed (asserted).
#pragma once

#include <cassert>
#include <coroutine>
#include <cstddef>

#include "engine/co_queue.h"
#include "engine/task.h"

namespace uqcow {

class TaskGroup {
 public:
  TaskGroup() = default;
  TaskGroup(const TaskGroup&) = delete;
  TaskGroup& operator=(const TaskGroup&) = delete;
  ~TaskGroup() { assert(active_ == 0 && "TaskGroup destroyed before join()"); }

  void spawn(Task<void> task) {
    ++active_;
    run(std::move(task), this);
  }

  std::size_t active() const { return active_; }

  // Suspends until active() == 0; resumed from the ready queue when the last
  // spawned task finishes.
  Task<void> join() {
    while (active_ != 0) co_await idle_.wait();
  }

 private:
  struct Detached {
    struct promise_type {
      static void* operator new(std::size_t size) { return frame_pool::allocate(size); }
      static void operator delete(void* p, std::size_t size) noexcept {
        frame_pool::deallocate(p, size);
      }
      Detached get_return_object() noexcept { return {}; }
      std::suspend_never initial_suspend() noexcept { return {}; }
      std::suspend_never final_suspend() noexcept { return {}; }
      void return_void() noexcept {}
      void unhandled_exception() noexcept { std::terminate(); }
    };
  };

  static Detached run(Task<void> task, TaskGroup* group) {
    co_await std::move(task);
    if (--group->active_ == 0) group->idle_.wake_all();
  }

  std::size_t active_ = 0;
  CoQueue idle_;
};

}  // namespace uqcow
