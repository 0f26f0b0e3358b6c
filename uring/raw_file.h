// RawFile: the file driver. A BlockDevice over a regular file or block
// device, doing all I/O on the current thread's Reactor.
//
// Cache modes follow QEMU's -t: `writeback` uses the page cache, `none` opens
// with O_DIRECT (the page cache is bypassed; flush still issues fdatasync).
// With RawFileOptions::lock the file takes QEMU's OFD locks when it opens and
// releases them when it closes.
// With O_DIRECT, requests that are not aligned to alignment() are bounced
// through an aligned buffer (a read-modify-write for writes, serialised
// against other unaligned writes of this file).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "engine/co_mutex.h"
#include "uring/block_device.h"
#include "uring/file_desc.h"
#include "uring/file_lock.h"

namespace uqcow {

enum class CacheMode { kWriteback, kNone };

// Parses qemu-img's -t names: "writeback", "none" (also "directsync" and
// "writethrough" are refused: not implemented).
Result<CacheMode> parse_cache_mode(const std::string& name);

struct RawFileOptions {
  bool read_only = false;
  bool create = false;      // O_CREAT (no O_TRUNC: truncate() explicitly)
  bool exclusive = false;   // with create: fail if the file exists
  CacheMode cache = CacheMode::kWriteback;
  // QEMU's image locks (uring/file_lock.h), held for the file's lifetime;
  // unset: no locking (QEMU's locking=off). Which permissions an open takes
  // is the format layer's decision.
  std::optional<LockPerms> lock;
};

class RawFile final : public BlockDevice {
 public:
  static Result<std::unique_ptr<RawFile>> open(const std::string& path, RawFileOptions options);

  Task<Status> co_read(uint64_t offset, std::span<std::byte> buf) override;
  Task<Status> co_write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> co_readv(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_writev(uint64_t offset, std::span<iovec> iov) override;
  Task<Status> co_flush() override;
  Task<Status> co_discard(uint64_t offset, uint64_t len) override;
  Task<Status> co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;

  Result<uint64_t> length() const override;
  Result<uint64_t> allocated_bytes() const override;
  Status truncate(uint64_t length) override;
  uint32_t alignment() const override { return alignment_; }
  bool read_only() const override { return options_.read_only; }
  const std::string& name() const override { return path_; }
  void release_locks() override;

  int fd() const { return fd_.get(); }

 private:
  RawFile(std::string path, FileDesc fd, RawFileOptions options, uint32_t alignment)
      : path_(std::move(path)), fd_(std::move(fd)), options_(options), alignment_(alignment) {}
  bool aligned(uint64_t offset, uint64_t len, const void* buf) const;
  bool aligned(uint64_t offset, std::span<const iovec> iov) const;
  Task<Status> bounce_read(uint64_t offset, std::span<std::byte> buf);
  Task<Status> bounce_write(uint64_t offset, std::span<const std::byte> buf);
  Task<Status> write_zero_buffers(uint64_t offset, uint64_t len);
  Error io_error(int err, const char* what, uint64_t offset, uint64_t len) const;

  std::string path_;
  FileDesc fd_;
  RawFileOptions options_;
  uint32_t alignment_;
  CoMutex rmw_lock_;  // serialises unaligned O_DIRECT writes
};

}  // namespace uqcow
