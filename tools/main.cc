// uqcow: one binary, subcommands in the style of qemu-img.
#include <cstdio>
#include <cstring>

#include "tools/cli.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

const Command kCommands[] = {
    {"create", uqcow::cli::cmd_create, "create a new image"},
    {"info", uqcow::cli::cmd_info, "show information about an image"},
    {"map", uqcow::cli::cmd_map, "show the allocation map of an image"},
    {"convert", uqcow::cli::cmd_convert, "copy an image to another format or file"},
    {"compare", uqcow::cli::cmd_compare, "compare the guest-visible content of two images"},
    {"resize", uqcow::cli::cmd_resize, "change the virtual size of an image"},
    {"snapshot", uqcow::cli::cmd_snapshot, "list, create, apply or delete internal snapshots"},
    {"io", uqcow::cli::cmd_io, "run qemu-io style commands against an image"},
    {"bench", uqcow::cli::cmd_bench, "benchmark random or sequential I/O on an image"},
    {"check", uqcow::cli::cmd_check, "check (and repair) an image's metadata"},
    {"bitmap", uqcow::cli::cmd_bitmap, "add, remove, clear, enable, disable or merge persistent dirty bitmaps"},
    {"serve", uqcow::cli::cmd_serve, "export an image over NBD"},
};

void usage(FILE* out) {
  std::fprintf(out, "usage: uqcow COMMAND [options] ...\n\nCommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
  std::fprintf(out, "\nRun 'uqcow COMMAND --help' for the options of a command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 1;
  }
  if (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  for (const auto& c : kCommands) {
    // Each subcommand sees argv[0] = its name.
    if (!std::strcmp(argv[1], c.name)) return c.run(argc - 1, argv + 1);
  }
  std::fprintf(stderr, "uqcow: unknown command '%s'\n", argv[1]);
  usage(stderr);
  return 1;
}
