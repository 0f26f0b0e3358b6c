#include "block/options.h"

#include <cmath>
#include <cstdlib>

namespace uqcow {

Result<uint64_t> parse_size(const std::string& text, const std::string& what) {
  if (text.empty()) return Error(EINVAL, what + ": empty size");
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || errno != 0 || v < 0 || std::isnan(v)) {
    return Error(EINVAL, what + ": '" + text + "' is not a size");
  }
  std::string suffix(end);
  uint64_t mult = 1;
  if (suffix.empty() || suffix == "b" || suffix == "B") {
    mult = 1;
  } else if (suffix.size() == 1 || (suffix.size() == 2 && (suffix[1] == 'B' || suffix[1] == 'b'))) {
    switch (suffix[0]) {
      case 'k': case 'K': mult = 1ull << 10; break;
      case 'm': case 'M': mult = 1ull << 20; break;
      case 'g': case 'G': mult = 1ull << 30; break;
      case 't': case 'T': mult = 1ull << 40; break;
      case 'p': case 'P': mult = 1ull << 50; break;
      case 'e': case 'E': mult = 1ull << 60; break;
      default: return Error(EINVAL, what + ": unknown size suffix in '" + text + "'");
    }
  } else {
    return Error(EINVAL, what + ": unknown size suffix in '" + text + "'");
  }
  double bytes = v * static_cast<double>(mult);
  if (bytes >= 18446744073709551615.0) return Error(ERANGE, what + ": '" + text + "' is too large");
  if (mult == 1 && v != std::floor(v)) {
    return Error(EINVAL, what + ": '" + text + "' is not a whole number of bytes");
  }
  return static_cast<uint64_t>(bytes);
}

Result<OverlapCheck> parse_overlap_check(const std::string& value) {
  if (value == "none") return OverlapCheck::kNone;
  if (value == "constant") return OverlapCheck::kConstant;
  if (value == "cached") return OverlapCheck::kCached;
  if (value == "all") return OverlapCheck::kAll;
  return Error(EINVAL, "overlap-check: '" + value + "' is not one of none, constant, cached, all");
}

std::optional<LockPerms> lock_perms(const OpenOptions& o, LockedFile file) {
  if (!o.locking) return std::nullopt;
  LockPerms p;
  if (!o.no_io) p.perm |= kPermConsistentRead;
  if (!o.read_only) p.perm |= kPermWrite;
  switch (file) {
    case LockedFile::kQcow2Image:
      // qcow2 grows its file as it allocates, and its metadata is only
      // consistent if nobody else writes or resizes the file.
      if (!o.read_only) p.perm |= kPermResize;
      p.shared = kPermConsistentRead | kPermWriteUnchanged;
      break;
    case LockedFile::kRawImage:
      if (o.resize) p.perm |= kPermResize;
      p.shared = kPermAll;
      break;
    case LockedFile::kDataFile:
      // qemu-img info does not open the data file at all.
      if (o.no_io) return std::nullopt;
      if (!o.read_only) p.perm |= kPermResize;
      p.shared = kPermAll & ~kPermResize;
      break;
  }
  if (o.force_share) p.shared = kPermAll;
  if (p.perm == 0 && p.shared == kPermAll) return std::nullopt;  // not a single byte
  return p;
}

Status check_lock_options(const OpenOptions& o) {
  if (o.force_share && !o.read_only) {
    return Error(EINVAL, "force-share=on can only be used with read-only images");
  }
  return Status();
}

}  // namespace uqcow
