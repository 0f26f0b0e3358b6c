// uqcow info: what `qemu-img info` 7.2 prints, field for field.
//
// qemu-img builds a QAPI ImageInfo and prints it either with a fixed human
// layout or as pretty JSON. Both walk QDicts, whose iteration order is the
// order of their hash buckets, not the insertion order: QValue below keeps
// that order so that the keys come out where qemu-img puts them.
#include <time.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "block/endian.h"
#include "block/open.h"
#include "block/path.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "tools/cli.h"
#include "uring/raw_file.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow info [-U] [-f FMT] [--output=human|json] [--backing-chain] FILE";
constexpr char kDescription[] =
    "Shows what 'qemu-img info' shows about FILE: sizes, cluster size, backing file,\n"
    "snapshots and the format specific information. --backing-chain also shows every\n"
    "image of the backing chain.";

// ---------------------------------------------------------------------------
// QValue: a QObject (number, bool, string, dict, list), printed as qemu does.

class QValue {
 public:
  enum class Type { kNumber, kBool, kString, kDict, kList };

  static QValue number(uint64_t v) { return QValue(Type::kNumber, v, false, {}); }
  static QValue boolean(bool v) { return QValue(Type::kBool, 0, v, {}); }
  static QValue string(std::string v) { return QValue(Type::kString, 0, false, std::move(v)); }
  static QValue dict() { return QValue(Type::kDict, 0, false, {}); }
  static QValue list() { return QValue(Type::kList, 0, false, {}); }

  // Adds a dict member. Members are given in QAPI declaration order, which
  // only matters between keys that share a hash bucket.
  QValue& put(std::string key, QValue v) {
    keys_.push_back(std::move(key));
    items_.push_back(std::move(v));
    return *this;
  }
  QValue& append(QValue v) {
    items_.push_back(std::move(v));
    return *this;
  }

  void to_json(int indent, std::string& out) const;
  // qemu's dump_qobject(): the human form of format specific information.
  void dump(int indent) const;

 private:
  QValue(Type type, uint64_t n, bool b, std::string s) : type_(type), number_(n), bool_(b), string_(std::move(s)) {}
  // Member indices in qemu's QDict iteration order.
  std::vector<size_t> dict_order() const;
  std::string scalar_text() const;

  Type type_;
  uint64_t number_ = 0;
  bool bool_ = false;
  std::string string_;
  std::vector<std::string> keys_;  // dict only
  std::vector<QValue> items_;      // dict values, list elements
};

// qdict.c's tdb_hash(), reduced to QDICT_BUCKET_MAX (512) buckets.
unsigned qdict_bucket(const std::string& name) {
  unsigned value = 0x238F13AFu * static_cast<unsigned>(name.size());
  for (size_t i = 0; i < name.size(); ++i) {
    value = value + (static_cast<unsigned>(static_cast<unsigned char>(name[i])) << (i * 5 % 24));
  }
  return (1103515243u * value + 12345u) % 512;
}

std::vector<size_t> QValue::dict_order() const {
  std::vector<size_t> order(keys_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  // Buckets in ascending order; inside a bucket the newest entry first (qdict
  // inserts at the head of the bucket's list).
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    unsigned ba = qdict_bucket(keys_[a]), bb = qdict_bucket(keys_[b]);
    return ba != bb ? ba < bb : a > b;
  });
  return order;
}

