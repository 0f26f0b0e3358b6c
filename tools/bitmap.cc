// uqcow bitmap: qemu-img 7.2's `bitmap` subcommand. One image is opened
// read-write without its backing chain, the actions run in command-line
// order on its persistent dirty bitmaps, and close() writes them (as
// qemu-img's bdrv_inactivate_all). An action that fails stops the sequence;
// the ones before it are still written, as with qemu-img.
//
// Errors are qemu-img's, checked in its order: the command line
// (img_bitmap), then each action as QMP's block-dirty-bitmap-* commands
// check it ("Operation add on bitmap b0 failed: Bitmap already exists: b0").
// Where qemu-img names a node ("#block123", an internal counter), uqcow
// names the file.
#include <algorithm>
#include <bit>
#include <climits>
#include <cstdio>
#include <string>
#include <vector>

#include "block/open.h"
#include "qcow2/image.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] =
    "uqcow bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
    "             [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--disabled] [-f FMT] FILENAME BITMAP";
constexpr char kDescription[] =
    "Changes the persistent dirty bitmap BITMAP of the qcow2 image FILENAME, through one\n"
    "or more actions applied in the order given: --add creates it (granularity -g, by\n"
    "default the cluster size within 4k..64k; --add --disable or --add --disabled creates\n"
    "it disabled), --remove deletes it, --clear marks it clean, --enable/--disable start\n"
    "and stop its tracking of writes, --merge SOURCE marks in it everything dirty in the\n"
    "bitmap SOURCE of the same image, or of SOURCE_FILE with -b (opened read-only, format\n"
    "-F). Options, messages and exit codes are qemu-img bitmap's.";

enum class Action { kAdd, kRemove, kClear, kEnable, kDisable, kMerge };

struct Step {
  Action action;
  std::string source;  // --merge's source bitmap
};

const char* op_name(Action a) {
  switch (a) {
    case Action::kAdd: return "add";
    case Action::kRemove: return "remove";
    case Action::kClear: return "clear";
    case Action::kEnable: return "enable";
    case Action::kDisable: return "disable";
    case Action::kMerge: return "merge";
  }
  return "";
}

struct BitmapRequest {
  std::string path;
  std::string name;
  std::vector<Step> steps;
  uint64_t granularity = 0;  // 0: the default (as qemu-img: -g 0 is "not given")
  bool add_disabled = false;  // --disabled: every --add creates it disabled
  std::string source_path;    // -b
  OpenOptions options;
  OpenOptions source_options;
};

