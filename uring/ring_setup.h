// Setting an io_uring up with fallback over its setup flags.
//
// A kernel that does not know a setup flag (or refuses a combination, such
// as DEFER_TASKRUN without SINGLE_ISSUER) rejects the whole io_uring_setup
// with -EINVAL. The hints below only tune a ring that one thread drives, so
// a ring works without them: the setup asks for everything first, then drops
// the hints one at a time, the one that needs the newest kernel first, until
// the kernel accepts. Flags that are not hints (CQSIZE, ...) are never
// dropped. This runs once per Reactor, never on the I/O path.
#pragma once

#include <liburing.h>

#include <functional>
#include <span>
#include <vector>

#include "engine/result.h"

namespace uqcow::uring {

// The droppable hints, in the order they are dropped (newest kernel first):
// DEFER_TASKRUN (6.1), SINGLE_ISSUER (6.0), COOP_TASKRUN (5.19).
std::span<const unsigned> ring_setup_hints();

// What Reactor::create asks for by default: a CQ of its own size (twice the
// SQ) plus the hints for a ring used by one thread.
unsigned default_ring_setup_flags();

// The flag words to try for `wanted`, in order: `wanted` itself, then with
// one more of its hints dropped each time (ring_setup_hints() order). Each
// word differs from the one before; the last holds no hint, and every word
// keeps all of `wanted`'s bits that are not hints.
std::vector<unsigned> ring_setup_attempts(unsigned wanted);

// One io_uring setup call with liburing's contract (io_uring_queue_init_params):
// 0 with `ring` initialised, or -errno with nothing to clean up.
using RingSetupFn = std::function<int(unsigned entries, io_uring* ring, io_uring_params* params)>;

// Sets `ring` up with the first of `attempts` that `setup` accepts (the
// kernel's io_uring_queue_init_params when `setup` is empty). An attempt with
// IORING_SETUP_CQSIZE asks for `cq_entries`. -EINVAL moves on to the next
// attempt; any other error, or -EINVAL from the last attempt, is returned at
// once as an Error naming io_uring_queue_init. Returns the flags accepted.
Result<unsigned> setup_ring(io_uring* ring, unsigned entries, unsigned cq_entries,
                            std::span<const unsigned> attempts, const RingSetupFn& setup = {});

}  // namespace uqcow::uring
