// Whole-message socket I/O on the current thread's reactor.
#pragma once

#include <cstddef>

#include "engine/result.h"
#include "engine/task.h"

namespace uqcow::nbd {

// Receives exactly `len` bytes, looping over short receives. Suspends in
// each RecvOp; resumed from the reactor's ready queue. ECONNRESET when the
// peer closes before the whole message arrived.
Task<Status> recv_exact(int fd, void* buf, size_t len);
// Sends all `len` bytes, looping over short sends (MSG_NOSIGNAL: a closed
// peer gives EPIPE, never SIGPIPE). Suspends like recv_exact.
Task<Status> send_all(int fd, const void* buf, size_t len);

}  // namespace uqcow::nbd
