#include "tests/sim/sim_scheduler.h"

#include <algorithm>

#include "tests/sim/sim_device.h"

namespace uqcow::sim {
namespace {

// Performs the effect of `req` on its storage, at the moment it completes.
void perform(SimRequest& req) {
  switch (req.kind) {
    case SimRequest::Kind::kRead:
      req.storage->read(req.offset, req.iov);
      break;
    case SimRequest::Kind::kWrite:
      req.storage->write(req.offset, req.iov);
      break;
    case SimRequest::Kind::kDiscard:
    case SimRequest::Kind::kWriteZeroes:
      req.storage->zero(req.offset, req.length);
      break;
    case SimRequest::Kind::kFlush:
      req.storage->flushed(req.flush_mark);
      break;
  }
  req.result = Status();
}

}  // namespace

SimScheduler::SimScheduler(uint64_t seed, SimDelays delays) : rng_(seed), delays_(delays) {}

void SimScheduler::submit(SimRequest& req) {
  req.id = next_id_++;
  req.eligible_at = step_;
  if (delays_.probability > 0 && std::bernoulli_distribution(delays_.probability)(rng_)) {
    req.eligible_at += std::uniform_int_distribution<uint64_t>(1, std::max<uint64_t>(1, delays_.max_steps))(rng_);
  }
  pending_.push_back(&req);
}

bool SimScheduler::run_once() {
  const bool ran = this_thread_ready_queue().drain() > 0;
  return step() || ran;
}

bool SimScheduler::step() {
  if (pending_.empty()) return false;
  auto eligible = [&] {
    return static_cast<uint64_t>(
        std::count_if(pending_.begin(), pending_.end(), [&](const SimRequest* r) { return r->eligible_at <= step_; }));
  };
  uint64_t n = eligible();
  if (n == 0) {
    // Everything is held back: time passes until the first one is due.
    step_ = (*std::min_element(pending_.begin(), pending_.end(), [](const SimRequest* a, const SimRequest* b) {
              return a->eligible_at < b->eligible_at;
            }))->eligible_at;
    n = eligible();
  }
  ++step_;
  if (n > 1) ++decisions_;
  uint64_t k = std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_);
  size_t index = 0;
  for (;; ++index) {
    if (pending_[index]->eligible_at < step_ && k-- == 0) break;
  }
  SimRequest* req = pending_[index];
  pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(index));
  perform(*req);
  ++completions_;
  for (int shift = 0; shift < 64; shift += 8) {
    order_hash_ = (order_hash_ ^ ((req->id >> shift) & 0xff)) * 0x100000001b3ull;
  }
  // `req` lives in a frame that may be gone once the queue is drained.
  this_thread_ready_queue().push(req);
  this_thread_ready_queue().drain();
  return true;
}

std::vector<const SimRequest*> SimScheduler::in_flight_changes(const SimStorage& storage) const {
  std::vector<const SimRequest*> out;
  for (const SimRequest* r : pending_) {
    if (r->storage == &storage && r->changes_storage()) out.push_back(r);
  }
  return out;
}

}  // namespace uqcow::sim
