// The overlap check's regions of an open image (metadata_walk.h): built at a
// read-write open, and walked again by verify_metadata_regions() to check
// the guard's bookkeeping. Member functions of Qcow2Image.
#include "qcow2/image.h"
#include "qcow2/metadata_walk.h"

namespace uqcow::qcow2 {

ImageTables Qcow2Image::image_tables() const {
  return ImageTables{.header = header_,
                     .geo = geo_,
                     .active_l1 = map_->l1(),
                     .refcount_table = refcounts_->table(),
                     .snapshots = snapshots_->list(),
                     .snapshot_table_bytes = snapshots_->clusters_bytes()};
}

Task<Status> Qcow2Image::build_metadata_regions() {
  const OverlapMask mask = overlap_check_mask(options_);
  UQ_CO_ASSIGN_OR_RETURN(MetadataRegions regions, co_await collect_metadata_regions(*file_, image_tables(), mask));
  overlap_->reset(std::move(regions), mask);
  co_return Status();
}

Task<Status> Qcow2Image::verify_metadata_regions() {
  if (options_.read_only) co_return Status();
  auto guard = co_await lock_.scoped_lock();
  const MetadataRegions& kept = overlap_->regions();
  UQ_CO_ASSIGN_OR_RETURN(const MetadataRegions fresh, co_await collect_metadata_regions(*file_, image_tables(), kept.tracked()));
  if (fresh == kept) co_return Status();
  co_return Error(EIO, file_->name() + ": overlap-check regions out of date (kept vs. found): " +
                           kept.describe_difference(fresh));
}

}  // namespace uqcow::qcow2