// Decodes one UTF-8 sequence at s[i] and moves i past it; an invalid
// sequence yields -1 and consumes one byte (qemu's mod_utf8_codepoint()
// rejects it too, and the caller prints U+FFFD).
int32_t next_codepoint(const std::string& s, size_t& i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) {
    ++i;
    return c;
  }
  const int extra = (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
  if (extra < 0) {
    ++i;
    return -1;
  }
  int32_t cp = c & (0x3F >> extra);
  for (int k = 1; k <= extra; ++k) {
    if (i + k >= s.size() || (byte(i + k) & 0xC0) != 0x80) {
      ++i;
      return -1;
    }
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  static const int32_t kMin[] = {0, 0x80, 0x800, 0x10000};
  if (cp < kMin[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++i;
    return -1;
  }
  i += extra + 1;
  return cp;
}

// qjson.c's quoted_str(): escapes, and \uXXXX for everything outside
// printable ASCII.
std::string qjson_quote(const std::string& s) {
  std::string out = "\"";
  char buf[16];
  for (size_t i = 0; i < s.size();) {
    int32_t cp = next_codepoint(s, i);
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (cp < 0) cp = 0xFFFD;
        if (cp > 0xFFFF) {
          std::snprintf(buf, sizeof buf, "\\u%04X\\u%04X", 0xD800 + ((cp - 0x10000) >> 10),
                        0xDC00 + ((cp - 0x10000) & 0x3FF));
          out += buf;
        } else if (cp < 0x20 || cp >= 0x7F) {
          std::snprintf(buf, sizeof buf, "\\u%04X", cp);
          out += buf;
        } else {
          out += static_cast<char>(cp);
        }
    }
  }
  return out + "\"";
}

std::string QValue::scalar_text() const {
  switch (type_) {
    case Type::kNumber: return std::to_string(number_);
    case Type::kBool: return bool_ ? "true" : "false";
    default: return string_;
  }
}

void newline(int indent, std::string& out) { out += "\n" + std::string(indent * 4, ' '); }

// qobject_to_json_pretty().
void QValue::to_json(int indent, std::string& out) const {
  switch (type_) {
    case Type::kString:
      out += qjson_quote(string_);
      return;
    case Type::kDict: {
      out += '{';
      const char* sep = "";
      for (size_t i : dict_order()) {
        out += sep;
        newline(indent + 1, out);
        out += qjson_quote(keys_[i]) + ": ";
        items_[i].to_json(indent + 1, out);
        sep = ",";
      }
      newline(indent, out);
      out += '}';
      return;
    }
    case Type::kList: {
      out += '[';
      const char* sep = "";
      for (const QValue& item : items_) {
        out += sep;
        newline(indent + 1, out);
        item.to_json(indent + 1, out);
        sep = ",";
      }
      newline(indent, out);
      out += ']';
      return;
    }
    default:
      out += scalar_text();
  }
}

// block/qapi.c's dump_qobject() / dump_qdict() / dump_qlist(): dashes in
// keys become spaces, composites open an indented block.
void QValue::dump(int indent) const {
  const auto composite = [](const QValue& v) { return v.type_ == Type::kDict || v.type_ == Type::kList; };
  if (type_ == Type::kDict) {
    for (size_t i : dict_order()) {
      std::string key = keys_[i];
      std::replace(key.begin(), key.end(), '-', ' ');
      std::printf(composite(items_[i]) ? "%*s%s:\n" : "%*s%s: ", indent * 4, "", key.c_str());
      items_[i].dump(indent + 1);
      if (!composite(items_[i])) std::printf("\n");
    }
  } else if (type_ == Type::kList) {
    for (size_t i = 0; i < items_.size(); ++i) {
      std::printf(composite(items_[i]) ? "%*s[%zu]:\n" : "%*s[%zu]: ", indent * 4, "", i);
      items_[i].dump(indent + 1);
      if (!composite(items_[i])) std::printf("\n");
    }
  } else {
    std::printf("%s", scalar_text().c_str());
  }
}

// ---------------------------------------------------------------------------
// Format specific information of qcow2 images (qcow2_get_specific_info()).

std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}

// Text of a NUL-padded fixed-size header field.
std::string fixed_string(const uint8_t* p, size_t size) {
  return std::string(reinterpret_cast<const char*>(p), strnlen(reinterpret_cast<const char*>(p), size));
}

// QEMU's name of a LUKS cipher (qcrypto_block_luks_cipher_name_lookup()):
// the algorithm and the key size, halved for XTS which splits the key.
std::string luks_cipher_alg(const std::string& name, const std::string& mode, uint32_t key_bytes) {
  if (mode == "xts") key_bytes /= 2;
  const std::string bits = std::to_string(key_bytes * 8);
  if (name == "cast5" || name == "sm4") return name == "sm4" ? "sm4" : "cast5-" + bits;
  return name + "-" + bits;
}

