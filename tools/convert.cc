// uqcow convert: copies the guest-visible content of an image (or of one of
// its internal snapshots) to a new raw file or qcow2 image, like `qemu-img
// convert -O raw|qcow2`. The output is a full copy: no backing file.
//
// Only what may hold non-zero data is copied. Ranges that the backing chain
// reports as zeros are skipped without being read, and of the data read, the
// 4 KiB blocks that are all zeros are not written: the new target already
// reads zeros everywhere (a sparse raw file; a fresh qcow2 image, whose
// preallocated clusters read as zeros too). With -c the unit is the target's
// cluster: every cluster holding data is written whole through the
// compressed path (the library stores an incompressible one normally), and a
// cluster is skipped only when all of it is zeros.
//
// Several workers copy 2 MiB chunks concurrently to keep requests in flight.
// Compression runs on the reactor thread, inside the library's
// write_compressed().
//
// --bitmaps copies the source's persistent dirty bitmaps to a qcow2 target
// as qemu-img 7.2 does: checked before the target is created (an
// inconsistent one refuses the conversion unless --skip-broken-bitmaps),
// created after the data is copied (so the copy's writes do not mark them),
// with the source's granularity, enabled state and bits, in the source's
// directory order, written when the target closes.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "block/chain_status.h"
#include "block/open.h"
#include "engine/task_group.h"
#include "qcow2/create.h"
#include "qcow2/image.h"
#include "tools/cli.h"
#include "uring/aligned_buffer.h"
#include "uring/raw_file.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] =
    "uqcow convert [-U] [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-c] [-l SNAPSHOT] [-p]\n"
    "              [--bitmaps [--skip-broken-bitmaps]] SRC DST";
constexpr char kDescription[] =
    "Copies the guest-visible content of SRC (through its backing chain) to DST, which is\n"
    "created or truncated: a sparse raw file (-O raw, the default) or a qcow2 image without\n"
    "backing file (-O qcow2). -o takes qemu-img's qcow2 creation options (cluster_size,\n"
    "compat, refcount_bits, lazy_refcounts, preallocation, compression_type, extended_l2,\n"
    "data_file, data_file_raw); the defaults are those of `uqcow create`. -c compresses the\n"
    "data clusters of a qcow2 DST. -l reads an internal snapshot of SRC instead of its\n"
    "current state. --bitmaps copies the persistent dirty bitmaps of a qcow2 SRC to a\n"
    "qcow2 DST (an inconsistent one is refused, or skipped with --skip-broken-bitmaps).";

constexpr uint64_t kChunkBytes = 2ull << 20;  // a multiple of every cluster size
constexpr int kWorkers = 8;
// The granularity at which read data is checked for zeros (qemu-img -S 4k).
constexpr uint64_t kSparseBlock = 4096;

bool all_zero(const std::byte* p, size_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

// Where the data goes. Exactly one of `raw` and `disk` is set.
struct Target {
  RawFile* raw = nullptr;
  Disk* disk = nullptr;
  qcow2::Qcow2Image* compressed = nullptr;  // with -c: the qcow2 `disk`
  uint64_t cluster_size = 0;                // with -c: the unit of writes
  uint64_t size = 0;                        // virtual size, >= the source's

  Task<Status> write(uint64_t offset, std::span<const std::byte> data) {
    if (raw) return raw->co_write(offset, data);
    return disk->write(offset, data);
  }
};

struct ConvertJob {
  ConvertJob(Disk& s, Target& t, bool progress) : src(s), target(t), status(s), progress(progress) {}
  Disk& src;
  Target& target;
  ChainStatusReader status;
  uint64_t next = 0;  // start of the next chunk to hand out
  uint64_t done = 0;  // bytes copied
  Status error;       // the first failure; workers stop taking chunks
  Progress progress;
};

// One chunk in progress: guest range [start, end) of the target, staged in
// `buf` (which holds the byte at `start` first).
struct Chunk {
  uint64_t start = 0;
  uint64_t end = 0;
  std::byte* buf = nullptr;
  uint64_t copied_to = 0;  // with -c: clusters before this one are written
};

// Writes the 4 KiB blocks (aligned to guest offsets) of `data` that are not
// all zeros, merging neighbours into one request.
Task<Status> write_nonzero(Target& target, uint64_t offset, std::span<const std::byte> data) {
  size_t run_start = 0;
  bool in_run = false;
  for (size_t pos = 0; pos < data.size();) {
    const uint64_t boundary = (offset + pos) / kSparseBlock * kSparseBlock + kSparseBlock;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(boundary - offset, data.size()) - pos);
    const bool zero = all_zero(data.data() + pos, n);
    if (!zero && !in_run) run_start = pos;
    if (zero && in_run) {
      UQ_CO_TRY(co_await target.write(offset + run_start, data.subspan(run_start, pos - run_start)));
    }
    in_run = !zero;
    pos += n;
  }
  if (in_run) UQ_CO_TRY(co_await target.write(offset + run_start, data.subspan(run_start)));
  co_return Status();
}

