#include "qcow2/options.h"

#include <cmath>
#include <cstdlib>

#include "qcow2/overlap.h"

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

uint32_t overlap_check_mask(const OpenOptions& o) {
  uint32_t mask = 0;
  switch (o.overlap_check) {
    case OverlapCheck::kNone: mask = 0; break;
    case OverlapCheck::kConstant: mask = qcow2::kOverlapConstant; break;
    case OverlapCheck::kCached: mask = qcow2::kOverlapCached; break;
    case OverlapCheck::kAll: mask = qcow2::kOverlapAll; break;
  }
  return (mask | o.overlap_check_on) & ~o.overlap_check_off;
}

namespace {
Result<bool> parse_bool(const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "1" || v == "yes") return true;
  if (v == "off" || v == "false" || v == "0" || v == "no") return false;
  return Error(EINVAL, key + ": '" + v + "' is not on/off");
}
}  // namespace

Status apply_open_option(OpenOptions& o, const std::string& key, const std::string& value) {
  auto size = [&](std::optional<uint64_t>& field) -> Status {
    auto r = parse_size(value, key);
    if (!r.ok()) return std::move(r).error();
    field = *r;
    return Status();
  };
  auto flag = [&](bool& field) -> Status {
    auto r = parse_bool(key, value);
    if (!r.ok()) return std::move(r).error();
    field = *r;
    return Status();
  };
  if (key == "l2-cache-size") return size(o.l2_cache_size);
  if (key == "l2-cache-entry-size") return size(o.l2_cache_entry_size);
  if (key == "refcount-cache-size") return size(o.refcount_cache_size);
  if (key == "cache-clean-interval") {
    char* end = nullptr;
    unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0') {
      return Error(EINVAL, "cache-clean-interval: '" + value + "' is not a number of seconds");
    }
    o.cache_clean_interval = v;
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
    auto r = parse_overlap_check(value);
    if (!r.ok()) return std::move(r).error();
    o.overlap_check = *r;
    return Status();
  }
  if (key == "pass-discard-request") return flag(o.pass_discard_request);
  if (key == "pass-discard-snapshot") return flag(o.pass_discard_snapshot);
  if (key == "pass-discard-other") return flag(o.pass_discard_other);
  if (key == "locking") return flag(o.locking);
  if (key == "force-share") return flag(o.force_share);
  if (key == "inject") {
    auto rule = parse_fault_rule(value);
    if (!rule.ok()) return std::move(rule).error();
    if (!o.inject) o.inject = std::make_shared<FaultInjector>();
    o.inject->add_rule(std::move(rule).value());
    return Status();
  }
  return Error(EINVAL, "unknown runtime option '" + key + "'");
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
