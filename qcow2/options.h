// Runtime open options, named as QEMU names them (l2-cache-size, ...), and
// the parsing of qemu-style sizes ("64k", "1M", "2G").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "engine/result.h"
#include "fault/fault_rule.h"
#include "uring/raw_file.h"

namespace uqcow {

// QEMU's overlap-check levels.
enum class OverlapCheck { kNone, kConstant, kCached, kAll };

struct OpenOptions {
  bool read_only = true;
  CacheMode cache = CacheMode::kWriteback;
  // Forced format of the top image ("qcow2", "raw"); empty: probe.
  std::string format;
  // Do not open the backing file (reads of unallocated clusters then fail).
  bool no_backing = false;
  // Read an internal snapshot (by id or name) instead of the active layer;
  // implies read-only.
  std::string snapshot;

  // qcow2 runtime options. Unset: QEMU's defaults for Linux.
  std::optional<uint64_t> l2_cache_size;        // bytes
  std::optional<uint64_t> l2_cache_entry_size;  // bytes
  std::optional<uint64_t> refcount_cache_size;  // bytes
  uint64_t cache_clean_interval = 600;          // seconds; 0 disables
  std::optional<bool> lazy_refcounts;
  OverlapCheck overlap_check = OverlapCheck::kCached;
  bool pass_discard_request = true;
  bool pass_discard_snapshot = true;
  bool pass_discard_other = false;

  std::string passphrase;  // for encrypted images (read from --passphrase-file)

  // Fault injection (blkdebug rules, fault/fault_rule.h) on the top image's
  // file; null: none. Shared so the caller can read the rules' counters.
  // Never applied to backing files.
  std::shared_ptr<FaultInjector> inject;
};

// Parses "123", "64k", "1M", "1.5G", "2T" (binary multiples, as qemu-img;
// "b"/"B" suffix means bytes). Errors name `what`.
Result<uint64_t> parse_size(const std::string& text, const std::string& what);

// Applies one "key=value" runtime option with QEMU's name; "inject" adds a
// fault rule (event=NAME,errno=N,...).
Status apply_open_option(OpenOptions& options, const std::string& key, const std::string& value);

Result<OverlapCheck> parse_overlap_check(const std::string& value);

}  // namespace uqcow
