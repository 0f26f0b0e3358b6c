// FileDesc: owns one file descriptor, as Seastar's file_desc does. Move-only;
// the destructor closes it. -1 means none.
#pragma once

#include <unistd.h>

#include <utility>

namespace uqcow {

class FileDesc {
 public:
  FileDesc() = default;
  // Takes ownership of `fd` (or of nothing, if it is negative).
  explicit FileDesc(int fd) noexcept : fd_(fd < 0 ? -1 : fd) {}
  FileDesc(FileDesc&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDesc& operator=(FileDesc&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  FileDesc(const FileDesc&) = delete;
  FileDesc& operator=(const FileDesc&) = delete;
  ~FileDesc() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership: the caller closes the returned descriptor.
  int release() { return std::exchange(fd_, -1); }
  // Closes the descriptor held (if any) and takes `fd` instead.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd < 0 ? -1 : fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace uqcow
