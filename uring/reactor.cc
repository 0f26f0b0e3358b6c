#include "uring/reactor.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "uring/ring_setup.h"

namespace uqcow::uring {
namespace {
thread_local Reactor* current_reactor = nullptr;
}

Result<std::unique_ptr<Reactor>> Reactor::create(ReactorOptions options) {
  if (current_reactor) {
    return Error(EBUSY, "this thread already has a reactor (one ring per thread)");
  }
  std::unique_ptr<Reactor> r(new Reactor());
  auto accepted = setup_ring(&r->ring_, options.entries, options.entries * 2,
                             ring_setup_attempts(options.setup_flags), options.setup);
  if (!accepted.ok()) return std::move(accepted).error();
  r->ring_ok_ = true;
  current_reactor = r.get();
  return r;
}

Reactor::~Reactor() {
  if (in_flight_ != 0 || pending_head_) {
    std::fprintf(stderr, "uqcow: reactor destroyed with %u operations in flight\n", in_flight_);
    std::abort();
  }
  if (ring_ok_) io_uring_queue_exit(&ring_);
  if (current_reactor == this) current_reactor = nullptr;
}

Reactor& Reactor::current() {
  if (!current_reactor) {
    std::fputs("uqcow: I/O issued on a thread without a reactor\n", stderr);
    std::abort();
  }
  return *current_reactor;
}

bool Reactor::has_current() { return current_reactor != nullptr; }

void Reactor::submit(Op* op) {
  if (!pending_head_) {
    if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) {
      op->prep(sqe);
      io_uring_sqe_set_data(sqe, op);
      ++in_flight_;
      return;
    }
  }
  // SQ full (or older requests are already waiting): keep FIFO order.
  ++stats_.sq_full;
  op->pending_next = nullptr;
  if (pending_tail_) {
    pending_tail_->pending_next = op;
  } else {
    pending_head_ = op;
  }
  pending_tail_ = op;
}

void Reactor::fill_from_pending() {
  while (Op* op = pending_head_) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return;
    pending_head_ = op->pending_next;
    if (!pending_head_) pending_tail_ = nullptr;
    op->prep(sqe);
    io_uring_sqe_set_data(sqe, op);
    ++in_flight_;
  }
}

unsigned Reactor::reap() {
  ReadyQueue& ready = this_thread_ready_queue();
  unsigned head;
  unsigned seen = 0;
  io_uring_cqe* cqe;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    auto* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
    int res = cqe->res;
    ++seen;
    --in_flight_;
    if (op->complete(res)) {
      ready.push(op);
    } else {
      // Re-armed: goes back through the pending list so it is prepared in
      // order with everything else, never from inside this loop.
      op->pending_next = nullptr;
      if (pending_tail_) {
        pending_tail_->pending_next = op;
      } else {
        pending_head_ = op;
      }
      pending_tail_ = op;
    }
  }
  io_uring_cq_advance(&ring_, seen);
  stats_.completions += seen;
  return seen;
}

bool Reactor::run_once() {
  ReadyQueue& ready = this_thread_ready_queue();
  ready.drain();
  fill_from_pending();
  unsigned prepared = io_uring_sq_ready(&ring_);
  if (in_flight_ == 0 && !pending_head_ && ready.empty()) return false;

  // Block for a completion only when no coroutine is ready to run. Prepared
  // SQEs count as in flight; submit_and_wait submits them before waiting.
  unsigned wait_nr = ready.empty() && in_flight_ > 0 ? 1 : 0;
  if (prepared > 0 || wait_nr > 0) {
    int ret;
    do {
      ret = io_uring_submit_and_wait(&ring_, wait_nr);
    } while (ret == -EINTR);
    ++stats_.enters;
    if (ret >= 0) {
      stats_.submitted += static_cast<unsigned>(ret);
    } else if (ret != -EBUSY && ret != -EAGAIN) {
      std::fprintf(stderr, "uqcow: io_uring_submit_and_wait: %d\n", ret);
      std::abort();
    }
  }
  reap();
  ready.drain();
  return true;
}

}  // namespace uqcow::uring