// The LUKS1 header of an encrypted qcow2 image (qcrypto_block_luks_get_info()).
// The header says everything info shows; no key is needed.
Result<QValue> luks_info(const std::vector<uint8_t>& h) {
  static const uint8_t kMagic[6] = {'L', 'U', 'K', 'S', 0xBA, 0xBE};
  constexpr size_t kHeaderBytes = 592, kSlots = 208, kSlotBytes = 48;
  constexpr uint32_t kSlotActive = 0x00AC71F3, kSectorSize = 512;
  if (h.size() < kHeaderBytes || std::memcmp(h.data(), kMagic, 6) != 0) {
    return Error(EINVAL, "LUKS header: bad magic");
  }
  std::string cipher_name = fixed_string(&h[8], 32);
  std::string cipher_mode = fixed_string(&h[40], 32);
  std::string hash_spec = fixed_string(&h[72], 32);
  // "xts-plain64", "cbc-essiv:sha256": mode, IV generator, IV hash.
  std::string mode = cipher_mode, ivgen, ivgen_hash;
  if (auto dash = cipher_mode.find('-'); dash != std::string::npos) {
    mode = cipher_mode.substr(0, dash);
    ivgen = cipher_mode.substr(dash + 1);
  }
  if (auto colon = ivgen.find(':'); colon != std::string::npos) {
    ivgen_hash = ivgen.substr(colon + 1);
    ivgen = ivgen.substr(0, colon);
  }
  QValue info = QValue::dict();
  info.put("format", QValue::string("luks"))
      .put("cipher-alg", QValue::string(luks_cipher_alg(cipher_name, mode, load_be32(&h[108]))))
      .put("cipher-mode", QValue::string(mode))
      .put("ivgen-alg", QValue::string(ivgen));
  if (ivgen == "essiv") info.put("ivgen-hash-alg", QValue::string(ivgen_hash));
  info.put("hash-alg", QValue::string(hash_spec))
      .put("payload-offset", QValue::number(uint64_t{load_be32(&h[104])} * kSectorSize))
      .put("master-key-iters", QValue::number(load_be32(&h[164])))
      .put("uuid", QValue::string(fixed_string(&h[168], 40)));
  QValue slots = QValue::list();
  for (size_t i = 0; i < 8; ++i) {
    const uint8_t* s = &h[kSlots + i * kSlotBytes];
    const bool active = load_be32(s) == kSlotActive;
    QValue slot = QValue::dict();
    slot.put("active", QValue::boolean(active));
    if (active) {
      slot.put("iters", QValue::number(load_be32(s + 4)))
          .put("stripes", QValue::number(load_be32(s + 44)));
    }
    slot.put("key-offset", QValue::number(uint64_t{load_be32(s + 40)} * kSectorSize));
    slots.append(std::move(slot));
  }
  info.put("slots", std::move(slots));
  return info;
}

// The bitmap directory (qcow2_get_bitmap_info_list()): name, granularity and
// the in-use / auto flags of each persistent dirty bitmap.
Result<QValue> bitmap_list(const std::vector<uint8_t>& dir, uint32_t nb_bitmaps) {
  constexpr uint32_t kInUse = 1u << 0, kAuto = 1u << 1;
  constexpr size_t kEntryHeader = 24;
  QValue list = QValue::list();
  size_t pos = 0;
  for (uint32_t n = 0; n < nb_bitmaps; ++n) {
    if (dir.size() - pos < kEntryHeader) {
      return Error(EINVAL, "bitmap directory entry " + std::to_string(n) + " runs past bitmap_directory_size");
    }
    const uint8_t* e = &dir[pos];
    const uint32_t flags = load_be32(e + 12);
    const uint32_t granularity_bits = e[17];
    const uint16_t name_size = load_be16(e + 18);
    const uint32_t extra_data_size = load_be32(e + 20);
    const uint64_t entry_size = (kEntryHeader + uint64_t{extra_data_size} + name_size + 7) & ~uint64_t{7};
    if (granularity_bits > 63 || entry_size > dir.size() - pos) {
      return Error(EINVAL, "bitmap directory entry " + std::to_string(n) + " is invalid");
    }
    QValue flag_list = QValue::list();
    if (flags & kInUse) flag_list.append(QValue::string("in-use"));
    if (flags & kAuto) flag_list.append(QValue::string("auto"));
    QValue bitmap = QValue::dict();
    bitmap.put("name", QValue::string(std::string(reinterpret_cast<const char*>(e + kEntryHeader + extra_data_size), name_size)))
        .put("granularity", QValue::number(uint64_t{1} << granularity_bits))
        .put("flags", std::move(flag_list));
    list.append(std::move(bitmap));
    pos += entry_size;
  }
  return list;
}