// Writes each cluster of `data` (cluster aligned; the last one may be the
// disk's partial last cluster) that is not all zeros, compressed.
Task<Status> write_clusters_compressed(Target& target, uint64_t offset, std::span<const std::byte> data) {
  for (size_t pos = 0; pos < data.size(); pos += target.cluster_size) {
    auto cluster = data.subspan(pos, std::min<size_t>(target.cluster_size, data.size() - pos));
    if (all_zero(cluster.data(), cluster.size())) continue;
    UQ_CO_TRY(co_await target.compressed->write_compressed(offset + pos, cluster));
  }
  co_return Status();
}

// Copies guest range [run_start, run_end) of data through its place in the
// chunk's buffer. With -c the range grows to whole clusters, minus those an
// earlier run of the chunk wrote already (a cluster is compressed once).
// Bytes past the end of the source (the target rounds its size up to whole
// sectors) read as zeros.
Task<Status> copy_run(ConvertJob& job, Chunk& chunk, uint64_t run_start, uint64_t run_end) {
  Target& target = job.target;
  if (target.compressed) {
    const uint64_t cs = target.cluster_size;
    run_start = std::max(run_start / cs * cs, chunk.copied_to);
    run_end = std::min((run_end + cs - 1) / cs * cs, chunk.end);
  }
  if (run_end <= run_start) co_return Status();
  chunk.copied_to = run_end;
  std::span<std::byte> data(chunk.buf + (run_start - chunk.start), run_end - run_start);
  const uint64_t read_end = std::clamp(job.src.size(), run_start, run_end);
  UQ_CO_TRY(co_await job.src.read(run_start, data.first(read_end - run_start)));
  std::memset(data.data() + (read_end - run_start), 0, run_end - read_end);
  if (target.compressed) co_return co_await write_clusters_compressed(target, run_start, data);
  co_return co_await write_nonzero(target, run_start, data);
}

// Copies the chunk: ranges that read as zeros are skipped, neighbouring data
// ranges are read with one request.
Task<Status> convert_chunk(ConvertJob& job, Chunk& chunk) {
  const uint64_t data_end = std::min(chunk.end, job.src.size());
  uint64_t run_start = chunk.start, run_end = chunk.start;  // data not copied yet
  for (uint64_t offset = chunk.start; offset < data_end;) {
    auto st = co_await job.status.status(offset, data_end - offset);
    if (!st.ok()) co_return std::move(st).error().with_context("block status");
    offset += st->length;
    if (st->zero) {
      UQ_CO_TRY(co_await copy_run(job, chunk, run_start, run_end));
      run_start = offset;
    }
    run_end = offset;
  }
  co_return co_await copy_run(job, chunk, run_start, run_end);
}

// Takes chunks in offset order until none are left or one failed.
Task<void> convert_worker(ConvertJob& job) {
  AlignedBuffer buf(kChunkBytes);
  const uint64_t size = job.target.size;
  while (job.error.ok() && job.next < size) {
    Chunk chunk;
    chunk.start = chunk.copied_to = job.next;
    chunk.end = std::min(chunk.start + kChunkBytes, size);
    chunk.buf = buf.data();
    job.next = chunk.end;
    Status s = co_await convert_chunk(job, chunk);
    if (!s.ok()) {
      if (job.error.ok()) job.error = std::move(s);
      co_return;
    }
    job.done += chunk.end - chunk.start;
    job.progress.update(job.done, size);
  }
}

Task<Status> copy(Disk& src, Target& target, bool progress) {
  ConvertJob job(src, target, progress);
  TaskGroup workers;
  for (int i = 0; i < kWorkers; ++i) workers.spawn(convert_worker(job));
  co_await workers.join();
  if (!job.error.ok()) co_return job.error;
  job.progress.finish();
  co_return Status();
}

// --- --bitmaps ------------------------------------------------------------

// What --bitmaps copies: the source's bitmaps in directory order.
struct BitmapCopy {
  std::vector<qcow2::BitmapInfo> bitmaps;
  bool skip_broken = false;
};

