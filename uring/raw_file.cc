#include "uring/raw_file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "uring/aligned_buffer.h"
#include "uring/ops.h"

namespace uqcow {

Result<CacheMode> parse_cache_mode(const std::string& name) {
  if (name == "writeback") return CacheMode::kWriteback;
  if (name == "none") return CacheMode::kNone;
  return Error(EINVAL, "cache mode '" + name + "' is not supported (use writeback or none)");
}

Result<std::unique_ptr<RawFile>> RawFile::open(const std::string& path, RawFileOptions options) {
  int flags = O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR);
  if (options.create) flags |= O_CREAT | (options.exclusive ? O_EXCL : 0);
  if (options.cache == CacheMode::kNone) flags |= O_DIRECT;
  FileDesc fd(::open(path.c_str(), flags, 0644));
  if (!fd.valid() && errno == EINVAL && (flags & O_DIRECT)) {
    return Error(EINVAL, "open " + path + ": the file system does not support O_DIRECT (-t none)");
  }
  if (!fd.valid()) return errno_error(errno, "open " + path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return errno_error(errno, "stat " + path);
  if (S_ISDIR(st.st_mode)) return Error(EISDIR, path + " is a directory");
  if (options.lock) {
    if (Status locked = lock_file(fd.get(), path, *options.lock); !locked.ok()) return locked.error();
  }
  uint32_t alignment = 1;
  if (options.cache == CacheMode::kNone) {
    alignment = 512;
    int sector = 0;
    if (S_ISBLK(st.st_mode) && ioctl(fd.get(), BLKSSZGET, &sector) == 0 && sector > 0) {
      alignment = static_cast<uint32_t>(sector);
    } else if (st.st_blksize >= 4096) {
      // File systems on 4 KiB-sector devices reject 512-byte direct I/O;
      // the block size is the safe choice.
      alignment = 4096;
    }
  }
  return std::unique_ptr<RawFile>(new RawFile(path, std::move(fd), options, alignment));
}

void RawFile::release_locks() {
  if (options_.lock) unlock_file(fd_.get());
}

Error RawFile::io_error(int err, const char* what, uint64_t offset, uint64_t len) const {
  return errno_error(err, std::string(what) + " " + path_ + " at offset " + std::to_string(offset) +
                              " length " + std::to_string(len));
}

bool RawFile::aligned(uint64_t offset, uint64_t len, const void* buf) const {
  uint64_t mask = alignment_ - 1;
  return ((offset | len | reinterpret_cast<uintptr_t>(buf)) & mask) == 0;
}

bool RawFile::aligned(uint64_t offset, std::span<const iovec> iov) const {
  if (alignment_ == 1) return true;
  if (offset & (alignment_ - 1)) return false;
  for (const iovec& v : iov) {
    if (!aligned(0, v.iov_len, v.iov_base)) return false;
  }
  return true;
}

Task<Status> RawFile::co_read(uint64_t offset, std::span<std::byte> buf) {
  if (buf.empty()) co_return Status();
  if (alignment_ > 1 && !aligned(offset, buf.size(), buf.data())) {
    co_return co_await bounce_read(offset, buf);
  }
  int r = co_await uring::ReadOp(fd_.get(), buf.data(), buf.size(), offset, uring::EofPolicy::kZeroFill,
                                 false, alignment_ > 1);
  if (r < 0) co_return io_error(r, "read", offset, buf.size());
  co_return Status();
}

Task<Status> RawFile::co_write(uint64_t offset, std::span<const std::byte> buf) {
  if (options_.read_only) co_return Error(EROFS, path_ + " is open read-only");
  if (buf.empty()) co_return Status();
  if (alignment_ > 1 && !aligned(offset, buf.size(), buf.data())) {
    co_return co_await bounce_write(offset, buf);
  }
  int r = co_await uring::WriteOp(fd_.get(), buf.data(), buf.size(), offset);
  if (r < 0) co_return io_error(r, "write", offset, buf.size());
  co_return Status();
}

namespace {
size_t iov_bytes(std::span<const iovec> iov) {
  size_t n = 0;
  for (const iovec& v : iov) n += v.iov_len;
  return n;
}
}  // namespace

Task<Status> RawFile::co_readv(uint64_t offset, std::span<iovec> iov) {
  if (!aligned(offset, iov)) {
    // Unaligned O_DIRECT: read linearly through a bounce buffer, scatter.
    size_t total = iov_bytes(iov);
    std::vector<std::byte> tmp(total);
    UQ_CO_TRY(co_await bounce_read(offset, tmp));
    size_t pos = 0;
    for (const iovec& v : iov) {
      std::memcpy(v.iov_base, tmp.data() + pos, v.iov_len);
      pos += v.iov_len;
    }
    co_return Status();
  }
  size_t total = iov_bytes(iov);
  int r = co_await uring::VectorOp(uring::VectorOp::Dir::kRead, fd_.get(), iov, offset);
  if (r < 0) co_return io_error(r, "readv", offset, total);
  co_return Status();
}

Task<Status> RawFile::co_writev(uint64_t offset, std::span<iovec> iov) {
  if (options_.read_only) co_return Error(EROFS, path_ + " is open read-only");
  size_t total = iov_bytes(iov);
  if (!aligned(offset, iov)) {
    std::vector<std::byte> tmp(total);
    size_t pos = 0;
    for (const iovec& v : iov) {
      std::memcpy(tmp.data() + pos, v.iov_base, v.iov_len);
      pos += v.iov_len;
    }
    co_return co_await bounce_write(offset, tmp);
  }
  int r = co_await uring::VectorOp(uring::VectorOp::Dir::kWrite, fd_.get(), iov, offset);
  if (r < 0) co_return io_error(r, "writev", offset, total);
  co_return Status();
}

Task<Status> RawFile::bounce_read(uint64_t offset, std::span<std::byte> buf) {
  uint64_t start = offset / alignment_ * alignment_;
  uint64_t end = (offset + buf.size() + alignment_ - 1) / alignment_ * alignment_;
  AlignedBuffer tmp(end - start);
  int r = co_await uring::ReadOp(fd_.get(), tmp.data(), tmp.size(), start, uring::EofPolicy::kZeroFill,
                                 false, true);
  if (r < 0) co_return io_error(r, "read", offset, buf.size());
  std::memcpy(buf.data(), tmp.data() + (offset - start), buf.size());
  co_return Status();
}

Task<Status> RawFile::bounce_write(uint64_t offset, std::span<const std::byte> buf) {
  // Read-modify-write of the covering aligned range. The lock keeps two
  // unaligned writes sharing a sector from losing each other's bytes.
  auto guard = co_await rmw_lock_.scoped_lock();
  uint64_t start = offset / alignment_ * alignment_;
  uint64_t end = (offset + buf.size() + alignment_ - 1) / alignment_ * alignment_;
  UQ_CO_ASSIGN_OR_RETURN(uint64_t old_length, length());
  AlignedBuffer tmp(end - start);
  if (start != offset || end != offset + buf.size()) {
    int r = co_await uring::ReadOp(fd_.get(), tmp.data(), tmp.size(), start,
                                   uring::EofPolicy::kZeroFill, false, true);
    if (r < 0) co_return io_error(r, "read (read-modify-write)", start, tmp.size());
  }
  std::memcpy(tmp.data() + (offset - start), buf.data(), buf.size());
  int r = co_await uring::WriteOp(fd_.get(), tmp.data(), tmp.size(), start);
  if (r < 0) co_return io_error(r, "write", offset, buf.size());
  // Writing whole sectors may have extended the file past the request's end;
  // the file must end where a buffered write would have left it. Trim only
  // while the file still ends at `end`: an aligned write (which does not take
  // rmw_lock_) that completed meanwhile may have extended it further, and
  // trimming would cut its data off.
  uint64_t want = std::max(old_length, offset + buf.size());
  if (end > want) {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t new_length, length());
    if (new_length == end && ::ftruncate(fd_.get(), static_cast<off_t>(want)) != 0) {
      co_return io_error(errno, "truncate after unaligned write", offset, buf.size());
    }
  }
  co_return Status();
}

