#include "tests/sim/sim_device.h"

#include <algorithm>
#include <coroutine>
#include <cstring>
#include <utility>

namespace uqcow::sim {
namespace {

uint64_t total_length(std::span<const iovec> iov) {
  uint64_t n = 0;
  for (const iovec& v : iov) n += v.iov_len;
  return n;
}

// Parks a request in the scheduler; resumed by SimScheduler::step() (from
// the ready queue) once the request's effect has been performed.
struct Park {
  SimScheduler& scheduler;
  SimRequest& req;
  bool await_ready() noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) noexcept {
    req.handle = h;
    scheduler.submit(req);
  }
  void await_resume() noexcept {}
};

}  // namespace

// ---- SimStorage -------------------------------------------------------------

SimStorage::SimStorage(std::vector<uint8_t> initial, bool track_durability)
    : track_durability_(track_durability), mem_(std::move(initial)) {
  if (track_durability_) durable_ = mem_;
}

void SimStorage::read(uint64_t offset, std::span<const iovec> iov) const {
  for (const iovec& v : iov) {
    auto* out = static_cast<uint8_t*>(v.iov_base);
    const uint64_t in_medium = offset >= mem_.size() ? 0 : std::min<uint64_t>(v.iov_len, mem_.size() - offset);
    if (in_medium) std::memcpy(out, mem_.data() + offset, in_medium);
    std::memset(out + in_medium, 0, v.iov_len - in_medium);
    offset += v.iov_len;
  }
}

void SimStorage::write(uint64_t offset, std::span<const iovec> iov) {
  if (!track_durability_) {
    const uint64_t end = offset + total_length(iov);
    if (mem_.size() < end) mem_.resize(end);
    for (const iovec& v : iov) {
      std::memcpy(mem_.data() + offset, v.iov_base, v.iov_len);
      offset += v.iov_len;
    }
    return;
  }
  Change c{Change::Kind::kWrite, offset, total_length(iov), {}};
  c.data.reserve(c.length);
  for (const iovec& v : iov) {
    const auto* p = static_cast<const uint8_t*>(v.iov_base);
    c.data.insert(c.data.end(), p, p + v.iov_len);
  }
  apply(mem_, c, 0, c.length);
  record(std::move(c));
}

void SimStorage::zero(uint64_t offset, uint64_t length) {
  Change c{Change::Kind::kZero, offset, length, {}};
  apply(mem_, c, 0, length);
  record(std::move(c));
}

void SimStorage::truncate(uint64_t length) {
  Change c{Change::Kind::kTruncate, 0, length, {}};
  apply(mem_, c, 0, 0);
  record(std::move(c));
}

void SimStorage::record(Change c) {
  if (track_durability_) log_.push_back(std::move(c));
}

void SimStorage::flushed(uint64_t mark) {
  // Flushes may complete out of order; a flush issued earlier than one that
  // already completed has nothing left to do.
  while (durable_changes_ < mark && !log_.empty()) {
    const Change& c = log_.front();
    apply(durable_, c, 0, c.length);
    log_.pop_front();
    ++durable_changes_;
  }
}

void SimStorage::apply(std::vector<uint8_t>& medium, const Change& c, uint64_t from, uint64_t to) {
  if (c.kind == Change::Kind::kTruncate) {
    medium.resize(c.length);
    return;
  }
  if (from >= to) return;
  // A write extends the medium (up to its last byte that landed); zeroing
  // past the end does not.
  const uint64_t end = c.offset + to;
  if (c.kind == Change::Kind::kWrite) {
    if (medium.size() < end) medium.resize(end);
    std::memcpy(medium.data() + c.offset + from, c.data.data() + from, to - from);
    return;
  }
  const uint64_t stop = std::min<uint64_t>(end, medium.size());
  if (c.offset + from < stop) std::memset(medium.data() + c.offset + from, 0, stop - c.offset - from);
}