// What QMP's bitmap lookup says about `name` on `disk`: the usable bitmap,
// ENOENT "not found", or EINVAL "inconsistent" with QEMU's hint
// (bdrv_dirty_bitmap_check).
Result<const DirtyBitmap*> usable_bitmap(const Disk& disk, const std::string& name) {
  auto found = disk.dirty_bitmap(name);
  if (found.ok()) return found;
  if (found.error().code() == ENOENT) return Error(ENOENT, "Dirty bitmap '" + name + "' not found");
  return Error(found.error().code(), found.error().message() +
                                         "\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
}

// qmp_block_dirty_bitmap_add's checks, then qcow2's (prefixed as QEMU's
// bdrv_can_store_new_dirty_bitmap prefixes them).
Status add(qcow2::Qcow2Image* img, const std::string& path, const BitmapRequest& req) {
  if (req.name.empty()) return Error(EINVAL, "Bitmap name cannot be empty");
  uint64_t granularity = req.granularity;
  if (granularity != 0) {
    // QMP's granularity is a uint32: qemu-img passes -g truncated to it.
    granularity &= 0xffffffffu;
    if (granularity < 512 || !std::has_single_bit(granularity)) {
      return Error(EINVAL, "Granularity must be power of 2 and at least 512");
    }
  }
  if (!img) return Error(ENOTSUP, "Can't store persistent bitmaps to " + path + ": Operation not supported");
  if (granularity == 0) {
    // bdrv_get_default_bitmap_granularity(): the cluster size within 4k..64k.
    granularity = std::clamp<uint64_t>(img->geometry().cluster_size, 4096, 65536);
  }
  Status s = img->bitmap_add(req.name, granularity, !req.add_disabled);
  if (s.ok() || s.code() == EEXIST) return s;
  return Error(s.code(), "Can't make bitmap '" + req.name + "' persistent in '" + path + "': " + s.message());
}

// block-dirty-bitmap-merge: the target is looked up and checked first, then
// the source, whose disk must have the same size (hbitmap_can_merge).
Status merge(qcow2::Qcow2Image* img, const Disk& target, const Disk& source, const std::string& name,
             const std::string& source_name) {
  UQ_TRY(usable_bitmap(target, name));
  UQ_ASSIGN_OR_RETURN(const DirtyBitmap* src, usable_bitmap(source, source_name));
  if (source.size() != target.size()) {
    return Error(EINVAL, "Bitmaps are of different sizes (destination size is " + std::to_string(target.size()) +
                             ", source size is " + std::to_string(source.size()) + ") and can't be merged");
  }
  return img->bitmap_merge(name, *src);
}

// One action on `disk` (a raw disk has no bitmaps: only add says more than
// "not found").
Status apply(const Step& step, Disk& disk, const Disk& source, const BitmapRequest& req) {
  auto* img = dynamic_cast<qcow2::Qcow2Image*>(&disk);
  if (step.action == Action::kAdd) return add(img, req.path, req);
  if (!img) return Error(ENOENT, "Dirty bitmap '" + req.name + "' not found");
  switch (step.action) {
    case Action::kRemove:
      return img->bitmap_remove(req.name);
    case Action::kClear:
      UQ_TRY(usable_bitmap(disk, req.name));
      return img->bitmap_clear(req.name);
    case Action::kEnable:
    case Action::kDisable:
      UQ_TRY(usable_bitmap(disk, req.name));
      return img->bitmap_set_enabled(req.name, step.action == Action::kEnable);
    case Action::kMerge:
      return merge(img, disk, source, req.name, step.source);
    default:
      return Status();
  }
}

Task<Result<std::unique_ptr<Disk>>> open_or_say(const std::string& path, const OpenOptions& options) {
  auto disk = co_await open_disk(path, options);
  if (!disk.ok()) co_return std::move(disk).error().with_context("Could not open '" + path + "'");
  co_return disk;
}

// Runs the steps; the image (and the source image) are closed whatever
// happened, so that the steps done before a failure are written.
Task<Status> run_steps(const BitmapRequest& req, Disk& disk, const Disk& source) {
  for (const Step& step : req.steps) {
    Status s = apply(step, disk, source, req);
    if (!s.ok()) {
      co_return Error(s.code(), std::string("Operation ") + op_name(step.action) + " on bitmap " + req.name +
                                    " failed: " + s.message());
    }
  }
  co_return Status();
}

Task<Status> bitmap_task(BitmapRequest req) {
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_or_say(req.path, req.options));
  std::unique_ptr<Disk> source_disk;
  Status s;
  if (!req.source_path.empty()) {
    auto src = co_await open_or_say(req.source_path, req.source_options);
    if (src.ok()) source_disk = std::move(*src);
    else s = std::move(src).error();
  }
  if (s.ok()) s = co_await run_steps(req, *disk, source_disk ? *source_disk : *disk);
  if (source_disk) (void)co_await source_disk->close();  // read-only: nothing to write
  Status closed = co_await disk->close();
  if (!s.ok()) co_return s;
  if (!closed.ok()) co_return Error(closed.code(), "Error while closing the image: " + closed.message());
  co_return Status();
}

