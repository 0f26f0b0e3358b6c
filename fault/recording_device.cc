#include "fault/recording_device.h"

#include <cstring>

namespace uqcow {

RecordingDevice::RecordingDevice(std::unique_ptr<BlockDevice> inner, std::shared_ptr<WriteLog> log)
    : LayeredBlockDevice(std::move(inner)), log_(std::move(log)) {}

size_t RecordingDevice::begin(RecordedOp::Kind kind, uint64_t offset, uint64_t length) {
  RecordedOp op;
  op.kind = kind;
  op.offset = offset;
  op.length = length;
  op.issued = log_->tick();
  log_->ops().push_back(std::move(op));
  return log_->ops().size() - 1;
}

void RecordingDevice::end(size_t index, const Status& status) {
  RecordedOp& op = log_->ops()[index];
  op.completed = log_->tick();
  op.ok = status.ok();
}

Task<Status> RecordingDevice::co_write(uint64_t offset, std::span<const std::byte> buf) {
  size_t i = begin(RecordedOp::Kind::kWrite, offset, buf.size());
  auto& data = log_->ops()[i].data;
  data.resize(buf.size());
  if (!buf.empty()) std::memcpy(data.data(), buf.data(), buf.size());
  Status s = co_await inner().co_write(offset, buf);
  end(i, s);
  co_return s;
}

Task<Status> RecordingDevice::co_writev(uint64_t offset, std::span<iovec> iov) {
  uint64_t total = 0;
  for (const iovec& v : iov) total += v.iov_len;
  size_t i = begin(RecordedOp::Kind::kWrite, offset, total);
  auto& data = log_->ops()[i].data;
  data.reserve(total);
  // Copied before the call: the driver may modify the iovec array.
  for (const iovec& v : iov) {
    const auto* p = static_cast<const uint8_t*>(v.iov_base);
    data.insert(data.end(), p, p + v.iov_len);
  }
  Status s = co_await inner().co_writev(offset, iov);
  end(i, s);
  co_return s;
}

Task<Status> RecordingDevice::co_flush() {
  size_t i = begin(RecordedOp::Kind::kFlush, 0, 0);
  Status s = co_await inner().co_flush();
  end(i, s);
  co_return s;
}

Task<Status> RecordingDevice::co_discard(uint64_t offset, uint64_t len) {
  size_t i = begin(RecordedOp::Kind::kDiscard, offset, len);
  Status s = co_await inner().co_discard(offset, len);
  end(i, s);
  co_return s;
}

Task<Status> RecordingDevice::co_write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  size_t i = begin(RecordedOp::Kind::kWriteZeroes, offset, len);
  Status s = co_await inner().co_write_zeroes(offset, len, may_unmap);
  end(i, s);
  co_return s;
}

Status RecordingDevice::truncate(uint64_t length) {
  size_t i = begin(RecordedOp::Kind::kTruncate, 0, length);
  Status s = inner().truncate(length);
  end(i, s);
  return s;
}

}  // namespace uqcow
