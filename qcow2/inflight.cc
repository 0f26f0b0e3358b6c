#include "qcow2/inflight.h"

namespace uqcow::qcow2 {

AllocationsInFlight::Allocation::Allocation(AllocationsInFlight& list, uint64_t start, uint64_t end)
    : list_(list), start_(start), end_(end) {
  next_ = list_.head_;
  if (next_) next_->prev_ = this;
  list_.head_ = this;
}

AllocationsInFlight::Allocation::~Allocation() {
  if (prev_) prev_->next_ = next_; else list_.head_ = next_;
  if (next_) next_->prev_ = prev_;
  waiters_.wake_all();
}

Task<Status> AllocationsInFlight::wait_for_dependencies(uint64_t offset, uint64_t& len, CoMutex& lock,
                                                        CoMutex::Guard& guard) {
  const uint64_t start = start_of_cluster(offset);
  for (Allocation* a = head_; a; a = a->next_) {
    const uint64_t end = start_of_cluster(offset + len + cluster_size_ - 1);
    if (a->end_ <= start || a->start_ >= end) continue;
    if (a->start_ <= start) {
      guard.unlock();
      co_await a->waiters_.wait();  // resumed by ~Allocation() of the owner
      guard = co_await lock.scoped_lock();
      co_return Error(EAGAIN, "waited for an allocation in flight");
    }
    len = a->start_ - offset;
  }
  co_return Status();
}

Task<void> AllocationsInFlight::wait_for_overlapping(uint64_t start, uint64_t end, CoMutex& lock,
                                                     CoMutex::Guard& guard) {
  auto overlapping = [&]() -> Allocation* {
    for (Allocation* a = head_; a; a = a->next_) {
      if (a->start_ < end && start < a->end_) return a;
    }
    return nullptr;
  };
  while (Allocation* a = overlapping()) {
    guard.unlock();
    co_await a->waiters_.wait();  // resumed by ~Allocation() of the owner
    guard = co_await lock.scoped_lock();
  }
}

}  // namespace uqcow::qcow2