Task<Result<std::vector<uint8_t>>> read_image_bytes(RawFile& file, uint64_t offset, uint64_t size) {
  std::vector<uint8_t> buf(size);
  UQ_CO_TRY(co_await file.co_read(offset, as_bytes(buf)));
  co_return buf;
}

QValue encryption_format(const char* format) {
  QValue v = QValue::dict();
  v.put("format", QValue::string(format));
  return v;
}

// The "encrypt" member: the format, and for LUKS what its header says.
Task<Result<QValue>> encryption_info(const qcow2::Header& h, RawFile& file) {
  if (h.crypt_method == qcow2::CryptMethod::kAes) co_return encryption_format("aes");
  if (!h.crypto_header) co_return Error(EINVAL, "LUKS encrypted image without a crypto header extension");
  UQ_CO_ASSIGN_OR_RETURN(auto bytes, co_await read_image_bytes(file, h.crypto_header->offset, 592));
  co_return luks_info(bytes);
}

Task<Result<QValue>> qcow2_specific_info(const qcow2::Qcow2Image& img) {
  const qcow2::Header& h = img.header();
  const char* compression = h.compression_type == qcow2::CompressionType::kZstd ? "zstd" : "zlib";
  QValue data = QValue::dict();
  if (h.version == 2) {
    data.put("compat", QValue::string("0.10"))
        .put("refcount-bits", QValue::number(h.refcount_bits()))
        .put("compression-type", QValue::string(compression));
    co_return data;
  }
  UQ_CO_ASSIGN_OR_RETURN(auto file, RawFile::open(img.filename(), RawFileOptions{.read_only = true}));
  std::optional<QValue> bitmaps;
  // Bitmaps count only while the autoclear bit vouches for them.
  if (h.bitmaps && h.bitmaps->nb_bitmaps > 0 && (h.autoclear_features & qcow2::kAutoclearBitmaps)) {
    constexpr uint64_t kMaxDirectoryBytes = 64ull << 20;
    if (h.bitmaps->directory_size > kMaxDirectoryBytes) {
      co_return Error(EINVAL, "bitmap_directory_size " + std::to_string(h.bitmaps->directory_size) + " is too large");
    }
    UQ_CO_ASSIGN_OR_RETURN(auto dir,
                           co_await read_image_bytes(*file, h.bitmaps->directory_offset, h.bitmaps->directory_size));
    UQ_CO_ASSIGN_OR_RETURN(auto list, bitmap_list(dir, h.bitmaps->nb_bitmaps));
    bitmaps = std::move(list);
  }
  std::optional<QValue> encrypt;
  if (h.crypt_method != qcow2::CryptMethod::kNone) {
    auto e = co_await encryption_info(h, *file);
    // An unreadable LUKS header still leaves the format to report.
    encrypt = e.ok() ? std::move(*e) : encryption_format("luks");
  }

  data.put("compat", QValue::string("1.1"));
  if (h.data_file) data.put("data-file", QValue::string(*h.data_file));
  if (h.has_data_file()) data.put("data-file-raw", QValue::boolean(h.data_file_raw()));
  data.put("extended-l2", QValue::boolean(h.extended_l2()))
      .put("lazy-refcounts", QValue::boolean(h.lazy_refcounts()))
      .put("corrupt", QValue::boolean(h.corrupt()))
      .put("refcount-bits", QValue::number(h.refcount_bits()));
  if (encrypt) data.put("encrypt", std::move(*encrypt));
  if (bitmaps) data.put("bitmaps", std::move(*bitmaps));
  data.put("compression-type", QValue::string(compression));
  co_return data;
}