void SimStorage::apply_some(std::vector<uint8_t>& medium, const Change& c, std::mt19937_64& rng, CrashStats& stats) {
  std::bernoulli_distribution keep(0.5), tear(0.3), sector(0.5);
  if (!keep(rng)) return;
  ++stats.applied;
  if (c.kind == Change::Kind::kTruncate || c.length <= kSimSector || !tear(rng)) {
    apply(medium, c, 0, c.length);
    return;
  }
  // Torn: each 512-byte sector of the file (a partial one at either end)
  // lands or not.
  ++stats.torn;
  for (uint64_t from = 0; from < c.length;) {
    const uint64_t to = std::min(c.length, (c.offset + from) / kSimSector * kSimSector + kSimSector - c.offset);
    if (sector(rng)) apply(medium, c, from, to);
    from = to;
  }
}

std::vector<uint8_t> SimStorage::crash_image(std::mt19937_64& rng, std::span<const SimRequest* const> in_flight,
                                             CrashStats& stats) const {
  if (!track_durability_) return mem_;
  std::vector<uint8_t> medium = durable_;
  stats.candidates += log_.size() + in_flight.size();
  for (const Change& c : log_) apply_some(medium, c, rng, stats);
  for (const SimRequest* r : in_flight) {
    Change c{r->kind == SimRequest::Kind::kWrite ? Change::Kind::kWrite : Change::Kind::kZero, r->offset, r->length, {}};
    if (c.kind == Change::Kind::kWrite) {
      for (const iovec& v : r->iov) {
        const auto* p = static_cast<const uint8_t*>(v.iov_base);
        c.data.insert(c.data.end(), p, p + v.iov_len);
      }
    }
    apply_some(medium, c, rng, stats);
  }
  return medium;
}

// ---- SimDevice --------------------------------------------------------------

SimDevice::SimDevice(SimScheduler& scheduler, std::shared_ptr<SimStorage> storage, std::string name, bool read_only)
    : scheduler_(scheduler), storage_(std::move(storage)), name_(std::move(name)), read_only_(read_only) {}

Task<Status> SimDevice::submit(SimRequest::Kind kind, uint64_t offset, uint64_t length, std::span<const iovec> iov) {
  if (read_only_ && kind != SimRequest::Kind::kRead && kind != SimRequest::Kind::kFlush) {
    co_return Error(EROFS, name_ + " is read-only");
  }
  SimRequest req;
  req.kind = kind;
  req.storage = storage_.get();
  req.offset = offset;
  req.length = length;
  req.iov = iov;
  if (kind == SimRequest::Kind::kFlush) req.flush_mark = storage_->changes();
  co_await Park{scheduler_, req};
  co_return std::move(req.result);
}

Task<Status> SimDevice::co_read(uint64_t offset, std::span<std::byte> buf) {
  iovec iov{buf.data(), buf.size()};
  co_return co_await submit(SimRequest::Kind::kRead, offset, buf.size(), std::span<const iovec>(&iov, 1));
}

Task<Status> SimDevice::co_write(uint64_t offset, std::span<const std::byte> buf) {
  iovec iov{const_cast<std::byte*>(buf.data()), buf.size()};
  co_return co_await submit(SimRequest::Kind::kWrite, offset, buf.size(), std::span<const iovec>(&iov, 1));
}

Task<Status> SimDevice::co_readv(uint64_t offset, std::span<iovec> iov) {
  co_return co_await submit(SimRequest::Kind::kRead, offset, total_length(iov), iov);
}

Task<Status> SimDevice::co_writev(uint64_t offset, std::span<iovec> iov) {
  co_return co_await submit(SimRequest::Kind::kWrite, offset, total_length(iov), iov);
}

Task<Status> SimDevice::co_flush() { return submit(SimRequest::Kind::kFlush, 0, 0, {}); }

Task<Status> SimDevice::co_discard(uint64_t offset, uint64_t len) {
  return submit(SimRequest::Kind::kDiscard, offset, len, {});
}

Task<Status> SimDevice::co_write_zeroes(uint64_t offset, uint64_t len, bool) {
  return submit(SimRequest::Kind::kWriteZeroes, offset, len, {});
}

Status SimDevice::truncate(uint64_t length) {
  if (read_only_) return Error(EROFS, name_ + " is read-only");
  storage_->truncate(length);
  return Status();
}

}  // namespace uqcow::sim
