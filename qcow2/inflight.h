// Allocations in flight: QEMU's list of QCowL2Meta (s->cluster_allocs).
//
// An allocating or compressed write registers the guest range whose L2
// entries it will link before it releases the metadata lock to write its
// data, and unregisters once the entries are linked (or the write failed).
// Invariant, relied upon by link_l2: while a range is registered, nothing
// else changes its L2 entries. Allocating and compressed writes wait for it
// (wait_for_dependencies), zero writes and discards too
// (wait_for_overlapping); whole-image operations drain every request.
//
// Every member runs on the image's reactor thread, under the metadata lock
// the caller passes in.
#pragma once

#include <cstdint>

#include "engine/co_mutex.h"
#include "engine/co_queue.h"
#include "engine/result.h"
#include "engine/task.h"

namespace uqcow::qcow2 {

class AllocationsInFlight {
 public:
  // One registered guest range [start, end) (cluster aligned), registered
  // for the object's lifetime. Its destructor unregisters it and wakes every
  // request waiting for it; they run once the destroying coroutine reaches
  // its next suspension point (CoQueue), and re-take the lock first.
  class Allocation {
   public:
    Allocation(AllocationsInFlight& list, uint64_t start, uint64_t end);
    ~Allocation();
    Allocation(const Allocation&) = delete;
    Allocation& operator=(const Allocation&) = delete;

    uint64_t start() const { return start_; }
    uint64_t end() const { return end_; }

   private:
    friend class AllocationsInFlight;
    AllocationsInFlight& list_;
    uint64_t start_, end_;
    CoQueue waiters_;
    Allocation* prev_ = nullptr;
    Allocation* next_ = nullptr;
  };

  explicit AllocationsInFlight(uint64_t cluster_size) : cluster_size_(cluster_size) {}
  AllocationsInFlight(const AllocationsInFlight&) = delete;
  AllocationsInFlight& operator=(const AllocationsInFlight&) = delete;

  // QEMU's handle_dependencies for a request at guest [offset, offset + len),
  // called and returning with `lock` held through `guard`:
  // - OK: no allocation in flight covers the request's first cluster; `len`
  //   is shortened to end before the first one that covers a later cluster.
  // - EAGAIN: one covered the first cluster; this waited until it was
  //   unregistered (releasing the lock while waiting, resumed by the
  //   Allocation's destructor). Everything planned before must be planned
  //   again: restart with the original length.
  Task<Status> wait_for_dependencies(uint64_t offset, uint64_t& len, CoMutex& lock, CoMutex::Guard& guard);

  // Returns, with `lock` held through `guard`, once no allocation in flight
  // overlaps guest bytes [start, end), releasing the lock while it waits.
  Task<void> wait_for_overlapping(uint64_t start, uint64_t end, CoMutex& lock, CoMutex::Guard& guard);

  bool empty() const { return head_ == nullptr; }

 private:
  uint64_t start_of_cluster(uint64_t offset) const { return offset & ~(cluster_size_ - 1); }

  const uint64_t cluster_size_;
  Allocation* head_ = nullptr;
};

}  // namespace uqcow::qcow2
