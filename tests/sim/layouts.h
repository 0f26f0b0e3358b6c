// The image layouts every seed runs over (like liburing's
// FOR_ALL_TEST_CONFIGS): cluster sizes, extended L2, refcount widths, lazy
// refcounts, compat=0.10, a backing chain, zstd compression, LUKS
// encryption, tiny caches. Images are made by qemu-img (and the backing
// file's data by qemu-io) in a temporary directory and loaded into memory;
// the guest content they start with comes from `qemu-img convert -O raw`,
// an oracle independent of uqcow.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "block/options.h"

namespace uqcow::sim {

struct Layout {
  std::string name;
  uint32_t cluster_size = 65536;
  uint64_t size = 0;           // virtual size; a partial last cluster in some
  std::string create_options;  // qemu-img create -o
  bool extended_l2 = false;
  bool v2 = false;             // compat=0.10
  bool lazy_refcounts = false;
  bool backing = false;        // a qcow2 backing file with data
  bool encrypted = false;      // LUKS, passphrase kPassphrase
  bool snapshots = true;       // internal snapshots (not with refcount_bits=1)
  std::optional<uint64_t> l2_cache_size, l2_cache_entry_size, refcount_cache_size;

  bool compression() const { return !encrypted; }
  uint32_t subcluster_size() const { return extended_l2 ? cluster_size / 32 : cluster_size; }
  // Guest bytes one L2 cache slice maps.
  uint64_t slice_span() const;
  // The runtime options the simulation opens the image with.
  OpenOptions open_options(bool read_only) const;
};

inline constexpr const char* kPassphrase = "sim-passphrase";

const std::vector<Layout>& all_layouts();

// gtest prints a layout by its name.
inline void PrintTo(const Layout& layout, std::ostream* os) { *os << layout.name; }

// A layout's images as qemu-img made them.
struct LayoutImages {
  std::vector<uint8_t> image;    // disk.qcow2
  std::vector<uint8_t> backing;  // base.qcow2 (backing layouts)
  std::vector<uint8_t> content;  // the guest content (qemu-img convert -O raw)
  std::string script;            // the commands that made them
  std::string error;             // why they could not be made ("" = ok)
  std::string missing_tool;      // set when a tool is not installed
};

// Makes (once per process) the images of `layout`.
const LayoutImages& layout_images(const Layout& layout);

// The arguments that name an image file to qemu-img for `layout` (format,
// and for encrypted images the secret and --image-opts).
std::vector<std::string> qemu_image_args(const Layout& layout, const std::string& path);

// Names of the simulated files (a backing file name resolves relative to the
// image's name, as on disk).
inline constexpr const char* kImageName = "sim/disk.qcow2";
inline constexpr const char* kBackingName = "sim/base.qcow2";
inline constexpr const char* kBitmapName = "sim";

}  // namespace uqcow::sim
