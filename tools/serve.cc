// uqcow serve: export an image over NBD (like qemu-nbd), from a unix socket
// or a TCP port, until SIGTERM or SIGINT.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "block/open.h"
#include "nbd/server.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] =
    "uqcow serve [--socket PATH | --bind ADDR --port N] [--export NAME] [--read-only] [-A] [-B NAME]...\n"
    "            [-t CACHE] FILE";
constexpr char kDescription[] =
    "Serves FILE over NBD (fixed newstyle, structured replies) until SIGTERM or\n"
    "SIGINT; then answers the requests in flight, flushes and closes the image.\n"
    "Without --socket it listens on TCP (default port 10809).\n"
    "Metadata contexts for NBD_CMD_BLOCK_STATUS, as qemu-nbd offers them:\n"
    "base:allocation always; qemu:allocation-depth with -A (0 unallocated, 1 in\n"
    "FILE, 2 in its backing file, ...); qemu:dirty-bitmap:NAME with -B NAME, the\n"
    "persistent bitmap NAME of FILE or of a backing file (dirty = 1), read live:\n"
    "writes through the server mark it. A bitmap that does not exist or is\n"
    "inconsistent stops serve before it listens (exit 1).";

// The contexts -A and -B offer. Like qemu-nbd, the bitmaps are exported in
// the reverse order of the -B options (ids and META_CONTEXT replies follow
// that order).
Status offer_contexts(const Disk& disk, bool allocation_depth, const std::vector<std::string>& bitmaps,
                      nbd::OfferedContexts& offered) {
  offered.allocation_depth = allocation_depth;
  for (auto name = bitmaps.rbegin(); name != bitmaps.rend(); ++name) {
    UQ_ASSIGN_OR_RETURN(nbd::ExportedBitmap b, nbd::find_export_bitmap(disk, *name));
    offered.bitmaps.push_back(std::move(b));
  }
  return Status();
}

Task<Status> serve(const std::string& path, OpenOptions options, nbd::Export exp,
                   const nbd::ListenAddress& address, bool allocation_depth,
                   std::vector<std::string> bitmaps) {
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(path, options));
  exp.disk = disk.get();
  exp.read_only = options.read_only;
  Status served = offer_contexts(*disk, allocation_depth, bitmaps, exp.contexts);
  if (served.ok()) {
    nbd::Server server(exp);
    served = server.listen(address);
    if (served.ok()) {
      std::fprintf(stderr, "uqcow serve: exporting %s on %s\n", path.c_str(),
                   address.unix_path.empty()
                       ? (address.host + ":" + std::to_string(address.port)).c_str()
                       : address.unix_path.c_str());
      served = co_await server.run();
    }
  }
  Status closed = co_await disk->close();
  co_return served.ok() ? closed : served;
}

}  // namespace

int cmd_serve(int argc, char** argv) {
  Args args;
  args.option("--socket", "listen on this unix socket", "PATH")
      .option("--bind", "TCP address to listen on (default: all)", "ADDR")
      .option("-p,--port", "TCP port (default 10809)", "N")
      .option("-x,--export", "export name (default: empty)", "NAME")
      .flag("-r,--read-only", "export read-only")
      .flag("-A,--allocation-depth", "offer the qemu:allocation-depth context")
      .option("-B,--bitmap", "offer persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME (repeatable)",
              "NAME");
  add_open_flags(args);
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail(std::string("usage: ") + kUsage);
  nbd::ListenAddress address;
  if (auto s = args.get("--socket")) {
    if (args.has("--bind") || args.has("-p")) return fail("--socket excludes --bind and --port");
    address.unix_path = *s;
  } else {
    address.host = args.get_or("--bind", "");
    char* end = nullptr;
    std::string port = args.get_or("-p", "10809");
    unsigned long n = std::strtoul(port.c_str(), &end, 10);
    if (port.empty() || *end != '\0' || n == 0 || n > 65535) return fail("--port: not a port number: " + port);
    address.port = static_cast<uint16_t>(n);
  }
  auto o = open_options(args, args.has("-r"));
  if (!o.ok()) return fail(o.error().message());
  nbd::Export exp;
  exp.name = args.get_or("-x", "");
  Status s = run(serve(args.positional()[0], *o, exp, address, args.has("-A"), args.all("-B")));
  if (!s.ok()) return fail(s);
  return 0;
}

}  // namespace uqcow::cli
