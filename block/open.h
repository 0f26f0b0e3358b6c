// Opening any supported image: format probing (qcow2 magic, else raw, as
// qemu-img does), `-f` to force the format, the backing chain, and the
// runtime options by their QEMU names (some of which are qcow2's).
#pragma once

#include <memory>
#include <string>

#include "block/disk.h"
#include "block/options.h"

namespace uqcow {

// Returns "qcow2" or "raw" for the file at `path` by its first bytes.
Result<std::string> probe_format(const std::string& path);

// Opens `path` with `options` (options.format forces the format). Backing
// files open read-only with the same cache mode and their own probed or
// recorded format; a loop in the chain is an error. Every file (image, data
// file, backing files) takes QEMU's locks for its open mode (lock_perms()):
// an open that conflicts with another one fails with EAGAIN and QEMU's
// message; force_share on a read-write open is EINVAL.
Task<Result<std::unique_ptr<Disk>>> open_disk(const std::string& path, OpenOptions options);

// Applies one "key=value" runtime option with QEMU's name (l2-cache-size,
// overlap-check.inactive-l2, locking, ...); EINVAL names an unknown key or a
// bad value. ("inject", a fault rule, is the CLI's: tools/cli.cc.)
Status apply_open_option(OpenOptions& options, const std::string& key, const std::string& value);

}  // namespace uqcow
