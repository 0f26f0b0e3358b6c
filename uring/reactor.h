// Reactor: one io_uring per thread, driving the coroutines of that thread.
//
// A loop turn (run_once):
//   1. run every ready coroutine (they prepare SQEs as they hit I/O);
//   2. move requests that found the SQ full into the SQ;
//   3. submit everything prepared with one io_uring_enter, waiting for a
//      completion only if nothing is ready to run;
//   4. reap all CQEs: record each result in its operation, queue the
//      operation's coroutine on the ready queue, advance the CQ once;
//   5. run the ready coroutines.
// Coroutines are never resumed while the CQ is being walked, and a CQE is
// never read after it has been marked seen.
//
// Operation state (the Op) lives in the awaiting coroutine's frame and the
// SQE's user_data points at it, so an I/O allocates nothing. When the SQ is
// full, get_sqe does not flush: the Op goes on an intrusive pending list and
// is prepared in the next turn.
#pragma once

#include <liburing.h>

#include <cstdint>
#include <memory>

#include "engine/ready_queue.h"
#include "engine/result.h"
#include "uring/ring_setup.h"

namespace uqcow::uring {

class Reactor;

// Base of every io_uring operation. Subclasses fill the SQE in prep() and
// decide in complete() whether the operation is finished.
class Op : public Resumable {
 public:
  virtual ~Op() = default;
  // Fills `sqe` (user_data is set by the reactor).
  virtual void prep(io_uring_sqe* sqe) = 0;
  // Called from the CQE loop with cqe->res. Returns true when finished (the
  // coroutine is then queued to resume), false to be re-submitted in the next
  // turn (partial transfer, -EAGAIN, -EINTR). Must not resume anything.
  virtual bool complete(int res) = 0;

  Op* pending_next = nullptr;
};

struct ReactorOptions {
  unsigned entries = 256;  // SQ size; the CQ gets twice that
  // The io_uring setup flags asked for first; a kernel that rejects them
  // gets the fallback attempts of ring_setup_attempts().
  unsigned setup_flags = default_ring_setup_flags();
  // How each setup attempt reaches the kernel (empty: liburing). Tests put
  // rejections here.
  RingSetupFn setup;
};

struct ReactorStats {
  uint64_t submitted = 0;      // SQEs handed to the kernel
  uint64_t enters = 0;         // io_uring_enter calls (submit_and_wait)
  uint64_t completions = 0;    // CQEs reaped
  uint64_t sq_full = 0;        // ops that had to wait for SQ space
};

class Reactor {
 public:
  // Creates the ring and makes it the calling thread's current reactor.
  static Result<std::unique_ptr<Reactor>> create(ReactorOptions options = {});
  ~Reactor();
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // The reactor of the calling thread. Operations submit to it.
  static Reactor& current();
  static bool has_current();

  // One loop turn (see above). Returns false when nothing is in flight,
  // pending or ready: no coroutine on this thread can make progress.
  bool run_once();

  // Prepares `op` into an SQE now if there is room, else queues it for the
  // next turn. The SQE is submitted at the next run_once().
  void submit(Op* op);

  unsigned in_flight() const { return in_flight_; }
  const ReactorStats& stats() const { return stats_; }
  io_uring* ring() { return &ring_; }

 private:
  Reactor() = default;
  void fill_from_pending();
  unsigned reap();

  io_uring ring_{};
  bool ring_ok_ = false;
  Op* pending_head_ = nullptr;
  Op* pending_tail_ = nullptr;
  unsigned in_flight_ = 0;   // SQEs prepared or submitted, CQE not yet reaped
  ReactorStats stats_;
};

}  // namespace uqcow::uring
