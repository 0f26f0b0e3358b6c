// BlockDevice: the byte-addressed storage that the qcow2 layer stands on.
//
// The raw file driver implements it; a fault-injecting layer can wrap any
// BlockDevice (it is an interface for that reason). All I/O is coroutine
// based and returns Status: 0 or -errno with a message.
//
// Contracts shared by every implementation:
// - co_read fills the whole buffer; bytes past the end of the device read as
//   zeros (like QEMU's file driver).
// - co_write writes the whole buffer, extending the device if needed.
// - With alignment() > 1 (O_DIRECT), buffers, offsets and lengths that are not
//   multiples of it are still accepted; the driver bounces them.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>

#include "engine/result.h"
#include "engine/task.h"

namespace uqcow {

// A debug event (BlockDevice::debug_event) as the device sees it: an id.
using DebugEventId = uint32_t;

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) = 0;
  virtual Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) = 0;
  // Scatter/gather forms. The iovec array may be modified by the call.
  virtual Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) = 0;
  virtual Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) = 0;
  // Makes every completed write durable (fdatasync).
  virtual Task<Status> co_flush() = 0;
  // Deallocates the range; it reads back as zeros.
  virtual Task<Status> co_discard(uint64_t offset, uint64_t len) = 0;
  // Makes the range read as zeros; `may_unmap` allows deallocating it.
  virtual Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) = 0;

  virtual Result<uint64_t> length() const = 0;
  // Bytes of storage actually allocated (st_blocks * 512 for files).
  virtual Result<uint64_t> allocated_bytes() const = 0;
  virtual Status truncate(uint64_t length) = 0;
  // Required alignment of offsets, lengths and buffer addresses for the fast
  // path (1 when the device has no requirement).
  virtual uint32_t alignment() const = 0;
  virtual bool read_only() const = 0;
  virtual const std::string& name() const = 0;
  // Drops the image locks the device holds (uring/file_lock.h). The format's
  // close() calls it once no request is in flight; the locks go as they do
  // when QEMU closes the image, not only when the object is destroyed.
  virtual void release_locks() {}

  // QEMU's BLKDBG_EVENT: the format driver is about to do the step `event`
  // (its I/O follows). The events are the format's (block/debug_event.h
  // names qcow2's as blkdebug does); a device only carries their ids. Costs
  // one load and a predictable branch unless a layer that listens (a fault
  // injector) is this device.
  void debug_event(DebugEventId event) {
    if (listens_to_debug_events_) [[unlikely]] on_debug_event(event);
  }
  template <typename Event>
    requires std::is_enum_v<Event>
  void debug_event(Event event) {
    debug_event(static_cast<DebugEventId>(event));
  }

 protected:
  // A listening implementation sets listens_to_debug_events_ and overrides
  // on_debug_event().
  virtual void on_debug_event(DebugEventId) {}
  bool listens_to_debug_events_ = false;
};

// Puts a layer over a device (a fault injector, a recorder): returns the
// device to use instead of `inner`, which it owns from then on.
using BlockDeviceWrapper =
    std::function<Result<std::unique_ptr<BlockDevice>>(std::unique_ptr<BlockDevice> inner)>;

}  // namespace uqcow
