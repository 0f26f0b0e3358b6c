#include "qcow2/corruption.h"

#include <cstdio>

namespace uqcow::qcow2 {

Error CorruptionReporter::corruption(const std::string& what) const {
  return Error(EIO, "qcow2 image " + file_name_ + " is corrupt: " + what);
}

Error CorruptionReporter::fatal(Error e) {
  if (read_only_) return e;
  if (corrupt_) return Error(e.code(), e.message() + " (the image is marked corrupt)");
  corrupt_ = true;
  if (mark_image_) mark_image_();
  return Error(e.code(), e.message() + "; the image is marked corrupt");
}

void CorruptionReporter::nonfatal(const std::string& what) {
  // QEMU reports the first non-fatal event and suppresses the rest.
  if (nonfatal_reported_) return;
  nonfatal_reported_ = true;
  std::fprintf(stderr, "uqcow: qcow2 image %s is corrupt: %s; further non-fatal corruption events will be "
               "suppressed\n", file_name_.c_str(), what.c_str());
}

}  // namespace uqcow::qcow2
