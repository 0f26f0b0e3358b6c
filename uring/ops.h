// Awaitable io_uring operations.
//
// Each awaitable is an Op that lives in the awaiting coroutine's frame. It
// suspends in await_suspend (after handing itself to the current thread's
// Reactor) and is resumed from the reactor's ready queue in the loop turn that
// reaped its completion. None of them allocates.
//
// Result conventions: the data-transfer ops (read, write, readv, writev)
// retry short transfers, -EAGAIN and -EINTR internally and return 0 when the
// whole range was transferred, or -errno. At end of file `read` zero-fills
// the rest (EofPolicy::kZeroFill) or returns -ENODATA (kError), so callers can
// tell EOF from a device error. Other ops return the raw cqe->res (>= 0
// success, -errno failure).
#pragma once

#include <linux/time_types.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "uring/reactor.h"

namespace uqcow::uring {

// Common awaiter plumbing: submit on suspend, return `result` on resume.
template <class Derived>
class Awaitable : public Op {
 public:
  bool await_ready() noexcept { return false; }
  // Suspends after queueing the SQE; resumed by the reactor's ready queue.
  void await_suspend(std::coroutine_handle<> h) noexcept {
    handle = h;
    Reactor::current().submit(this);
  }
  int await_resume() noexcept { return result; }

 protected:
  int result = 0;
};

// A single-shot op: finished on its first CQE with the raw result, except
// that -EINTR and -EAGAIN are retried.
template <class Derived>
class SimpleOp : public Awaitable<Derived> {
 public:
  bool complete(int res) override {
    if (res == -EINTR || res == -EAGAIN) return false;
    this->result = res;
    return true;
  }
};

enum class EofPolicy { kError, kZeroFill };

// pread of the whole buffer. EOF: zero-fills the rest (kZeroFill, the file
// driver's policy, as QEMU's file-posix) or returns -ENODATA (kError).
// `direct` (O_DIRECT): a short read can only mean EOF, since retrying at the
// unaligned remainder would fail with -EINVAL.
class ReadOp : public Awaitable<ReadOp> {
 public:
  ReadOp(int fd, void* buf, size_t len, uint64_t offset, EofPolicy eof = EofPolicy::kError,
         bool fixed_file = false, bool direct = false)
      : fd_(fd), buf_(static_cast<std::byte*>(buf)), len_(len), offset_(offset), eof_(eof),
        fixed_(fixed_file), direct_(direct) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_read(sqe, fd_, buf_ + done_, static_cast<unsigned>(len_ - done_), offset_ + done_);
    if (fixed_) sqe->flags |= IOSQE_FIXED_FILE;
  }
  bool complete(int res) override;

 private:
  int fd_;
  std::byte* buf_;
  size_t len_;
  uint64_t offset_;
  size_t done_ = 0;
  EofPolicy eof_;
  bool fixed_;
  bool direct_;
};

// pwrite of the whole buffer; returns 0 or -errno.
class WriteOp : public Awaitable<WriteOp> {
 public:
  WriteOp(int fd, const void* buf, size_t len, uint64_t offset, bool fixed_file = false)
      : fd_(fd), buf_(static_cast<const std::byte*>(buf)), len_(len), offset_(offset),
        fixed_(fixed_file) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_write(sqe, fd_, buf_ + done_, static_cast<unsigned>(len_ - done_), offset_ + done_);
    if (fixed_) sqe->flags |= IOSQE_FIXED_FILE;
  }
  bool complete(int res) override;

 private:
  int fd_;
  const std::byte* buf_;
  size_t len_;
  uint64_t offset_;
  size_t done_ = 0;
  bool fixed_;
};

// preadv/pwritev of a whole iovec array. The array is consumed: on a short
// transfer its entries are advanced in place. EOF on readv zero-fills.
class VectorOp : public Awaitable<VectorOp> {
 public:
  enum class Dir { kRead, kWrite };
  VectorOp(Dir dir, int fd, std::span<iovec> iov, uint64_t offset, bool fixed_file = false)
      : dir_(dir), fd_(fd), iov_(iov), offset_(offset), fixed_(fixed_file) {}
  void prep(io_uring_sqe* sqe) override {
    if (dir_ == Dir::kRead) {
      io_uring_prep_readv(sqe, fd_, iov_.data(), static_cast<unsigned>(iov_.size()), offset_);
    } else {
      io_uring_prep_writev(sqe, fd_, iov_.data(), static_cast<unsigned>(iov_.size()), offset_);
    }
    if (fixed_) sqe->flags |= IOSQE_FIXED_FILE;
  }
  bool complete(int res) override;

 private:
  bool advance(size_t n);  // drops n bytes from the front; true if all done
  Dir dir_;
  int fd_;
  std::span<iovec> iov_;
  uint64_t offset_;
  bool fixed_;
};

class FsyncOp : public SimpleOp<FsyncOp> {
 public:
  FsyncOp(int fd, bool datasync, bool fixed_file = false)
      : fd_(fd), datasync_(datasync), fixed_(fixed_file) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_fsync(sqe, fd_, datasync_ ? IORING_FSYNC_DATASYNC : 0);
    if (fixed_) sqe->flags |= IOSQE_FIXED_FILE;
  }

 private:
  int fd_;
  bool datasync_;
  bool fixed_;
};

