// Creating qcow2 images with qemu-img's option names: the new image's
// metadata (new_image.h), then the preallocation asked for, done through an
// open Qcow2Image as qcow2_co_create does.
#pragma once

#include <string>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/create_options.h"

namespace uqcow::qcow2 {

// Creates (or truncates) `path` as an empty qcow2 image, then preallocates
// as asked. The size is rounded up to a multiple of 512, as qemu-img does.
// The image passes `qemu-img check` clean.
Task<Status> create_image(const std::string& path, const CreateOptions& o);

}  // namespace uqcow::qcow2
