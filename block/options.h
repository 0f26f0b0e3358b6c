// Runtime open options, named as QEMU names them (l2-cache-size, ...; set by
// key with apply_open_option(), block/open.h), the locks an open takes, and
// the parsing of qemu-style sizes ("64k", "1M", "2G").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "engine/result.h"
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
  // Persistent dirty bitmaps: a guest flush stores them (IN_USE cleared, so
  // a crash after it finds them consistent) when this many seconds have
  // passed since they were last stored; the first write after a store sets
  // IN_USE again. 0: at every flush. Not QEMU's: it stores only at close.
  uint64_t bitmap_store_interval = 10;
  std::optional<bool> lazy_refcounts;
  // QEMU's overlap-check template (default cached) and its per-kind
  // overlap-check.<kind>=on|off overrides, as bit masks over QEMU's
  // QCOW2_OL_*_BITNR (qcow2/overlap.h); qcow2::overlap_check_mask() combines
  // them.
  OverlapCheck overlap_check = OverlapCheck::kCached;
  uint32_t overlap_check_on = 0;
  uint32_t overlap_check_off = 0;
  bool pass_discard_request = true;
  bool pass_discard_snapshot = true;
  bool pass_discard_other = false;

  std::string passphrase;  // for encrypted images (read from --passphrase-file)

  // Image locking as QEMU's (uring/file_lock.h; the permissions are
  // lock_perms() below). `locking` is QEMU's file.locking; `force_share` is
  // -U: a read-only open that shares every permission, so it neither blocks
  // nor is blocked by a writer; `no_io` is QEMU's BDRV_O_NO_IO (qemu-img
  // info: metadata only, no consistent-read permission); `resize` is
  // BDRV_O_RESIZE (qemu-img resize), which only changes a raw image's locks.
  bool locking = true;
  bool force_share = false;
  bool no_io = false;
  bool resize = false;

  // Layers put between the top image's format driver and its file (fault
  // injection from fault/, `--inject`); null: none. open_disk() and `uqcow
  // check` apply it to the top qcow2 image's file only: never to backing
  // files, data files or raw images.
  BlockDeviceWrapper wrap_file;
};

// The files an image open locks, each with its driver's permissions.
enum class LockedFile { kQcow2Image, kRawImage, kDataFile };

// The locks QEMU 7.2 takes on `file` for an open with `options` (as qemu-img
// and qemu-io take them, read with strace and /proc/locks); unset when the
// open takes none. Backing files are opened with read_only set.
std::optional<LockPerms> lock_perms(const OpenOptions& options, LockedFile file);

// Refuses option combinations QEMU refuses: force-share on a read-write open.
Status check_lock_options(const OpenOptions& options);

// Parses "123", "64k", "1M", "1.5G", "2T" (binary multiples, as qemu-img;
// "b"/"B" suffix means bytes). Errors name `what`.
Result<uint64_t> parse_size(const std::string& text, const std::string& what);

Result<OverlapCheck> parse_overlap_check(const std::string& value);

}  // namespace uqcow
