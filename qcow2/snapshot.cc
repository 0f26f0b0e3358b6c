#include "qcow2/snapshot.h"

#include "qcow2/endian.h"

namespace uqcow::qcow2 {
namespace {
Error bad(uint32_t i, const std::string& field, const std::string& problem) {
  return Error(EINVAL, "invalid qcow2 image: snapshot " + std::to_string(i) + ": " + field + ": " +
                           problem);
}
}  // namespace

Result<std::vector<Snapshot>> parse_snapshot_table(std::span<const uint8_t> t, uint32_t nb,
                                                   const Header& h) {
  std::vector<Snapshot> out;
  out.reserve(std::min<uint32_t>(nb, kMaxSnapshots));
  size_t pos = 0;
  for (uint32_t i = 0; i < nb; ++i) {
    if (t.size() - pos < 40) return bad(i, "snapshots_offset", "table ends inside the entry");
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
      return bad(i, "extra_data_size/id_str_size/name_size", "entry runs past the table");
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

}  // namespace uqcow::qcow2
