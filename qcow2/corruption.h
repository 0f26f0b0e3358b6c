// Reporting damaged metadata: QEMU's qcow2_signal_corruption.
//
// Every component that finds damage reports it here. A fatal report on a
// read-write image marks it corrupt once: from then on writes are refused,
// and `mark_image` (the image's background write of the corrupt bit) runs.
// A read-only image only reports.
#pragma once

#include <functional>
#include <string>

#include "engine/result.h"

namespace uqcow::qcow2 {

class CorruptionReporter {
 public:
  // `file_name` names the image in messages. `mark_image` is called once,
  // on the first fatal report of a read-write image.
  CorruptionReporter(std::string file_name, bool read_only, std::function<void()> mark_image)
      : file_name_(std::move(file_name)), read_only_(read_only), mark_image_(std::move(mark_image)) {}
  CorruptionReporter(const CorruptionReporter&) = delete;
  CorruptionReporter& operator=(const CorruptionReporter&) = delete;

  // The EIO that says the image is corrupt and why (nothing is marked).
  Error corruption(const std::string& what) const;
  // QEMU's fatal event: marks a read-write image corrupt (the first time)
  // and returns `e` with the decision appended.
  Error fatal(Error e);
  // QEMU's non-fatal event (a cluster that cannot be freed is leaked
  // instead): reported on stderr once per image, nothing marked.
  void nonfatal(const std::string& what);

  bool marked_corrupt() const { return corrupt_; }

 private:
  const std::string file_name_;
  const bool read_only_;
  std::function<void()> mark_image_;
  bool corrupt_ = false;
  bool nonfatal_reported_ = false;
};

}  // namespace uqcow::qcow2
