// SimStorage and SimDevice: a BlockDevice over an in-memory byte vector whose
// requests complete in the order a SimScheduler picks.
//
// SimStorage is the medium. It keeps two images:
// - `bytes()`: what reads see, every completed change applied in completion
//   order;
// - the durable image: what survives a crash for certain. A flush makes
//   durable every change that COMPLETED BEFORE THE FLUSH WAS ISSUED (a
//   change that completes while the flush is in flight is not covered, as
//   with fdatasync). Completed changes not yet durable stay in a log, in
//   completion order.
// crash_image() draws what a power failure could leave: the durable image,
// then a random subset of the logged changes (in completion order) and of
// the changes still in flight (in issue order), each applied whole or TORN
// at 512-byte sector granularity of the file (some sectors land, others
// not).
//
// SimDevice is the BlockDevice the qcow2 layer sees. Storage is shared
// (std::shared_ptr) so that a backing file can be opened by several images,
// and a copy of an image can be checked while the image stays open.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "tests/sim/sim_scheduler.h"
#include "uring/block_device.h"

namespace uqcow::sim {

constexpr uint64_t kSimSector = 512;

// What one crash_image() kept of the changes that were not durable.
struct CrashStats {
  uint64_t candidates = 0;  // logged + in-flight changes
  uint64_t applied = 0;     // kept whole or in part
  uint64_t torn = 0;        // kept only in part
};

class SimStorage {
 public:
  // `initial` is the content before anything runs; it is durable. Without
  // `track_durability` no log is kept (cheaper), and crash_image() returns
  // only what reads see.
  explicit SimStorage(std::vector<uint8_t> initial, bool track_durability = true);

  const std::vector<uint8_t>& bytes() const { return mem_; }
  const std::vector<uint8_t>& durable() const { return durable_; }
  // Changes completed so far (writes, zero writes, discards, truncates).
  uint64_t changes() const { return durable_changes_ + log_.size(); }

  // Effects, performed by the scheduler when it completes a request.
  // Bytes past the end read as zeros; writes extend the medium; zeroing
  // past the end does not.
  void read(uint64_t offset, std::span<const iovec> iov) const;
  void write(uint64_t offset, std::span<const iovec> iov);
  void zero(uint64_t offset, uint64_t length);
  void truncate(uint64_t length);  // immediate (not a request), logged
  // A flush issued when changes() was `mark` completed: changes [0, mark)
  // are durable.
  void flushed(uint64_t mark);

  // The medium a power failure now could leave (see the top of the file).
  std::vector<uint8_t> crash_image(std::mt19937_64& rng, std::span<const SimRequest* const> in_flight,
                                   CrashStats& stats) const;

 private:
  struct Change {
    enum class Kind { kWrite, kZero, kTruncate } kind;
    uint64_t offset = 0;
    uint64_t length = 0;  // kTruncate: the new length
    std::vector<uint8_t> data;
  };
  static void apply(std::vector<uint8_t>& medium, const Change& c, uint64_t from, uint64_t to);
  static void apply_some(std::vector<uint8_t>& medium, const Change& c, std::mt19937_64& rng, CrashStats& stats);
  void record(Change c);

  bool track_durability_;
  std::vector<uint8_t> mem_;
  std::vector<uint8_t> durable_;
  std::deque<Change> log_;        // completed, not durable, completion order
  uint64_t durable_changes_ = 0;  // changes folded into durable_
};

class SimDevice final : public BlockDevice {
 public:
  SimDevice(SimScheduler& scheduler, std::shared_ptr<SimStorage> storage, std::string name, bool read_only);

  // Each request suspends until the scheduler picks it; it is resumed from
  // the ready queue inside SimScheduler::step().
  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override;
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_flush() override;
  Task<Status> co_discard(uint64_t offset, uint64_t len) override;
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;

  Result<uint64_t> length() const override { return storage_->bytes().size(); }
  Result<uint64_t> allocated_bytes() const override { return storage_->bytes().size(); }
  Status truncate(uint64_t length) override;
  uint32_t alignment() const override { return 1; }
  bool read_only() const override { return read_only_; }
  const std::string& name() const override { return name_; }

  SimStorage& storage() { return *storage_; }

 private:
  Task<Status> submit(SimRequest::Kind kind, uint64_t offset, uint64_t length, std::span<const iovec> iov);

  SimScheduler& scheduler_;
  std::shared_ptr<SimStorage> storage_;
  std::string name_;
  bool read_only_;
};

}  // namespace uqcow::sim
