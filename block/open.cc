#include "block/open.h"

#include <fcntl.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <set>

#include "block/endian.h"
#include "block/raw_disk.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/overlap.h"
#include "uring/file_desc.h"

namespace uqcow {

Result<std::string> probe_format(const std::string& path) {
  FileDesc fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_error(errno, "open " + path);
  unsigned char magic[4] = {};
  ssize_t n = ::pread(fd.get(), magic, sizeof magic, 0);
  if (n == 4 && load_be32(magic) == qcow2::kMagic) return std::string("qcow2");
  return std::string("raw");
}

namespace {

Result<bool> parse_bool(const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "1" || v == "yes") return true;
  if (v == "off" || v == "false" || v == "0" || v == "no") return false;
  return Error(EINVAL, key + ": '" + v + "' is not on/off");
}

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
    UQ_CO_ASSIGN_OR_RETURN(format, probe_format(path));
  }
  if (format != "qcow2" && format != "raw") {
    co_return Error(ENOTSUP, "format '" + format + "' is not supported (qcow2 and raw are)");
  }
  RawFileOptions fo{.read_only = options.read_only,
                    .cache = options.cache,
                    .lock = lock_perms(options, format == "raw" ? LockedFile::kRawImage
                                                                : LockedFile::kQcow2Image)};
  UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(path, fo));
  if (format == "raw") {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t len, file->length());
    // qemu sees a raw file in whole 512-byte sectors; the tail reads as zeros.
    uint64_t size = (len + 511) & ~uint64_t{511};
    co_return std::unique_ptr<Disk>(new RawDisk(std::move(file), size));
  }
  std::unique_ptr<BlockDevice> device = std::move(file);
  if (options.wrap_file) {
    UQ_CO_ASSIGN_OR_RETURN(device, options.wrap_file(std::move(device)));
  }
  OpenOptions backing_options = options;
  backing_options.wrap_file = nullptr;
  backing_options.read_only = true;  // and locked as QEMU locks a read-only open
  backing_options.resize = false;
  backing_options.snapshot.clear();
  auto opener = [backing_options, chain](const std::string& p, const std::string& fmt)
      -> Task<Result<std::unique_ptr<Disk>>> {
    OpenOptions o = backing_options;
    o.format = fmt;
    co_return co_await open_layer(p, o, chain);
  };
  UQ_CO_ASSIGN_OR_RETURN(auto img, co_await qcow2::Qcow2Image::open(std::move(device), options, opener));
  co_return std::unique_ptr<Disk>(std::move(img));
}

}  // namespace

Status apply_open_option(OpenOptions& o, const std::string& key, const std::string& value) {
  auto size = [&](std::optional<uint64_t>& field) -> Status {
    UQ_ASSIGN_OR_RETURN(field, parse_size(value, key));
    return Status();
  };
  auto flag = [&](bool& field) -> Status {
    UQ_ASSIGN_OR_RETURN(field, parse_bool(key, value));
    return Status();
  };
  if (key == "l2-cache-size") return size(o.l2_cache_size);
  if (key == "l2-cache-entry-size") return size(o.l2_cache_entry_size);
  if (key == "refcount-cache-size") return size(o.refcount_cache_size);
  if (key == "cache-clean-interval" || key == "bitmap-store-interval") {
    char* end = nullptr;
    unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0') {
      return Error(EINVAL, key + ": '" + value + "' is not a number of seconds");
    }
    (key == "cache-clean-interval" ? o.cache_clean_interval : o.bitmap_store_interval) = v;
    return Status();
  }
  if (key == "lazy-refcounts") {
    bool b = false;
    UQ_TRY(flag(b));
    o.lazy_refcounts = b;
    return Status();
  }
  if (key.starts_with("overlap-check.") && key != "overlap-check.template") {
    // QEMU's per-kind switches: overlap-check.inactive-l2=on, ...
    const std::string kind = key.substr(sizeof("overlap-check.") - 1);
    for (size_t k = 0; k < qcow2::kMetadataKinds; ++k) {
      const char* name = qcow2::metadata_kind_option(static_cast<qcow2::MetadataKind>(k));
      if (!name || kind != name) continue;
      bool on = false;
      UQ_TRY(flag(on));
      const uint32_t bit = uint32_t{1} << k;
      o.overlap_check_on = on ? (o.overlap_check_on | bit) : (o.overlap_check_on & ~bit);
      o.overlap_check_off = on ? (o.overlap_check_off & ~bit) : (o.overlap_check_off | bit);
      return Status();
    }
    return Error(EINVAL, "unknown runtime option '" + key + "'");
  }
  // overlap-check.template is QEMU's other spelling of overlap-check.
  if (key == "overlap-check" || key == "overlap-check.template") {
    UQ_ASSIGN_OR_RETURN(o.overlap_check, parse_overlap_check(value));
    return Status();
  }
  if (key == "pass-discard-request") return flag(o.pass_discard_request);
  if (key == "pass-discard-snapshot") return flag(o.pass_discard_snapshot);
  if (key == "pass-discard-other") return flag(o.pass_discard_other);
  if (key == "locking") return flag(o.locking);
  if (key == "force-share") return flag(o.force_share);
  return Error(EINVAL, "unknown runtime option '" + key + "'");
}

Task<Result<std::unique_ptr<Disk>>> open_disk(const std::string& path, OpenOptions options) {
  UQ_CO_TRY(check_lock_options(options));
  co_return co_await open_layer(path, std::move(options), std::make_shared<std::set<std::string>>());
}

}  // namespace uqcow
