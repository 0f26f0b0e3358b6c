// uqcow check: qemu-img check for qcow2 images. Same findings, output
// (human and JSON) and exit codes; -r repairs in place.
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "block/open.h"
#include "block/path.h"
#include "qcow2/check.h"
#include "tools/cli.h"
#include "uring/raw_file.h"

namespace uqcow::cli {
namespace {

using qcow2::CheckResult;
using qcow2::RepairMode;

constexpr char kUsage[] = "uqcow check [-U] [-r leaks|all] [--output=human|json] [-f FMT] [-q] FILE";
constexpr char kDescription[] =
    "Check the metadata of a qcow2 image: every refcount against the references to its\n"
    "cluster, and the L1/L2 entries. -r leaks frees leaked clusters; -r all also fixes\n"
    "corruptions, rebuilding the refcount structure when it is broken. The image is\n"
    "opened read-write only with -r.\n"
    "Exit status (as qemu-img): 0 no errors, 1 the check could not be completed,\n"
    "2 corruptions remain, 3 only leaked clusters remain, 63 the format has no checks.";

// qemu-img check's exit codes.
constexpr int kExitClean = 0;
constexpr int kExitFailed = 1;
constexpr int kExitCorrupt = 2;
constexpr int kExitLeaks = 3;
constexpr int kExitUnsupported = 63;

void print_human(const CheckResult& r) {
  if (r.corruptions_fixed || r.leaks_fixed) {
    std::printf("The following inconsistencies were found and repaired:\n\n"
                "    %llu leaked clusters\n    %llu corruptions\n\n"
                "Double checking the fixed image now...\n",
                static_cast<unsigned long long>(r.leaks_fixed),
                static_cast<unsigned long long>(r.corruptions_fixed));
  }
  if (!r.corruptions && !r.leaks && !r.check_errors) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions) {
      std::printf("\n%llu errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  static_cast<unsigned long long>(r.corruptions));
    }
    if (r.leaks) {
      std::printf("\n%llu leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  static_cast<unsigned long long>(r.leaks));
    }
    if (r.check_errors) {
      std::printf("\n%llu internal errors have occurred during the check.\n",
                  static_cast<unsigned long long>(r.check_errors));
    }
  }
  if (r.total_clusters && r.allocated_clusters) {
    const double allocated = static_cast<double>(r.allocated_clusters);
    std::printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                static_cast<unsigned long long>(r.allocated_clusters),
                static_cast<unsigned long long>(r.total_clusters),
                allocated * 100.0 / static_cast<double>(r.total_clusters),
                static_cast<double>(r.fragmented_clusters) * 100.0 / allocated,
                static_cast<double>(r.compressed_clusters) * 100.0 / allocated);
  }
  if (r.image_end_offset) {
    std::printf("Image end offset: %llu\n", static_cast<unsigned long long>(r.image_end_offset));
  }
}

// qemu-img prints a QDict: the keys come in its hash order, optional ones
// only when non-zero, check-errors, filename and format always.
void print_json(const CheckResult& r, const std::string& filename) {
  std::vector<std::pair<std::string, std::string>> fields;
  auto number = [&](const char* key, uint64_t v, bool always = false) {
    if (v || always) fields.emplace_back(key, std::to_string(v));
  };
  number("image-end-offset", r.image_end_offset);
  number("compressed-clusters", r.compressed_clusters);
  number("total-clusters", r.total_clusters);
  number("corruptions", r.corruptions);
  number("corruptions-fixed", r.corruptions_fixed);
  number("check-errors", r.check_errors, true);
  number("leaks", r.leaks);
  number("leaks-fixed", r.leaks_fixed);
  number("allocated-clusters", r.allocated_clusters);
  fields.emplace_back("filename", json_string(filename));
  fields.emplace_back("format", json_string("qcow2"));
  number("fragmented-clusters", r.fragmented_clusters);
  std::string out = "{\n";
  for (size_t i = 0; i < fields.size(); ++i) {
    out += "    \"" + fields[i].first + "\": " + fields[i].second + (i + 1 < fields.size() ? ",\n" : "\n");
  }
  std::printf("%s}\n", out.c_str());
}

// Opens the image (read-write only to repair, as `options` says) and its
// external data file (read-only: a repair never writes guest data; locked
// as the image's mode says, as QEMU locks it), then checks.
// The image file is wrapped as options.wrap_file says (--inject: a fault
// injector).
Task<Result<CheckResult>> open_and_check(const std::string& path, RepairMode mode, OpenOptions options) {
  if (Status s = check_lock_options(options); !s.ok()) {
    co_return s.error().with_context("Could not open '" + path + "'");
  }
  auto raw = RawFile::open(path, {.read_only = options.read_only,
                                  .cache = options.cache,
                                  .lock = lock_perms(options, LockedFile::kQcow2Image)});
  if (!raw.ok()) co_return std::move(raw).error().with_context("Could not open '" + path + "'");
  std::unique_ptr<BlockDevice> file = std::move(raw).value();
  if (options.wrap_file) {
    auto wrapped = options.wrap_file(std::move(file));
    if (!wrapped.ok()) co_return std::move(wrapped).error().with_context("Could not open '" + path + "'");
    file = std::move(wrapped).value();
  }
  auto header = co_await qcow2::read_image_header(*file, qcow2::HeaderUse::kCheck);
  if (!header.ok()) co_return std::move(header).error().with_context("Could not open '" + path + "'");
  std::unique_ptr<RawFile> data_file;
  if (header->has_data_file()) {
    std::string data_path = resolve_relative(path, *header->data_file);
    auto df = RawFile::open(data_path, {.read_only = true,
                                        .cache = options.cache,
                                        .lock = lock_perms(options, LockedFile::kDataFile)});
    if (!df.ok()) co_return std::move(df).error().with_context("Could not open external data file");
    data_file = std::move(df).value();
  }
  co_return co_await qcow2::check_image(*file, data_file.get(), mode, /*remove_inconsistent_bitmaps=*/mode == RepairMode::kAll);
}

// The exit code and output once the check has run.
int report(const CheckResult& r, const std::string& filename, bool json, bool quiet) {
  for (const auto& m : r.messages) std::fprintf(stderr, "%s\n", m.c_str());
  if (r.messages_dropped) {
    std::fprintf(stderr, "(%llu more lines of findings not shown)\n",
                 static_cast<unsigned long long>(r.messages_dropped));
  }
  if (!r.stopped.ok()) return fail("Check failed: " + r.stopped.message(), kExitFailed);
  if (!quiet) {
    if (json) {
      print_json(r, filename);
    } else {
      print_human(r);
    }
  }
  std::fflush(stdout);
  if (r.check_errors) return fail("Check failed", kExitFailed);
  if (r.corruptions) return kExitCorrupt;
  return r.leaks ? kExitLeaks : kExitClean;
}

}  // namespace

