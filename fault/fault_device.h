// FaultInjectingDevice: a BlockDevice that wraps another one and fails its
// requests according to a FaultInjector's rules (fault_rule.h), keyed on
// the debug events the format driver announces on it. QEMU's blkdebug.
//
// Every request (read, write, their vector forms, flush, discard, write
// zeroes) first asks the injector; a failed request never reaches the inner
// device. length(), truncate() and the other synchronous calls pass through.
#pragma once

#include <memory>

#include "fault/fault_rule.h"
#include "uring/block_device.h"

namespace uqcow {

class FaultInjectingDevice final : public BlockDevice {
 public:
  FaultInjectingDevice(std::unique_ptr<BlockDevice> inner, std::shared_ptr<FaultInjector> injector);

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override;
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_flush() override;
  Task<Status> co_discard(uint64_t offset, uint64_t len) override;
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;

  Result<uint64_t> length() const override { return inner_->length(); }
  Result<uint64_t> allocated_bytes() const override { return inner_->allocated_bytes(); }
  Status truncate(uint64_t length) override { return inner_->truncate(length); }
  uint32_t alignment() const override { return inner_->alignment(); }
  bool read_only() const override { return inner_->read_only(); }
  const std::string& name() const override { return inner_->name(); }
  void release_locks() override { inner_->release_locks(); }

  FaultInjector& injector() { return *injector_; }

 protected:
  void on_debug_event(BlkDebugEvent event) override;

 private:
  // OK, or the injected error. Suspends (one reactor turn: resumed by the
  // completion of a no-op request) before returning an error unless the
  // rule says immediately=on.
  Task<Status> check(const char* what);

  std::unique_ptr<BlockDevice> inner_;
  std::shared_ptr<FaultInjector> injector_;
};

}  // namespace uqcow
