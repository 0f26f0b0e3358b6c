// The per-thread queue of coroutines that are ready to run.
//
// Anything that wakes a coroutine from outside it (a CoMutex hand-off, a
// CoQueue wake, an Event, an io_uring completion) pushes a Resumable here
// instead of resuming inline. The event loop that owns the thread (the
// reactor, or sync_wait) drains it. This keeps stacks shallow and makes
// wake-ups safe to call from anywhere, including from inside a completion
// loop.
//
// Nodes are intrusive and live in the waiting coroutine's frame, so pushing
// never allocates.
#pragma once

#include <coroutine>

namespace uqcow {

struct Resumable {
  Resumable* next = nullptr;
  std::coroutine_handle<> handle;
};

class ReadyQueue {
 public:
  // Appends `node`; its coroutine is resumed by a later drain(), FIFO.
  void push(Resumable* node) {
    node->next = nullptr;
    if (tail_) {
      tail_->next = node;
    } else {
      head_ = node;
    }
    tail_ = node;
  }

  bool empty() const { return head_ == nullptr; }

  // Resumes queued coroutines until the queue is empty (including ones
  // queued by the coroutines it resumes). Returns how many ran.
  unsigned drain() {
    unsigned n = 0;
    while (Resumable* node = head_) {
      head_ = node->next;
      if (!head_) tail_ = nullptr;
      ++n;
      node->handle.resume();
    }
    return n;
  }

 private:
  Resumable* head_ = nullptr;
  Resumable* tail_ = nullptr;
};

// The ready queue of the calling thread.
ReadyQueue& this_thread_ready_queue();

}  // namespace uqcow
