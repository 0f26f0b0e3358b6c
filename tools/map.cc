// uqcow map: the allocation map of an image through its backing chain, in
// qemu-img map's two formats, entry for entry: the status of each range comes
// from ChainStatusReader, and entries are merged and printed exactly as
// qemu-img's img_map() merges and prints them.
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <string>

#include "block/chain_status.h"
#include "block/open.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

enum class OutputFormat { kHuman, kJson };

constexpr char kUsage[] =
    "uqcow map [-U] [-f FMT] [--output=human|json] [--start-offset=OFFSET] [--max-length=LEN] FILE";
constexpr char kDescription[] =
    "Prints the allocation map of FILE through its backing chain, as 'qemu-img map' does.\n"
    "The human format lists the data extents with their host offsets; the json format lists\n"
    "every extent with its depth in the chain and its present/zero/data flags.";

// qemu-img's MapEntry: one extent of the map.
struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  bool data = false;
  bool zero = false;
  bool present = false;
  bool has_offset = false;
  uint64_t offset = 0;
  int depth = 0;
  const std::string* filename = nullptr;  // the file holding `offset`
};

MapEntry to_entry(uint64_t start, const ChainStatus& st) {
  MapEntry e;
  e.start = start;
  e.length = st.length;
  e.data = st.data;
  e.zero = st.zero;
  e.present = st.allocated;
  e.has_offset = st.has_offset;
  e.offset = st.offset;
  e.depth = st.depth;
  e.filename = st.has_offset ? st.file : nullptr;
  return e;
}

// qemu-img's entry_mergeable(): same flags, same file, and contiguous host
// offsets where there are any.
bool mergeable(const MapEntry& curr, const MapEntry& next) {
  if (curr.length == 0) return false;
  if (curr.zero != next.zero || curr.data != next.data || curr.depth != next.depth ||
      curr.present != next.present || !curr.filename != !next.filename ||
      curr.has_offset != next.has_offset) {
    return false;
  }
  if (curr.filename && *curr.filename != *next.filename) return false;
  if (curr.has_offset && curr.offset + curr.length != next.offset) return false;
  return true;
}

// qemu-img's dump_map_entry(). The human format shows data extents only, and
// ignores the difference between unallocated, zero and zero+data: it folds
// `next` accordingly so that more extents coalesce. Returns false (after
// reporting it) for an extent the human format cannot show.
bool dump_entry(OutputFormat format, const MapEntry& e, MapEntry* next) {
  if (format == OutputFormat::kHuman) {
    if (e.data && !e.has_offset) {
      fail("File contains external, encrypted or compressed clusters.");
      return false;
    }
    if (e.data && !e.zero) {
      std::printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e.start, e.length,
                  e.has_offset ? e.offset : 0, e.filename ? e.filename->c_str() : "");
    }
    if (next && (!next->data || next->zero)) {
      next->data = false;
      next->zero = true;
    }
    return true;
  }
  std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d, \"present\": %s, "
              "\"zero\": %s, \"data\": %s",
              e.start, e.length, e.depth, e.present ? "true" : "false", e.zero ? "true" : "false",
              e.data ? "true" : "false");
  if (e.has_offset) std::printf(", \"offset\": %" PRIu64, e.offset);
  std::putchar('}');
  if (next) std::puts(",");
  return true;
}

// img_map()'s loop over [start, end): query, merge while possible, print.
Task<int> print_map(Disk& disk, OutputFormat format, uint64_t start, uint64_t end) {
  if (format == OutputFormat::kHuman) {
    std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  } else {
    std::printf("[");
  }
  ChainStatusReader reader(disk);
  MapEntry curr;
  curr.start = start;
  while (curr.start + curr.length < end) {
    const uint64_t offset = curr.start + curr.length;
    auto st = co_await reader.status(offset, end - offset);
    if (!st.ok()) co_return fail("Could not read file metadata: " + st.error().message());
    MapEntry next = to_entry(offset, *st);
    if (mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0 && !dump_entry(format, curr, &next)) co_return 1;
    curr = next;
  }
  if (!dump_entry(format, curr, nullptr)) co_return 1;
  if (format == OutputFormat::kJson) std::puts("]");
  co_return 0;
}

Task<int> map_image(std::string path, OpenOptions options, OutputFormat format, uint64_t start,
                    std::optional<uint64_t> max_length) {
  auto disk = co_await open_disk(path, options);
  if (!disk.ok()) co_return fail(disk.error());
  uint64_t end = (*disk)->size();
  if (max_length) end = std::min(end, start + std::min(*max_length, UINT64_MAX - start));
  int rc = co_await print_map(**disk, format, start, end);
  std::fflush(stdout);
  Status closed = co_await (*disk)->close();
  if (!closed.ok() && rc == 0) rc = fail(closed);
  co_return rc;
}

}  // namespace

int cmd_map(int argc, char** argv) {
  Args args;
  args.option("--output", "output format: human (default) or json", "FMT")
      .option("--start-offset", "first byte to map (k, M, G... suffixes)", "OFFSET")
      .option("--max-length", "map at most this many bytes", "LEN");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail("map: expecting one image file name (see --help)");

  const std::string output = args.get_or("--output", "human");
  if (output != "human" && output != "json") {
    return fail("--output must be used with human or json as argument.");
  }
  uint64_t start = 0;
  if (auto v = args.get("--start-offset")) {
    auto parsed = parse_size(*v, "start offset");
    if (!parsed.ok()) return fail(parsed.error());
    start = *parsed;
  }
  std::optional<uint64_t> max_length;
  if (auto v = args.get("--max-length")) {
    auto parsed = parse_size(*v, "max length");
    if (!parsed.ok()) return fail(parsed.error());
    max_length = *parsed;
  }
  auto options = open_options(args, /*read_only=*/true);
  if (!options.ok()) return fail(options.error());
  return run(map_image(args.positional()[0], std::move(*options),
                       output == "json" ? OutputFormat::kJson : OutputFormat::kHuman, start,
                       max_length));
}

}  // namespace uqcow::cli
