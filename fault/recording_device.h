// RecordingDevice: a BlockDevice that passes every request to the device it
// wraps and records, in a WriteLog, each request that changes the device
// (writes with their data, write zeroes, discards, truncates) and each flush,
// with logical issue and completion times. Crash-consistency tests replay
// the log to build the images a power failure could have left.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "uring/layered_device.h"

namespace uqcow {

struct RecordedOp {
  enum class Kind { kWrite, kWriteZeroes, kDiscard, kTruncate, kFlush };
  Kind kind = Kind::kWrite;
  uint64_t offset = 0;
  uint64_t length = 0;        // bytes (kTruncate: the new file length)
  std::vector<uint8_t> data;  // kWrite only
  uint64_t issued = 0;        // WriteLog clock when the request started
  uint64_t completed = 0;     // ... and when it finished (0: still in flight)
  bool ok = false;            // the wrapped device reported success
};

// The log. Its clock ticks at every issue and completion, so that for any
// two requests one can tell whether the first finished before the second
// started (the only ordering a flush guarantees anything about).
class WriteLog {
 public:
  uint64_t tick() { return ++clock_; }
  uint64_t now() const { return clock_; }
  std::vector<RecordedOp>& ops() { return ops_; }
  const std::vector<RecordedOp>& ops() const { return ops_; }

 private:
  uint64_t clock_ = 0;
  std::vector<RecordedOp> ops_;
};

class RecordingDevice final : public LayeredBlockDevice {
 public:
  RecordingDevice(std::unique_ptr<BlockDevice> inner, std::shared_ptr<WriteLog> log);

  // Reads, the synchronous calls and debug events pass through
  // (LayeredBlockDevice); what changes the device is recorded.
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_flush() override;
  Task<Status> co_discard(uint64_t offset, uint64_t len) override;
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status truncate(uint64_t length) override;

 private:
  // Appends an op issued now; returns its index (ops_ may reallocate, so
  // completions find the op by index, never by pointer).
  size_t begin(RecordedOp::Kind kind, uint64_t offset, uint64_t length);
  void end(size_t index, const Status& status);

  std::shared_ptr<WriteLog> log_;
};

}  // namespace uqcow
