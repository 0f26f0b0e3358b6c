#include "qcow2/snapshot.h"

#include "block/endian.h"
#include <algorithm>

namespace uqcow::qcow2 {
namespace {
Error bad(uint32_t i, const std::string& field, const std::string& problem, int code = EINVAL) {
  return Error(code, "invalid qcow2 image: snapshot " + std::to_string(i) + ": " + field + ": " + problem);
}
}  // namespace

Result<std::vector<Snapshot>> parse_snapshot_table(std::span<const uint8_t> t, uint32_t nb,
                                                   const Header& h) {
  std::vector<Snapshot> out;
  out.reserve(std::min<uint32_t>(nb, kMaxSnapshots));
  size_t pos = 0;
  for (uint32_t i = 0; i < nb; ++i) {
    if (t.size() - pos < 40) return bad(i, "snapshots_offset", "table ends inside the entry", ENODATA);
    const uint8_t* e = t.data() + pos;
    Snapshot s;
    s.l1_table_offset = load_be64(e);
    s.l1_size = load_be32(e + 8);
    uint16_t id_size = load_be16(e + 12);
    uint16_t name_size = load_be16(e + 14);
    s.date_sec = load_be32(e + 16);
    s.date_nsec = load_be32(e + 20);
    s.vm_clock_nsec = load_be64(e + 24);
    s.vm_state_size = load_be32(e + 32);
    uint32_t extra_size = load_be32(e + 36);
    pos += 40;
    if (extra_size > kMaxSnapshotExtraData) {
      return bad(i, "extra_data_size", std::to_string(extra_size) + " exceeds 1024");
    }
    if (t.size() - pos < uint64_t{extra_size} + id_size + name_size) {
      return bad(i, "extra_data_size/id_str_size/name_size", "entry runs past the table", ENODATA);
    }
    const uint8_t* extra = t.data() + pos;
    s.disk_size = h.size;
    if (extra_size >= 8) s.vm_state_size = load_be64(extra);
    if (extra_size >= 16) s.disk_size = load_be64(extra + 8);
    if (extra_size >= 24) {
      s.has_icount = true;
      s.icount = load_be64(extra + 16);
    }
    if (extra_size > 24) s.unknown_extra.assign(extra + 24, extra + extra_size);
    if (h.version >= 3 && extra_size < 16) {
      return bad(i, "extra_data_size", std::to_string(extra_size) + " is below the v3 minimum of 16");
    }
    pos += extra_size;
    s.id.assign(reinterpret_cast<const char*>(t.data() + pos), id_size);
    pos += id_size;
    s.name.assign(reinterpret_cast<const char*>(t.data() + pos), name_size);
    pos += name_size;
    pos = (pos + 7) & ~size_t{7};
    if (pos > t.size()) pos = t.size();
    if (uint64_t{s.l1_size} * 8 > kMaxL1Bytes) {
      return bad(i, "l1_size", std::to_string(s.l1_size) + " entries exceed the 32 MiB L1 limit");
    }
    if (s.l1_table_offset & (h.cluster_size() - 1)) {
      return bad(i, "l1_table_offset", "not aligned to the cluster size");
    }
    out.push_back(std::move(s));
  }
  return out;
}

Result<std::vector<uint8_t>> serialize_snapshot_table(const std::vector<Snapshot>& snapshots) {
  std::vector<uint8_t> out;
  for (const Snapshot& s : snapshots) {
    if (s.id.size() > 65535 || s.name.size() > 65535) {
      return Error(EINVAL, "snapshot id or name longer than 65535 bytes");
    }
    uint32_t extra_size = (s.has_icount ? 24 : 16) + static_cast<uint32_t>(s.unknown_extra.size());
    size_t start = out.size();
    size_t len = 40 + extra_size + s.id.size() + s.name.size();
    out.resize(start + ((len + 7) & ~size_t{7}), 0);
    uint8_t* e = out.data() + start;
    store_be64(e, s.l1_table_offset);
    store_be32(e + 8, s.l1_size);
    store_be16(e + 12, static_cast<uint16_t>(s.id.size()));
    store_be16(e + 14, static_cast<uint16_t>(s.name.size()));
    store_be32(e + 16, s.date_sec);
    store_be32(e + 20, s.date_nsec);
    store_be64(e + 24, s.vm_clock_nsec);
    store_be32(e + 32, s.vm_state_size > UINT32_MAX ? 0 : static_cast<uint32_t>(s.vm_state_size));
    store_be32(e + 36, extra_size);
    uint8_t* x = e + 40;
    store_be64(x, s.vm_state_size);
    store_be64(x + 8, s.disk_size);
    if (s.has_icount) store_be64(x + 16, s.icount);
    std::copy(s.unknown_extra.begin(), s.unknown_extra.end(), x + (s.has_icount ? 24 : 16));
    uint8_t* p = x + extra_size;
    std::copy(s.id.begin(), s.id.end(), p);
    std::copy(s.name.begin(), s.name.end(), p + s.id.size());
  }
  return out;
}

Task<Result<std::vector<Snapshot>>> read_snapshot_table(BlockDevice& file, const Header& h, uint64_t file_length) {
  if (h.nb_snapshots == 0) co_return std::vector<Snapshot>{};
  // The table's byte size is only known once it is parsed: read a window and
  // grow it while the parser runs out of bytes (ENODATA), up to QEMU's 64
  // MiB limit or the end of the file.
  const uint64_t limit = std::min<uint64_t>(
      kMaxSnapshotTableBytes, file_length > h.snapshots_offset ? file_length - h.snapshots_offset : 0);
  uint64_t window = std::min<uint64_t>(limit, std::max<uint64_t>(64 << 10, uint64_t{h.nb_snapshots} * 128));
  while (true) {
    std::vector<uint8_t> table(window);
    UQ_CO_TRY(co_await file.co_read(h.snapshots_offset,
                                    std::span<std::byte>(reinterpret_cast<std::byte*>(table.data()), table.size())));
    auto parsed = parse_snapshot_table(table, h.nb_snapshots, h);
    if (parsed.ok()) co_return parsed;
    if (parsed.error().code() != ENODATA) co_return std::move(parsed).error().with_context(file.name());
    if (window >= limit) {
      // Truncated by the end of the file (or the limit): the image is bad.
      co_return Error(EINVAL, parsed.error().message()).with_context(file.name());
    }
    window = std::min(limit, window * 4);
  }
}

}  // namespace uqcow::qcow2
