// File-name helpers shared by the backing-file and data-file code.
#pragma once

#include <string>

namespace uqcow {

// Resolves `name` (a backing or data file name stored in an image) the way
// QEMU does: absolute names stay; relative ones are relative to the directory
// of `image_path`, not to the working directory.
inline std::string resolve_relative(const std::string& image_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

}  // namespace uqcow
