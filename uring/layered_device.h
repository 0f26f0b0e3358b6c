// LayeredBlockDevice: a BlockDevice that stands on another one and forwards
// every call to it, as Seastar's layered_file_impl does for files. A layer
// (fault injection, write recording) derives from it and overrides only what
// it changes.
//
// The I/O calls return the wrapped device's own task (no coroutine frame of
// the layer's), so an unchanged call costs one virtual call. Debug events
// are passed down too: a listening device under the layer still hears them.
#pragma once

#include <memory>
#include <utility>

#include "uring/block_device.h"

namespace uqcow {

class LayeredBlockDevice : public BlockDevice {
 public:
  explicit LayeredBlockDevice(std::unique_ptr<BlockDevice> inner) : inner_(std::move(inner)) {
    listens_to_debug_events_ = true;
  }

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override {
    return inner_->co_read(offset, buf);
  }
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override {
    return inner_->co_write(offset, buf);
  }
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override { return inner_->co_readv(offset, iov); }
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override { return inner_->co_writev(offset, iov); }
  Task<Status> co_flush() override { return inner_->co_flush(); }
  Task<Status> co_discard(uint64_t offset, uint64_t len) override { return inner_->co_discard(offset, len); }
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    return inner_->co_write_zeroes(offset, len, may_unmap);
  }

  Result<uint64_t> length() const override { return inner_->length(); }
  Result<uint64_t> allocated_bytes() const override { return inner_->allocated_bytes(); }
  Status truncate(uint64_t length) override { return inner_->truncate(length); }
  uint32_t alignment() const override { return inner_->alignment(); }
  bool read_only() const override { return inner_->read_only(); }
  const std::string& name() const override { return inner_->name(); }
  void release_locks() override { inner_->release_locks(); }

 protected:
  void on_debug_event(DebugEventId event) override { inner_->debug_event(event); }

  BlockDevice& inner() { return *inner_; }
  const BlockDevice& inner() const { return *inner_; }

 private:
  std::unique_ptr<BlockDevice> inner_;
};

}  // namespace uqcow