// convert_check_bitmaps(): QEMU lists bitmaps newest first (its list takes
// each loaded bitmap at its head), so the last inconsistent one is named.
Result<BitmapCopy> plan_bitmaps(const Disk& src, bool skip_broken) {
  const auto* img = dynamic_cast<const qcow2::Qcow2Image*>(&src);
  if (!img) return Error(ENOTSUP, "Source lacks bitmap support");
  BitmapCopy plan{img->bitmap_list(), skip_broken};
  for (auto it = plan.bitmaps.rbegin(); it != plan.bitmaps.rend() && !skip_broken; ++it) {
    if (it->inconsistent) {
      return Error(EINVAL, "Cannot copy inconsistent bitmap '" + it->name +
                               "'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
    }
  }
  return plan;
}

// bdrv_supports_persistent_dirty_bitmap() on the opened target.
Status check_bitmap_target(const Disk* dst, const char* format) {
  const auto* img = dynamic_cast<const qcow2::Qcow2Image*>(dst);
  if (!img || img->header().version < 3) {
    return Error(ENOTSUP, std::string("Format driver '") + format + "' does not support bitmaps");
  }
  return Status();
}

// convert_copy_bitmaps(), into the open target before it closes. Skipped
// bitmaps are announced in QEMU's (newest first) order.
Status copy_bitmaps(const Disk& src, qcow2::Qcow2Image& dst, const BitmapCopy& plan) {
  for (auto it = plan.bitmaps.rbegin(); it != plan.bitmaps.rend(); ++it) {
    if (it->inconsistent) std::fprintf(stderr, "uqcow: warning: Skipping inconsistent bitmap '%s'\n", it->name.c_str());
  }
  for (const auto& b : plan.bitmaps) {
    if (b.inconsistent) continue;
    Status added = dst.bitmap_add(b.name, b.granularity, b.enabled);
    if (!added.ok()) return Error(added.code(), "Failed to create bitmap " + b.name + ": " + added.message());
    auto bits = src.dirty_bitmap(b.name);
    Status merged = bits.ok() ? dst.bitmap_merge(b.name, **bits) : Status(bits.error());
    if (!merged.ok()) {
      (void)dst.bitmap_remove(b.name);
      return Error(merged.code(), "Failed to populate bitmap " + b.name + ": " + merged.message());
    }
  }
  return Status();
}

Task<Status> convert_to_raw(Disk& src, const std::string& dst_path, bool progress, const BitmapCopy* bitmaps) {
  UQ_CO_ASSIGN_OR_RETURN(
      auto dst, RawFile::open(dst_path, RawFileOptions{.read_only = false, .create = true, .lock = kCreateLockPerms}));
  // Truncating to 0 first drops whatever DST held: every byte not written
  // below must read as zero.
  UQ_CO_TRY(dst->truncate(0));
  UQ_CO_TRY(dst->truncate(src.size()));
  // As qemu-img: the raw target exists by now, and cannot take bitmaps.
  if (bitmaps) UQ_CO_TRY(check_bitmap_target(nullptr, "raw"));
  Target target;
  target.raw = dst.get();
  target.size = src.size();
  UQ_CO_TRY(co_await copy(src, target, progress));
  co_return co_await dst->co_flush();
}

Task<Status> convert_to_qcow2(Disk& src, const std::string& dst_path, qcow2::CreateOptions create,
                              bool compress, bool progress, const BitmapCopy* bitmaps) {
  // qcow2 sizes are whole sectors; qemu-img rounds up the same way.
  create.size = (src.size() + 511) / 512 * 512;
  UQ_CO_TRY(co_await qcow2::create_image(dst_path, create));
  OpenOptions options;
  options.read_only = false;
  options.format = "qcow2";
  options.passphrase = create.passphrase;  // an encrypted target (-o encrypt.format)
  UQ_CO_ASSIGN_OR_RETURN(auto dst, co_await open_disk(dst_path, options));
  if (bitmaps) {
    if (Status s = check_bitmap_target(dst.get(), "qcow2"); !s.ok()) {
      (void)co_await dst->close();
      co_return s;
    }
  }
  Target target;
  target.disk = dst.get();
  target.size = dst->size();
  if (compress) {
    target.compressed = dynamic_cast<qcow2::Qcow2Image*>(dst.get());
    if (!target.compressed) co_return Error(EINVAL, dst_path + ": not opened as qcow2");
    target.cluster_size = target.compressed->geometry().cluster_size;
  }
  Status copied = co_await copy(src, target, progress);
  if (copied.ok() && bitmaps) {
    copied = copy_bitmaps(src, *dynamic_cast<qcow2::Qcow2Image*>(dst.get()), *bitmaps);
  }
  // close() flushes (and writes the bitmaps): the image is complete and clean once it returns.
  Status closed = co_await dst->close();
  if (!copied.ok()) co_return copied;
  co_return closed;
}

struct ConvertRequest {
  std::string src_path;
  std::string dst_path;
  OpenOptions src_options;
  bool qcow2 = false;  // else raw
  qcow2::CreateOptions create;
  bool compress = false;
  bool progress = false;
  bool bitmaps = false;
  bool skip_broken_bitmaps = false;
};

Task<int> convert_task(ConvertRequest req) {
  auto src = co_await open_disk(req.src_path, req.src_options);
  if (!src.ok()) co_return fail(src.error());
  std::optional<BitmapCopy> bitmaps;
  Status copied;
  if (req.bitmaps) {
    auto plan = plan_bitmaps(**src, req.skip_broken_bitmaps);
    if (plan.ok()) bitmaps = std::move(*plan);
    else copied = std::move(plan).error();
  }
  const BitmapCopy* copy_plan = bitmaps ? &*bitmaps : nullptr;
  if (!copied.ok()) {
    // Refused before the target is created.
  } else if (req.qcow2) {
    copied = co_await convert_to_qcow2(**src, req.dst_path, req.create, req.compress, req.progress, copy_plan);
  } else {
    copied = co_await convert_to_raw(**src, req.dst_path, req.progress, copy_plan);
  }
  Status closed = co_await (*src)->close();
  if (!copied.ok()) co_return fail(copied);
  if (!closed.ok()) co_return fail(closed);
  co_return 0;
}

// -l takes qemu-img's forms: "snapshot.id=ID", "snapshot.name=NAME", or an
// id or name.
std::string snapshot_key(const std::string& arg) {
  for (const char* prefix : {"snapshot.id=", "snapshot.name="}) {
    if (arg.rfind(prefix, 0) == 0) return arg.substr(std::strlen(prefix));
  }
  return arg;
}

// The qcow2 creation options of -o (repeatable, comma separated), checked
// against what a conversion can honour. Returns "" or what is wrong.
std::string target_options(const Args& args, bool compress, qcow2::CreateOptions& create) {
  std::string list;
  for (const auto& o : args.all("-o")) list += (list.empty() ? "" : ",") + o;
  if (Status s = qcow2::parse_create_options(list, create); !s.ok()) return s.message();
  if (!create.backing_file.empty() || !create.backing_format.empty()) {
    return "backing_file/backing_fmt are not supported: the output is a full copy";
  }
  if (compress && !create.data_file.empty()) {
    // qemu-img creates the target, then fails its first write ("Operation
    // not supported": qcow2 refuses compressed clusters with a data file);
    // this is refused before anything is created.
    return "Compression is not supported with an external data file";
  }
  if (compress && create.preallocation != qcow2::Preallocation::kOff) {
    return "Compression and preallocation not supported at the same time";
  }
  return "";
}

}  // namespace