// ---------------------------------------------------------------------------
// ImageInfo.

struct ImageInfo {
  std::string filename;
  std::string format;
  uint64_t virtual_size = 0;
  std::optional<uint64_t> actual_size;
  std::optional<uint64_t> cluster_size;
  bool dirty = false;
  bool encrypted = false;
  std::string backing_filename;  // as stored in the image; empty: none
  std::string full_backing_filename;
  std::string backing_format;
  std::vector<qcow2::Snapshot> snapshots;
  std::optional<QValue> format_specific;  // the "data" member
};

Task<Result<ImageInfo>> collect_info(Disk& disk) {
  ImageInfo info;
  info.filename = disk.filename();
  info.format = disk.format_name();
  info.virtual_size = disk.size();
  if (auto allocated = disk.allocated_bytes(); allocated.ok()) info.actual_size = *allocated;
  auto* img = dynamic_cast<qcow2::Qcow2Image*>(&disk);
  if (!img) co_return info;
  const qcow2::Header& h = img->header();
  info.cluster_size = h.cluster_size();
  info.dirty = h.dirty();
  info.encrypted = h.crypt_method != qcow2::CryptMethod::kNone;
  if (!h.backing_file.empty()) {
    info.backing_filename = h.backing_file;
    info.full_backing_filename = resolve_relative(disk.filename(), h.backing_file);
    info.backing_format = h.backing_format.value_or("");
  }
  info.snapshots = img->snapshots();
  UQ_CO_ASSIGN_OR_RETURN(auto specific, co_await qcow2_specific_info(*img));
  info.format_specific = std::move(specific);
  co_return info;
}

QValue snapshot_json(const qcow2::Snapshot& s) {
  QValue v = QValue::dict();
  v.put("id", QValue::string(s.id))
      .put("name", QValue::string(s.name))
      .put("vm-state-size", QValue::number(s.vm_state_size))
      .put("date-sec", QValue::number(s.date_sec))
      .put("date-nsec", QValue::number(s.date_nsec))
      .put("vm-clock-sec", QValue::number(s.vm_clock_nsec / 1000000000))
      .put("vm-clock-nsec", QValue::number(s.vm_clock_nsec % 1000000000));
  if (s.has_icount) v.put("icount", QValue::number(s.icount));
  return v;
}

QValue info_json(const ImageInfo& info) {
  QValue v = QValue::dict();
  v.put("filename", QValue::string(info.filename)).put("format", QValue::string(info.format));
  v.put("dirty-flag", QValue::boolean(info.dirty));
  if (info.actual_size) v.put("actual-size", QValue::number(*info.actual_size));
  v.put("virtual-size", QValue::number(info.virtual_size));
  if (info.cluster_size) v.put("cluster-size", QValue::number(*info.cluster_size));
  if (info.encrypted) v.put("encrypted", QValue::boolean(true));
  if (!info.backing_filename.empty()) {
    v.put("backing-filename", QValue::string(info.backing_filename))
        .put("full-backing-filename", QValue::string(info.full_backing_filename));
    if (!info.backing_format.empty()) v.put("backing-filename-format", QValue::string(info.backing_format));
  }
  if (!info.snapshots.empty()) {
    QValue list = QValue::list();
    for (const auto& s : info.snapshots) list.append(snapshot_json(s));
    v.put("snapshots", std::move(list));
  }
  if (info.format_specific) {
    QValue spec = QValue::dict();
    spec.put("type", QValue::string(info.format)).put("data", *info.format_specific);
    v.put("format-specific", std::move(spec));
  }
  return v;
}

