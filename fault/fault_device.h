// FaultInjectingDevice: a BlockDevice that wraps another one and fails its
// requests according to a FaultInjector's rules (fault_rule.h), keyed on
// the debug events the format driver announces on it. QEMU's blkdebug.
//
// Every request (read, write, their vector forms, flush, discard, write
// zeroes) first asks the injector; a failed request never reaches the inner
// device. length(), truncate() and the other synchronous calls pass through
// (LayeredBlockDevice).
#pragma once

#include <memory>

#include "fault/fault_rule.h"
#include "uring/layered_device.h"

namespace uqcow {

class FaultInjectingDevice final : public LayeredBlockDevice {
 public:
  FaultInjectingDevice(std::unique_ptr<BlockDevice> inner, std::shared_ptr<FaultInjector> injector);

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override;
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_flush() override;
  Task<Status> co_discard(uint64_t offset, uint64_t len) override;
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;

  FaultInjector& injector() { return *injector_; }

 protected:
  // Counts the event for the rules, then passes it down.
  void on_debug_event(DebugEventId event) override;

 private:
  // OK, or the injected error. Suspends (one reactor turn: resumed by the
  // completion of a no-op request) before returning an error unless the
  // rule says immediately=on.
  Task<Status> check(const char* what);

  std::shared_ptr<FaultInjector> injector_;
};

// The open-options hook (OpenOptions::wrap_file) that puts a
// FaultInjectingDevice with `injector` over the image's file; while the
// injector has no rules it leaves the file as it is.
BlockDeviceWrapper fault_injection(std::shared_ptr<FaultInjector> injector);

}  // namespace uqcow
