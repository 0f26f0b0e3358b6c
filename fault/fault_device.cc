#include "fault/fault_device.h"

#include "block/debug_event.h"
#include "uring/ops.h"

namespace uqcow {

FaultInjectingDevice::FaultInjectingDevice(std::unique_ptr<BlockDevice> inner,
                                           std::shared_ptr<FaultInjector> injector)
    : LayeredBlockDevice(std::move(inner)), injector_(std::move(injector)) {}

BlockDeviceWrapper fault_injection(std::shared_ptr<FaultInjector> injector) {
  return [injector = std::move(injector)](std::unique_ptr<BlockDevice> inner)
             -> Result<std::unique_ptr<BlockDevice>> {
    if (injector->empty()) return inner;
    return std::unique_ptr<BlockDevice>(std::make_unique<FaultInjectingDevice>(std::move(inner), injector));
  };
}

void FaultInjectingDevice::on_debug_event(DebugEventId event) {
  injector_->on_event(static_cast<BlkDebugEvent>(event));
  // A device under us may listen too (e.g. a recorder): pass on.
  LayeredBlockDevice::on_debug_event(event);
}

Task<Status> FaultInjectingDevice::check(const char* what) {
  const FaultRule* rule = injector_->take_fault();
  if (!rule) co_return Status();
  if (!rule->immediately) (void)co_await uring::nop();
  co_return errno_error(rule->error, inner().name() + ": " + what + " failed by injected fault (" +
                                         std::string(blkdebug_event_name(rule->event)) + ")");
}

Task<Status> FaultInjectingDevice::co_read(uint64_t offset, std::span<std::byte> buf) {
  UQ_CO_TRY(co_await check("read"));
  co_return co_await inner().co_read(offset, buf);
}

Task<Status> FaultInjectingDevice::co_write(uint64_t offset, std::span<const std::byte> buf) {
  UQ_CO_TRY(co_await check("write"));
  co_return co_await inner().co_write(offset, buf);
}

Task<Status> FaultInjectingDevice::co_readv(uint64_t offset, std::span<iovec> iov) {
  UQ_CO_TRY(co_await check("read"));
  co_return co_await inner().co_readv(offset, iov);
}

Task<Status> FaultInjectingDevice::co_writev(uint64_t offset, std::span<iovec> iov) {
  UQ_CO_TRY(co_await check("write"));
  co_return co_await inner().co_writev(offset, iov);
}

Task<Status> FaultInjectingDevice::co_flush() {
  UQ_CO_TRY(co_await check("flush"));
  co_return co_await inner().co_flush();
}

Task<Status> FaultInjectingDevice::co_discard(uint64_t offset, uint64_t len) {
  UQ_CO_TRY(co_await check("discard"));
  co_return co_await inner().co_discard(offset, len);
}

Task<Status> FaultInjectingDevice::co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  UQ_CO_TRY(co_await check("write zeroes"));
  co_return co_await inner().co_write_zeroes(offset, len, may_unmap);
}

}  // namespace uqcow
