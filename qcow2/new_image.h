// A new image's metadata, written in one go: header and extensions, the
// refcount table and blocks that count themselves, an empty L1 table, the
// LUKS header when encrypted, the external data file when named. Nothing is
// preallocated here (create.h does that on the open image).
#pragma once

#include <string>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/create_options.h"

namespace uqcow::qcow2 {

// Validates `o` (errors name the option), then creates or truncates `path`
// under QEMU's creation locks. The size is rounded up to a multiple of 512,
// as qemu-img does. The result passes `qemu-img check` clean.
Task<Status> write_new_image(const std::string& path, const CreateOptions& o);

}  // namespace uqcow::qcow2
