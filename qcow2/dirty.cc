// Opening an image left dirty by a crash with lazy refcounts: like QEMU, the
// refcounts are rebuilt from the L1/L2 tables (check -r all) before anything
// can be allocated, and the dirty bit is cleared by that repair.
#include "qcow2/check.h"
#include "qcow2/header_io.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::repair_after_crash() {
  BlockDevice* data = data_file_ != file_.get() ? data_file_ : nullptr;
  auto checked = co_await check_image(*file_, data, RepairMode::kAll);
  if (!checked.ok()) co_return std::move(checked).error().with_context("repairing dirty image " + file_->name());
  if (!checked->stopped.ok()) {
    co_return Error(checked->stopped.code(), "repairing dirty image " + file_->name() + ": " +
                                                 checked->stopped.message());
  }
  if (checked->corruptions || checked->check_errors) {
    co_return Error(EIO, file_->name() + ": the image was not closed cleanly and its repair left " +
                             std::to_string(checked->corruptions) + " corruptions");
  }
  // The repair may have moved the refcount table and fixed L1 entries.
  UQ_CO_ASSIGN_OR_RETURN(Header h, co_await read_image_header(*file_, HeaderUse::kCheck));
  header_.refcount_table_offset = h.refcount_table_offset;
  header_.refcount_table_clusters = h.refcount_table_clusters;
  header_.incompatible_features = h.incompatible_features;
  co_return co_await map_->load_l1(header_.l1_table_offset, header_.l1_size);
}

}  // namespace uqcow::qcow2
