#include "uring/ops.h"

#include <cerrno>

namespace uqcow::uring {

bool ReadOp::complete(int res) {
  if (res == -EINTR || res == -EAGAIN) return false;
  if (res < 0) {
    result = res;
    return true;
  }
  if (direct_ && res > 0 && done_ + static_cast<size_t>(res) < len_) {
    done_ += static_cast<size_t>(res);
    res = 0;  // short O_DIRECT read: the file ends here
  }
  if (res == 0) {  // end of file
    if (eof_ == EofPolicy::kZeroFill) {
      std::memset(buf_ + done_, 0, len_ - done_);
      result = 0;
    } else {
      result = -ENODATA;
    }
    return true;
  }
  done_ += static_cast<size_t>(res);
  if (done_ < len_) return false;  // short read: continue after the last byte
  result = 0;
  return true;
}

bool WriteOp::complete(int res) {
  if (res == -EINTR || res == -EAGAIN) return false;
  if (res < 0) {
    result = res;
    return true;
  }
  if (res == 0) {  // no progress: the device refuses more bytes
    result = -ENOSPC;
    return true;
  }
  done_ += static_cast<size_t>(res);
  if (done_ < len_) return false;
  result = 0;
  return true;
}

bool VectorOp::advance(size_t n) {
  offset_ += n;
  while (!iov_.empty() && n >= iov_.front().iov_len) {
    n -= iov_.front().iov_len;
    iov_ = iov_.subspan(1);
  }
  if (iov_.empty()) return true;
  iov_.front().iov_base = static_cast<std::byte*>(iov_.front().iov_base) + n;
  iov_.front().iov_len -= n;
  return false;
}

bool VectorOp::complete(int res) {
  if (res == -EINTR || res == -EAGAIN) return false;
  if (res < 0) {
    result = res;
    return true;
  }
  if (res == 0) {
    if (dir_ == Dir::kRead) {  // EOF: the rest reads as zeros
      for (iovec& v : iov_) std::memset(v.iov_base, 0, v.iov_len);
      result = 0;
    } else {
      result = -ENOSPC;
    }
    return true;
  }
  if (advance(static_cast<size_t>(res))) {
    result = 0;
    return true;
  }
  return false;
}

}  // namespace uqcow::uring