int cmd_check(int argc, char** argv) {
  Args args;
  args.option("-r,--repair", "repair: 'leaks' or 'all'", "leaks|all")
      .option("--output", "output format: human (default) or json", "FMT")
      .flag("-q,--quiet", "print nothing on standard output")
      .flag("-h,--help", "show this help");
  add_open_flags(args);
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.has("-h")) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail(std::string("usage: ") + kUsage);
  const std::string& path = args.positional()[0];

  RepairMode mode = RepairMode::kNone;
  if (auto r = args.get("-r")) {
    if (*r == "leaks") {
      mode = RepairMode::kLeaks;
    } else if (*r == "all") {
      mode = RepairMode::kAll;
    } else {
      return fail("Unknown option for -r (expecting 'leaks' or 'all'): " + *r);
    }
  }
  const std::string output = args.get_or("--output", "human");
  if (output != "human" && output != "json") {
    return fail("--output must be used with human or json as argument.");
  }
  auto options = open_options(args, mode == RepairMode::kNone);
  if (!options.ok()) return fail(options.error().message());
  std::string format = options->format;
  if (format.empty()) {
    auto probed = probe_format(path);
    if (!probed.ok()) return fail("Could not open '" + path + "': " + probed.error().message());
    format = *probed;
  }
  if (format == "raw") return fail("This image format does not support checks", kExitUnsupported);
  if (format != "qcow2") return fail("Unknown driver '" + format + "' (qcow2 and raw are supported)");

  auto result = run(open_and_check(path, mode, std::move(*options)));
  if (!result.ok()) return fail(result.error().message());
  return report(*result, path, output == "json", args.has("-q"));
}

}  // namespace uqcow::cli
