// SimScheduler: the deterministic event loop of the simulation.
//
// Every request a SimDevice receives (read, write, flush, discard, zero
// write) suspends its coroutine and is parked here. step() picks ONE parked
// request with the seeded RNG, performs its effect on the device's memory at
// that moment (reads copy at completion, writes land at completion), queues
// the coroutine on this thread's ready queue and drains the queue. Nothing
// else completes I/O: no wall clock, no threads, no io_uring. So the
// completion order is a function of the seed and of the requests submitted,
// and a failing seed replays exactly.
//
// Delays: a request may be held back for a number of steps when it is
// submitted (drawn from the seed), so that some requests stay in flight
// while many later ones complete. A held request only completes before its
// time when nothing else is eligible.
//
// Several SimDevices (an image and its backing file) share one scheduler:
// their requests interleave in one order.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "engine/ready_queue.h"
#include "engine/result.h"

namespace uqcow::sim {

class SimStorage;

// One device request, parked in the scheduler until step() picks it. Lives
// in the frame of the SimDevice coroutine that awaits it.
struct SimRequest : Resumable {
  enum class Kind { kRead, kWrite, kFlush, kDiscard, kWriteZeroes };
  Kind kind = Kind::kRead;
  SimStorage* storage = nullptr;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::span<const iovec> iov;  // kRead/kWrite: the caller's buffers
  uint64_t flush_mark = 0;     // kFlush: storage->changes() when issued
  uint64_t id = 0;             // submission order, from 1
  uint64_t eligible_at = 0;    // the step from which it may complete
  Status result;

  bool changes_storage() const { return kind == Kind::kWrite || kind == Kind::kDiscard || kind == Kind::kWriteZeroes; }
};

// How requests are held back; drawn per seed.
struct SimDelays {
  double probability = 0.1;  // chance that a submitted request is held back
  uint64_t max_steps = 64;   // a held request waits up to this many steps
};

class SimScheduler {
 public:
  explicit SimScheduler(uint64_t seed, SimDelays delays = {});
  SimScheduler(const SimScheduler&) = delete;
  SimScheduler& operator=(const SimScheduler&) = delete;

  // Parks `req` (its handle set by the awaiter); it completes in a later
  // step(). Called by SimDevice only.
  void submit(SimRequest& req);

  // The EventLoop of sync_wait(loop, task): drains the ready queue, then
  // completes one request (step). Returns false when nothing was ready and
  // nothing is parked (the awaited task can never finish).
  bool run_once();

  // Completes one parked request picked by the RNG among the eligible ones,
  // performs its effect, resumes its coroutine (through the ready queue) and
  // drains the ready queue. Returns false if nothing was parked.
  bool step();

  size_t pending() const { return pending_.size(); }
  // Parked requests that change `storage`, in submission order (what a
  // crash may leave half done).
  std::vector<const SimRequest*> in_flight_changes(const SimStorage& storage) const;

  // Requests completed, and how many of those were a choice among two or
  // more eligible requests (an interleaving decision).
  uint64_t completions() const { return completions_; }
  uint64_t decisions() const { return decisions_; }
  // FNV-1a over the ids of the completed requests, in completion order: two
  // runs with the same seed and workload have the same hash.
  uint64_t order_hash() const { return order_hash_; }

 private:
  std::mt19937_64 rng_;
  SimDelays delays_;
  std::vector<SimRequest*> pending_;  // submission order
  uint64_t next_id_ = 1;
  uint64_t step_ = 0;
  uint64_t completions_ = 0;
  uint64_t decisions_ = 0;
  uint64_t order_hash_ = 0xcbf29ce484222325ull;
};

}  // namespace uqcow::sim