class FallocateOp : public SimpleOp<FallocateOp> {
 public:
  FallocateOp(int fd, int mode, uint64_t offset, uint64_t len, bool fixed_file = false)
      : fd_(fd), mode_(mode), offset_(offset), len_(len), fixed_(fixed_file) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_fallocate(sqe, fd_, mode_, offset_, len_);
    if (fixed_) sqe->flags |= IOSQE_FIXED_FILE;
  }

 private:
  int fd_;
  int mode_;
  uint64_t offset_;
  uint64_t len_;
  bool fixed_;
};

// Completes after `ns` nanoseconds; returns 0 (the kernel's -ETIME is the
// normal outcome and is mapped to 0).
class TimeoutOp : public Awaitable<TimeoutOp> {
 public:
  explicit TimeoutOp(uint64_t ns) {
    ts_.tv_sec = static_cast<long long>(ns / 1000000000ull);
    ts_.tv_nsec = static_cast<long long>(ns % 1000000000ull);
  }
  void prep(io_uring_sqe* sqe) override { io_uring_prep_timeout(sqe, &ts_, 0, 0); }
  bool complete(int res) override {
    result = (res == -ETIME) ? 0 : res;
    return true;
  }

 private:
  __kernel_timespec ts_{};
};

class NopOp : public SimpleOp<NopOp> {
 public:
  void prep(io_uring_sqe* sqe) override { io_uring_prep_nop(sqe); }
};

// Socket operations for servers. recv and send are single-shot (they return
// the byte count); use recv_exact / send_all in socket.h for whole messages.
class AcceptOp : public SimpleOp<AcceptOp> {
 public:
  explicit AcceptOp(int fd) : fd_(fd) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_accept(sqe, fd_, nullptr, nullptr, SOCK_CLOEXEC);
  }

 private:
  int fd_;
};

class RecvOp : public SimpleOp<RecvOp> {
 public:
  RecvOp(int fd, void* buf, size_t len) : fd_(fd), buf_(buf), len_(len) {}
  void prep(io_uring_sqe* sqe) override { io_uring_prep_recv(sqe, fd_, buf_, len_, 0); }

 private:
  int fd_;
  void* buf_;
  size_t len_;
};

class SendOp : public SimpleOp<SendOp> {
 public:
  SendOp(int fd, const void* buf, size_t len, int flags = MSG_NOSIGNAL)
      : fd_(fd), buf_(buf), len_(len), flags_(flags) {}
  void prep(io_uring_sqe* sqe) override { io_uring_prep_send(sqe, fd_, buf_, len_, flags_); }

 private:
  int fd_;
  const void* buf_;
  size_t len_;
  int flags_;
};

// Convenience spellings: `int r = co_await uring::read(fd, buf, len, off);`
inline ReadOp read(int fd, void* buf, size_t len, uint64_t offset,
                   EofPolicy eof = EofPolicy::kError) {
  return ReadOp(fd, buf, len, offset, eof);
}
inline WriteOp write(int fd, const void* buf, size_t len, uint64_t offset) {
  return WriteOp(fd, buf, len, offset);
}
inline VectorOp readv(int fd, std::span<iovec> iov, uint64_t offset) {
  return VectorOp(VectorOp::Dir::kRead, fd, iov, offset);
}
inline VectorOp writev(int fd, std::span<iovec> iov, uint64_t offset) {
  return VectorOp(VectorOp::Dir::kWrite, fd, iov, offset);
}
inline FsyncOp fsync(int fd) { return FsyncOp(fd, false); }
inline FsyncOp fdatasync(int fd) { return FsyncOp(fd, true); }
inline FallocateOp fallocate(int fd, int mode, uint64_t offset, uint64_t len) {
  return FallocateOp(fd, mode, offset, len);
}
inline TimeoutOp sleep_for_ns(uint64_t ns) { return TimeoutOp(ns); }
inline NopOp nop() { return NopOp(); }
inline AcceptOp accept(int fd) { return AcceptOp(fd); }
inline RecvOp recv(int fd, void* buf, size_t len) { return RecvOp(fd, buf, len); }
inline SendOp send(int fd, const void* buf, size_t len) { return SendOp(fd, buf, len); }

}  // namespace uqcow::uring

namespace uqcow::uring {

// Cancels a pending TimeoutOp (which then completes with -ECANCELED).
// Returns 0, or -ENOENT if the timeout had already fired.
class TimeoutRemoveOp : public SimpleOp<TimeoutRemoveOp> {
 public:
  explicit TimeoutRemoveOp(TimeoutOp* target) : target_(target) {}
  void prep(io_uring_sqe* sqe) override {
    io_uring_prep_timeout_remove(sqe, reinterpret_cast<uint64_t>(static_cast<Op*>(target_)), 0);
  }

 private:
  TimeoutOp* target_;
};

}  // namespace uqcow::uring