// cvtnum("granularity", ...) of qemu-img: two lines for a bad number.
int bad_granularity(const Status& parsed) {
  if (parsed.code() == ERANGE) return fail("Invalid granularity specified. Must be between 0 and 9223372036854775807.");
  fail("Invalid granularity specified. You may use k, M, G, T, P or E suffixes for");
  return fail("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
}

// Builds the step list from the options in command-line order; -g is parsed
// where it stands, as qemu-img's getopt loop does. Returns the exit code of
// a refusal, or 0.
int read_steps(const Args& args, BitmapRequest& req) {
  for (const auto& [name, value] : args.sequence()) {
    if (name == "--add") req.steps.push_back({Action::kAdd, ""});
    else if (name == "--remove") req.steps.push_back({Action::kRemove, ""});
    else if (name == "--clear") req.steps.push_back({Action::kClear, ""});
    else if (name == "--enable") req.steps.push_back({Action::kEnable, ""});
    else if (name == "--disable") req.steps.push_back({Action::kDisable, ""});
    else if (name == "--merge") req.steps.push_back({Action::kMerge, value});
    else if (name == "-g") {
      auto g = parse_size(value, "granularity");
      if (!g.ok()) return bad_granularity(Status(g.error()));
      if (*g > uint64_t{INT64_MAX}) return bad_granularity(Error(ERANGE, ""));
      req.granularity = *g;
    }
  }
  return 0;
}

bool has_step(const BitmapRequest& req, Action a) {
  return std::any_of(req.steps.begin(), req.steps.end(), [a](const Step& s) { return s.action == a; });
}

// img_bitmap's checks of the command line, in its order.
int check_request(const Args& args, BitmapRequest& req) {
  if (req.steps.empty()) return fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
  if (req.granularity && !has_step(req, Action::kAdd)) return fail("granularity only supported with --add");
  if (req.add_disabled && !has_step(req, Action::kAdd)) return fail("--disabled only supported with --add");
  if (args.has("-F") && !args.has("-b")) return fail("-F only supported with -b");
  if (args.has("-b") && !has_step(req, Action::kMerge)) {
    return fail("Merge bitmap source file only supported with --merge");
  }
  if (args.positional().size() != 2) return fail("Expecting filename and bitmap name");
  req.path = args.positional()[0];
  req.name = args.positional()[1];
  return 0;
}

}  // namespace

int cmd_bitmap(int argc, char** argv) {
  Args args;
  args.flag("--add", "create the bitmap")
      .flag("--remove", "delete the bitmap")
      .flag("--clear", "mark the whole bitmap clean")
      .flag("--enable", "let the bitmap track writes")
      .flag("--disable", "stop the bitmap tracking writes")
      .option("--merge", "mark dirty what is dirty in bitmap SOURCE", "SOURCE")
      .flag("--disabled", "--add creates the bitmap disabled (as --add --disable)")
      .option("-g,--granularity", "bytes per bit for --add (power of 2, at least 512)", "GRANULARITY")
      .option("-b,--source-file", "the image holding --merge's source bitmap", "SOURCE_FILE")
      .option("-F,--source-format", "the format of SOURCE_FILE", "SOURCE_FMT");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  BitmapRequest req;
  req.add_disabled = args.has("--disabled");
  if (int rc = read_steps(args, req)) return rc;
  if (int rc = check_request(args, req)) return rc;
  auto options = open_options(args, /*read_only=*/false);
  if (!options.ok()) return fail(options.error());
  // Bitmaps belong to this image alone: no backing chain (qemu-img's
  // BDRV_O_NO_BACKING).
  options->no_backing = true;
  req.options = *options;
  if (auto b = args.get("-b")) {
    req.source_path = *b;
    req.source_options = *options;
    req.source_options.read_only = true;
    req.source_options.format = args.get_or("-F", "");
  }
  Status s = run(bitmap_task(std::move(req)));
  return s.ok() ? 0 : fail(s);
}

}  // namespace uqcow::cli