// bdrv_snapshot_dump(): one row of the snapshot table.
void print_snapshot_row(const qcow2::Snapshot& s) {
  char date[64] = "";
  time_t t = static_cast<time_t>(s.date_sec);
  struct tm tm {};
  localtime_r(&t, &tm);
  strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
  const uint64_t secs = s.vm_clock_nsec / 1000000000;
  char clock[64];
  std::snprintf(clock, sizeof clock, "%02d:%02d:%02d.%03d", static_cast<int>(secs / 3600),
                static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                static_cast<int>((s.vm_clock_nsec / 1000000) % 1000));
  const std::string icount = s.has_icount ? std::to_string(s.icount) : "";
  std::printf("%-9s %-16s %8s%20s%13s%11s", s.id.c_str(), s.name.c_str(), human_size(s.vm_state_size).c_str(),
              date, clock, icount.c_str());
}

// bdrv_image_info_dump().
void print_human(const ImageInfo& info) {
  std::printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\ndisk size: %s\n",
              info.filename.c_str(), info.format.c_str(), human_size(info.virtual_size).c_str(),
              info.virtual_size, info.actual_size ? human_size(*info.actual_size).c_str() : "unavailable");
  if (info.encrypted) std::printf("encrypted: yes\n");
  if (info.cluster_size) std::printf("cluster_size: %" PRIu64 "\n", *info.cluster_size);
  if (info.dirty) std::printf("cleanly shut down: no\n");
  if (!info.backing_filename.empty()) {
    std::printf("backing file: %s", info.backing_filename.c_str());
    if (info.backing_filename != info.full_backing_filename) {
      std::printf(" (actual path: %s)", info.full_backing_filename.c_str());
    }
    std::printf("\n");
    if (!info.backing_format.empty()) std::printf("backing file format: %s\n", info.backing_format.c_str());
  }
  if (!info.snapshots.empty()) {
    std::printf("Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                "ICOUNT");
    for (const auto& s : info.snapshots) {
      print_snapshot_row(s);
      std::printf("\n");
    }
  }
  if (info.format_specific) {
    std::printf("Format specific information:\n");
    info.format_specific->dump(1);
  }
}

// Opens one image without its backing file (as qemu-img info does, so that a
// missing backing file does not hide the image) and collects its info.
Task<Result<ImageInfo>> image_info(const std::string& path, OpenOptions options) {
  options.no_backing = true;
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(path, options));
  auto info = co_await collect_info(*disk);
  Status closed = co_await disk->close();
  if (info.ok() && !closed.ok()) co_return closed.error();
  co_return info;
}

Task<int> info_task(std::string path, OpenOptions options, bool json, bool chain) {
  std::vector<ImageInfo> infos;
  std::set<std::string> seen;
  std::string format = options.format;
  while (!path.empty()) {
    if (!seen.insert(path).second) co_return fail("Backing file '" + path + "' creates an infinite loop.");
    OpenOptions o = options;
    o.format = format;
    auto info = co_await image_info(path, o);
    if (!info.ok()) co_return fail(info.error());
    path.clear();
    format.clear();
    if (chain && !info->backing_filename.empty()) {
      path = info->full_backing_filename;
      format = info->backing_format;
    }
    infos.push_back(std::move(*info));
  }
  if (json) {
    std::string out;
    if (chain) {
      QValue list = QValue::list();
      for (const auto& info : infos) list.append(info_json(info));
      list.to_json(0, out);
    } else {
      info_json(infos.front()).to_json(0, out);
    }
    std::printf("%s\n", out.c_str());
  } else {
    for (size_t i = 0; i < infos.size(); ++i) {
      if (i > 0) std::printf("\n");
      print_human(infos[i]);
    }
  }
  co_return 0;
}

}  // namespace

int cmd_info(int argc, char** argv) {
  Args args;
  args.option("--output", "output format: human (default) or json", "FMT")
      .flag("--backing-chain", "also show every image of the backing chain");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail("info: expecting one image file name (see --help)");
  const std::string output = args.get_or("--output", "human");
  if (output != "human" && output != "json") {
    return fail("--output must be used with human or json as argument.");
  }
  auto options = open_options(args, /*read_only=*/true);
  if (!options.ok()) return fail(options.error());
  options->no_io = true;  // metadata only: locked as qemu-img info locks
  return run(info_task(args.positional()[0], std::move(*options), output == "json",
                       args.has("--backing-chain")));
}

}  // namespace uqcow::cli
