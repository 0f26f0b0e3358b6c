// Opening an image left dirty by a crash with lazy refcounts.
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::repair_after_crash() {
  co_return Error(EIO, file_->name() + ": the image was not closed cleanly (lazy refcounts); "
                                       "repair it with 'uqcow check -r all' before writing");
}

}  // namespace uqcow::qcow2
