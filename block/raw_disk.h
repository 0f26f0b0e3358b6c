// RawDisk: a raw image file as a Disk (the guest sees the file's bytes).
#pragma once

#include <memory>

#include "block/disk.h"
#include "uring/raw_file.h"

namespace uqcow {

class RawDisk final : public Disk {
 public:
  // `size` fixes the guest size (the file's length at open).
  RawDisk(std::unique_ptr<RawFile> file, uint64_t size) : file_(std::move(file)), size_(size) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return file_->read_only(); }
  std::string format_name() const override { return "raw"; }
  const std::string& filename() const override { return file_->name(); }
  Disk* backing() const override { return nullptr; }

  Task<Status> read(uint64_t offset, std::span<std::byte> buf) override;
  Task<Status> write(uint64_t offset, std::span<const std::byte> buf) override;
  Task<Status> write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Task<Status> discard(uint64_t offset, uint64_t len) override;
  Task<Status> flush() override { return file_->co_flush(); }
  // Holes (SEEK_HOLE) read as zeros; everything else is data at the same
  // offset.
  Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t max_len) override;
  Task<Status> close() override;
  Result<uint64_t> allocated_bytes() const override { return file_->allocated_bytes(); }

  RawFile& file() { return *file_; }

 private:
  Status check_range(uint64_t offset, uint64_t len) const;
  std::unique_ptr<RawFile> file_;
  uint64_t size_;
  bool closed_ = false;
};

}  // namespace uqcow