Task<Status> RawFile::co_flush() {
  if (options_.read_only) co_return Status();
  int r = co_await uring::fdatasync(fd_.get());
  if (r < 0) co_return errno_error(r, "fdatasync " + path_);
  co_return Status();
}

Task<Status> RawFile::co_discard(uint64_t offset, uint64_t len) {
  if (options_.read_only) co_return Error(EROFS, path_ + " is open read-only");
  if (len == 0) co_return Status();
  int r = co_await uring::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
  if (r < 0) co_return io_error(r, "discard", offset, len);
  co_return Status();
}

Task<Status> RawFile::write_zero_buffers(uint64_t offset, uint64_t len) {
  constexpr uint64_t kChunk = 1 << 20;
  AlignedBuffer zeros(std::min(len, kChunk));
  while (len > 0) {
    uint64_t n = std::min<uint64_t>(len, zeros.size());
    UQ_CO_TRY(co_await co_write(offset, std::span<const std::byte>(zeros.data(), n)));
    offset += n;
    len -= n;
  }
  co_return Status();
}

Task<Status> RawFile::co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  if (options_.read_only) co_return Error(EROFS, path_ + " is open read-only");
  if (len == 0) co_return Status();
  UQ_CO_ASSIGN_OR_RETURN(uint64_t file_len, length());
  int r;
  if (may_unmap && offset + len <= file_len) {
    r = co_await uring::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
  } else {
    r = co_await uring::fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE, offset, len);
  }
  if (r == -EOPNOTSUPP || r == -EINVAL) co_return co_await write_zero_buffers(offset, len);
  if (r < 0) co_return io_error(r, "write zeroes", offset, len);
  co_return Status();
}

Result<uint64_t> RawFile::length() const {
  struct stat st {};
  if (fstat(fd_.get(), &st) != 0) return errno_error(errno, "stat " + path_);
  if (S_ISBLK(st.st_mode)) {
    uint64_t size = 0;
    if (ioctl(fd_.get(), BLKGETSIZE64, &size) != 0) return errno_error(errno, "BLKGETSIZE64 " + path_);
    return size;
  }
  return static_cast<uint64_t>(st.st_size);
}

Result<uint64_t> RawFile::allocated_bytes() const {
  struct stat st {};
  if (fstat(fd_.get(), &st) != 0) return errno_error(errno, "stat " + path_);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Status RawFile::truncate(uint64_t length) {
  if (options_.read_only) return Error(EROFS, path_ + " is open read-only");
  if (::ftruncate(fd_.get(), static_cast<off_t>(length)) != 0) {
    return errno_error(errno, "truncate " + path_ + " to " + std::to_string(length));
  }
  return Status();
}

}  // namespace uqcow
