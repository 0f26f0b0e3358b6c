// Preallocation: of a freshly created image (qemu-img create -o
// preallocation=metadata|falloc|full), and of the area a resize adds to an
// image whose data file is raw. Member functions of Qcow2Image.
#include <algorithm>
#include <vector>

#include "qcow2/create.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

uint64_t Qcow2Image::data_file_end(uint64_t disk_size) const {
  // QEMU's preallocate_co extends the data file to the end of the last
  // allocation unit it maps: the disk's last cluster, or subcluster with
  // extended L2 entries.
  const uint64_t unit = geo_.subcluster_size;
  return (disk_size + unit - 1) / unit * unit;
}

Task<Status> Qcow2Image::preallocate(Preallocation mode) {
  UQ_CO_TRY(check_writable(0, size_));
  auto guard = co_await lock_.scoped_lock();
  std::vector<MappingWriter::HostRun> runs;
  UQ_CO_TRY(co_await writer_->preallocate(0, size_, /*fresh=*/true, runs));
  guard.unlock();
  // The file must hold every cluster the L2 tables reference (QEMU grows it
  // the same way), even when nothing is written to them: a reference past
  // the end of the file is what qemu-img check reports as corruption.
  // Growing a file by truncate keeps it sparse.
  uint64_t end = 0;
  for (const MappingWriter::HostRun& r : runs) end = std::max(end, r.host + r.length);
  if (header_.has_data_file()) end = data_file_end(size_);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t length, data_file_->length());
  if (end > length) UQ_CO_TRY(data_file_->truncate(end));
  for (const MappingWriter::HostRun& r : runs) {
    const uint64_t len = r.length;
    if (mode == Preallocation::kFalloc) {
      UQ_CO_TRY(co_await data_file_->co_write_zeroes(r.host, len, /*may_unmap=*/false));
    } else if (mode == Preallocation::kFull) {
      std::vector<std::byte> zeros(std::min<uint64_t>(len, 1 << 20));
      for (uint64_t done = 0; done < len;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(len - done, zeros.size()));
        UQ_CO_TRY(co_await data_file_->co_write(r.host + done, std::span<const std::byte>(zeros.data(), n)));
        done += n;
      }
    }
  }
  co_return co_await flush();
}

}  // namespace uqcow::qcow2
