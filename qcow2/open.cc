#include "qcow2/open.h"

#include <fcntl.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <set>

#include "fault/fault_device.h"
#include "qcow2/endian.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/raw_disk.h"

namespace uqcow {

Result<std::string> probe_format(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(errno, "open " + path);
  unsigned char magic[4] = {};
  ssize_t n = ::pread(fd, magic, sizeof magic, 0);
  ::close(fd);
  if (n == 4 && qcow2::load_be32(magic) == qcow2::kMagic) return std::string("qcow2");
  return std::string("raw");
}

namespace {

std::string canonical(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf)) return buf;
  return path;
}

Task<Result<std::unique_ptr<Disk>>> open_layer(const std::string& path, OpenOptions options,
                                               std::shared_ptr<std::set<std::string>> chain) {
  if (!chain->insert(canonical(path)).second) {
    co_return Error(ELOOP, "backing chain loops back to " + path);
  }
  std::string format = options.format;
  if (format.empty()) {
    auto probed = probe_format(path);
    if (!probed.ok()) co_return std::move(probed).error();
    format = *probed;
  }
  if (format != "qcow2" && format != "raw") {
    co_return Error(ENOTSUP, "format '" + format + "' is not supported (qcow2 and raw are)");
  }
  RawFileOptions fo{.read_only = options.read_only,
                    .cache = options.cache,
                    .lock = lock_perms(options, format == "raw" ? LockedFile::kRawImage
                                                                : LockedFile::kQcow2Image)};
  auto file = RawFile::open(path, fo);
  if (!file.ok()) co_return std::move(file).error();
  if (format == "raw") {
    auto len = (*file)->length();
    if (!len.ok()) co_return std::move(len).error();
    // qemu sees a raw file in whole 512-byte sectors; the tail reads as zeros.
    uint64_t size = (*len + 511) & ~uint64_t{511};
    co_return std::unique_ptr<Disk>(new RawDisk(std::move(file).value(), size));
  }
  std::unique_ptr<BlockDevice> device = std::move(file).value();
  if (options.inject && !options.inject->empty()) {
    device = std::make_unique<FaultInjectingDevice>(std::move(device), options.inject);
  }
  OpenOptions backing_options = options;
  backing_options.inject = nullptr;
  backing_options.read_only = true;  // and locked as QEMU locks a read-only open
  backing_options.resize = false;
  backing_options.snapshot.clear();
  auto opener = [backing_options, chain](const std::string& p, const std::string& fmt)
      -> Task<Result<std::unique_ptr<Disk>>> {
    OpenOptions o = backing_options;
    o.format = fmt;
    co_return co_await open_layer(p, o, chain);
  };
  auto img = co_await qcow2::Qcow2Image::open(std::move(device), options, opener);
  if (!img.ok()) co_return std::move(img).error();
  co_return std::unique_ptr<Disk>(std::move(img).value());
}

}  // namespace

Task<Result<std::unique_ptr<Disk>>> open_disk(const std::string& path, OpenOptions options) {
  UQ_CO_TRY(check_lock_options(options));
  co_return co_await open_layer(path, std::move(options), std::make_shared<std::set<std::string>>());
}

}  // namespace uqcow