int cmd_convert(int argc, char** argv) {
  Args args;
  args.option("-O,--target-format", "output format: raw (the default) or qcow2", "FMT")
      .option("-o,--target-options", "qcow2 creation options, comma separated (repeatable)", "OPTIONS")
      .flag("-c,--compress", "write the data clusters compressed (qcow2 only)")
      .option("-l,--snapshot", "convert an internal snapshot (ID, NAME, snapshot.id=ID or snapshot.name=NAME)",
              "SNAPSHOT")
      .flag("-p,--progress", "show progress on stderr (when it is a terminal)")
      .option("--target-passphrase-file", "passphrase of an encrypted target (-o encrypt.format=luks)", "FILE")
      .flag("--bitmaps", "copy the persistent dirty bitmaps (qcow2 to qcow2)")
      .flag("--skip-broken-bitmaps", "with --bitmaps: skip inconsistent bitmaps instead of failing");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  ConvertRequest req;
  req.bitmaps = args.has("--bitmaps");
  req.skip_broken_bitmaps = args.has("--skip-broken-bitmaps");
  if (req.skip_broken_bitmaps && !req.bitmaps) return fail("Use of --skip-broken-bitmaps requires --bitmaps");
  const std::string out_format = args.get_or("-O", "raw");
  if (out_format != "raw" && out_format != "qcow2") {
    return fail("convert: output format '" + out_format + "' is not supported (raw, qcow2)");
  }
  req.qcow2 = out_format == "qcow2";
  req.compress = args.has("-c");
  if (!req.qcow2 && req.compress) return fail("convert: Compression not supported for this file format");
  if (!req.qcow2 && args.has("-o")) return fail("convert: -o is only supported with -O qcow2");
  if (req.qcow2) {
    if (auto f = args.get("--target-passphrase-file")) {
      auto secret = read_passphrase_file(*f);
      if (!secret.ok()) return fail(secret.error());
      req.create.passphrase = std::move(secret).value();
    }
    if (std::string e = target_options(args, req.compress, req.create); !e.empty()) return fail("convert: " + e);
  }
  if (args.positional().size() != 2) return fail("convert: expecting a source and a destination file name (see --help)");
  auto options = open_options(args, /*read_only=*/true);
  if (!options.ok()) return fail(options.error());
  if (auto snapshot = args.get("-l")) options->snapshot = snapshot_key(*snapshot);
  req.src_path = args.positional()[0];
  req.dst_path = args.positional()[1];
  req.src_options = std::move(*options);
  req.progress = args.has("-p");
  return run(convert_task(std::move(req)));
}

}  // namespace uqcow::cli
