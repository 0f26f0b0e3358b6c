#include "uring/ring_setup.h"

#include <cerrno>

namespace uqcow::uring {
namespace {

// Older liburing headers lack the newer flags; a flag the header does not
// define is never asked for.
constexpr unsigned kHints[] = {
#ifdef IORING_SETUP_DEFER_TASKRUN
    IORING_SETUP_DEFER_TASKRUN,
#endif
#ifdef IORING_SETUP_SINGLE_ISSUER
    IORING_SETUP_SINGLE_ISSUER,
#endif
    IORING_SETUP_COOP_TASKRUN,
};

}  // namespace

std::span<const unsigned> ring_setup_hints() { return kHints; }

unsigned default_ring_setup_flags() {
  unsigned flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN;
#ifdef IORING_SETUP_SINGLE_ISSUER
  flags |= IORING_SETUP_SINGLE_ISSUER;
#endif
  return flags;
}

std::vector<unsigned> ring_setup_attempts(unsigned wanted) {
  std::vector<unsigned> attempts{wanted};
  unsigned flags = wanted;
  for (unsigned hint : kHints) {
    if (!(flags & hint)) continue;
    flags &= ~hint;
    attempts.push_back(flags);
  }
  return attempts;
}

Result<unsigned> setup_ring(io_uring* ring, unsigned entries, unsigned cq_entries,
                            std::span<const unsigned> attempts, const RingSetupFn& setup) {
  int ret = -EINVAL;
  for (unsigned flags : attempts) {
    io_uring_params params{};
    params.flags = flags;
    if (flags & IORING_SETUP_CQSIZE) params.cq_entries = cq_entries;
    ret = setup ? setup(entries, ring, &params) : io_uring_queue_init_params(entries, ring, &params);
    if (ret == 0) return flags;
    // Anything but EINVAL (ENOMEM, EMFILE, EPERM when io_uring is disabled)
    // does not depend on the flags: asking for less would not help.
    if (ret != -EINVAL) break;
  }
  return errno_error(ret, "io_uring_queue_init");
}

}  // namespace uqcow::uring
