#include "tests/sim/layouts.h"

#include <map>
#include <memory>
#include <random>

#include "tests/testutil.h"

namespace uqcow::sim {

using testing::CommandResult;
using testing::find_tool;
using testing::read_file;
using testing::run_command;
using testing::TempDir;
namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;

Layout make(std::string name, uint32_t cluster, uint64_t size, std::string options) {
  Layout l;
  l.name = std::move(name);
  l.cluster_size = cluster;
  l.size = size;
  l.create_options = "cluster_size=" + std::to_string(cluster) + (options.empty() ? "" : "," + options);
  l.extended_l2 = l.create_options.find("extended_l2=on") != std::string::npos;
  l.v2 = l.create_options.find("compat=0.10") != std::string::npos;
  l.lazy_refcounts = l.create_options.find("lazy_refcounts=on") != std::string::npos;
  l.snapshots = l.create_options.find("refcount_bits=1,") == std::string::npos &&
                !l.create_options.ends_with("refcount_bits=1");
  return l;
}

std::vector<Layout> build_layouts() {
  std::vector<Layout> v;
  // Sizes end in a partial cluster where the cluster size allows, so the
  // disk's last cluster (discard, zeroes, compression) is exercised too.
  v.push_back(make("c512", 512, 384 * KiB, ""));
  v.push_back(make("c4k_rc1", 4096, 2 * MiB + 1536, "refcount_bits=1"));
  v.push_back(make("c64k_rc64", 65536, 4 * MiB + 2560, "refcount_bits=64"));
  v.push_back(make("c2m", 2 * MiB, 6 * MiB + 256 * KiB, ""));
  v.push_back(make("c16k_extl2", 16384, 4 * MiB + 4 * KiB, "extended_l2=on"));
  Layout ext64 = make("c64k_extl2_slice1k", 65536, 6 * MiB + 8 * KiB, "extended_l2=on");
  ext64.l2_cache_entry_size = 1024;  // 64 entries a slice: 4 MiB, so slices are crossed
  v.push_back(ext64);
  v.push_back(make("c4k_lazy", 4096, 2 * MiB, "lazy_refcounts=on"));
  v.push_back(make("c4k_compat010", 4096, 2 * MiB + 512, "compat=0.10"));
  Layout backing4k = make("c4k_backing", 4096, 2 * MiB + 3584, "");
  backing4k.backing = true;
  v.push_back(backing4k);
  Layout backing64k = make("c64k_extl2_backing", 65536, 4 * MiB, "extended_l2=on");
  backing64k.backing = true;
  v.push_back(backing64k);
  v.push_back(make("c4k_zstd", 4096, 2 * MiB, "compression_type=zstd"));
  Layout tiny = make("c4k_tinycache", 4096, 2 * MiB + 2048, "");
  tiny.l2_cache_size = 1;         // rounded up to the minimum: 2 slices
  tiny.refcount_cache_size = 1;   // rounded up to the minimum: 4 blocks
  tiny.l2_cache_entry_size = 512;  // 64 entries a slice: 256 KiB
  v.push_back(tiny);
  // LUKS unlocking (a PBKDF at every open) makes this the slowest layout
  // with c2m: the order keeps the two on different shards.
  Layout luks = make("c4k_luks", 4096, 2 * MiB + 1024,
                     "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10");
  luks.encrypted = true;
  v.push_back(luks);
  Layout tiny512 = make("c512_rc64_tinycache", 512, 256 * KiB, "refcount_bits=64");
  tiny512.l2_cache_size = 1;
  tiny512.refcount_cache_size = 1;
  v.push_back(tiny512);
  return v;
}

// The backing file's data: patterned ranges (some unaligned) and a zeroed
// range, written by qemu-io. Fixed, not seeded: the image is made once.
std::vector<std::string> backing_writes(uint64_t size) {
  std::mt19937_64 rng(20261201);
  std::vector<std::string> cmds;
  for (int i = 0; i < 8; ++i) {
    const uint64_t len = 1 + rng() % (size / 6);
    const uint64_t off = rng() % (size - len);
    cmds.push_back("write -P " + std::to_string(0x41 + i) + " " + std::to_string(off) + " " + std::to_string(len));
  }
  const uint64_t zlen = size / 16;
  cmds.push_back("write -z " + std::to_string(size / 3 / 4096 * 4096) + " " + std::to_string(zlen));
  return cmds;
}

struct Builder {
  explicit Builder(LayoutImages& out) : out(out), dir("sim-layout") {}
  bool run(const std::vector<std::string>& argv) {
    if (!out.error.empty()) return false;
    // (run_command retries qemu-img's LUKS "Unable to get accurate CPU
    // usage" flake itself.)
    CommandResult r = run_command(argv, dir.path());
    out.script += r.command + "\n";
    if (!r.ok()) out.error = r.describe();
    return r.ok();
  }
  std::vector<uint8_t> load(const std::string& name) {
    auto bytes = read_file(dir.file(name));
    if (!bytes && out.error.empty()) out.error = "cannot read " + dir.file(name);
    return bytes ? std::move(*bytes) : std::vector<uint8_t>();
  }
  LayoutImages& out;
  TempDir dir;
};

void build_images(const Layout& l, LayoutImages& out) {
  for (const char* tool : {"qemu-img", "qemu-io"}) {
    if (!find_tool(tool)) {
      out.missing_tool = tool;
      out.error = std::string(tool) + " is not installed (tools/bootstrap.sh installs qemu-utils)";
      return;
    }
  }
  Builder b(out);
  const std::string size = std::to_string(l.size);
  if (l.backing) {
    b.run({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", size});
    std::vector<std::string> io = {"qemu-io", "-f", "qcow2"};
    for (const auto& c : backing_writes(l.size)) io.insert(io.end(), {"-c", c});
    io.push_back("base.qcow2");
    b.run(io);
    b.run({"qemu-img", "convert", "-O", "raw", "base.qcow2", "base.raw"});
    b.run({"qemu-img", "create", "-q", "-f", "qcow2", "-o", l.create_options, "-b", "base.qcow2", "-F", "qcow2",
           "disk.qcow2"});
    out.backing = b.load("base.qcow2");
    out.content = b.load("base.raw");
  } else {
    std::vector<std::string> create = {"qemu-img", "create", "-q", "-f", "qcow2"};
    if (l.encrypted) create.insert(create.end(), {"--object", std::string("secret,id=s0,data=") + kPassphrase});
    create.insert(create.end(), {"-o", l.create_options, "disk.qcow2", size});
    b.run(create);
    out.content.assign(l.size, 0);
  }
  out.image = b.load("disk.qcow2");
  if (out.error.empty() && out.content.size() != l.size) {
    out.error = "the guest content is " + std::to_string(out.content.size()) + " bytes, not " + size;
  }
}

}  // namespace

uint64_t Layout::slice_span() const {
  const uint64_t entry_bytes = extended_l2 ? 16 : 8;
  const uint64_t slice = l2_cache_entry_size.value_or(std::min<uint64_t>(cluster_size, 4096));
  return slice / entry_bytes * cluster_size;
}

OpenOptions Layout::open_options(bool read_only) const {
  OpenOptions o;
  o.read_only = read_only;
  o.cache_clean_interval = 0;  // the clean timer needs io_uring
  // Bitmap seeds: every guest flush stores the bitmap (IN_USE cleared), so
  // crash images also show stored, consistent bitmaps.
  o.bitmap_store_interval = 0;
  o.l2_cache_size = l2_cache_size;
  o.l2_cache_entry_size = l2_cache_entry_size;
  o.refcount_cache_size = refcount_cache_size;
  if (encrypted) o.passphrase = kPassphrase;
  return o;
}

const std::vector<Layout>& all_layouts() {
  static const std::vector<Layout> layouts = build_layouts();
  return layouts;
}

const LayoutImages& layout_images(const Layout& layout) {
  static std::map<std::string, std::unique_ptr<LayoutImages>> made;
  auto& slot = made[layout.name];
  if (!slot) {
    slot = std::make_unique<LayoutImages>();
    build_images(layout, *slot);
  }
  return *slot;
}

std::vector<std::string> qemu_image_args(const Layout& layout, const std::string& path) {
  if (!layout.encrypted) return {"-f", "qcow2", path};
  return {"--object", std::string("secret,id=s0,data=") + kPassphrase, "--image-opts",
          "driver=qcow2,file.filename=" + path + ",encrypt.key-secret=s0"};
}

}  // namespace uqcow::sim
