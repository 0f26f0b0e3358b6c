#include "block/raw_disk.h"

#include <unistd.h>

namespace uqcow {

Status RawDisk::check_range(uint64_t offset, uint64_t len) const {
  if (offset > size_ || len > size_ - offset) {
    return Error(EINVAL, "request of " + std::to_string(len) + " bytes at " + std::to_string(offset) +
                             " is beyond the end of the disk (" + std::to_string(size_) + " bytes)");
  }
  return Status();
}

Task<Status> RawDisk::read(uint64_t offset, std::span<std::byte> buf) {
  UQ_CO_TRY(check_range(offset, buf.size()));
  co_return co_await file_->co_read(offset, buf);
}

Task<Status> RawDisk::write(uint64_t offset, std::span<const std::byte> buf) {
  UQ_CO_TRY(check_range(offset, buf.size()));
  co_return co_await file_->co_write(offset, buf);
}

Task<Status> RawDisk::write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  UQ_CO_TRY(check_range(offset, len));
  co_return co_await file_->co_write_zeroes(offset, len, may_unmap);
}

Task<Status> RawDisk::discard(uint64_t offset, uint64_t len) {
  UQ_CO_TRY(check_range(offset, len));
  co_return co_await file_->co_discard(offset, len);
}

Task<Result<BlockStatus>> RawDisk::block_status(uint64_t offset, uint64_t max_len) {
  if (offset >= size_) co_return Error(EINVAL, "block status beyond the end of the disk");
  max_len = std::min(max_len, size_ - offset);
  BlockStatus st;
  st.has_offset = true;
  st.host_offset = offset;
  st.file = &file_->name();
  off_t data = lseek(file_->fd(), static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0 && errno == ENXIO) {
    // No data from here to the end of the file: a hole.
    st.kind = BlockStatus::Kind::kZero;
    st.length = max_len;
  } else if (data < 0) {
    st.kind = BlockStatus::Kind::kData;  // SEEK_DATA unsupported: all data
    st.length = max_len;
  } else if (static_cast<uint64_t>(data) > offset) {
    st.kind = BlockStatus::Kind::kZero;
    st.length = std::min<uint64_t>(max_len, static_cast<uint64_t>(data) - offset);
  } else {
    off_t hole = lseek(file_->fd(), static_cast<off_t>(offset), SEEK_HOLE);
    st.kind = BlockStatus::Kind::kData;
    st.length = hole > static_cast<off_t>(offset)
                    ? std::min<uint64_t>(max_len, static_cast<uint64_t>(hole) - offset)
                    : max_len;
  }
  co_return st;
}

Task<Status> RawDisk::close() {
  if (closed_) co_return Status();
  closed_ = true;
  // (No co_await inside ?: here: GCC 12 miscompiles it.)
  Status flushed;
  if (!file_->read_only()) flushed = co_await file_->co_flush();
  file_->release_locks();
  co_return flushed;
}

}  // namespace uqcow
