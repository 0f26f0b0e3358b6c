// uqcow resize: change the virtual size of an image, like qemu-img resize.
#include <cstdio>

#include "qcow2/image.h"
#include "qcow2/open.h"
#include "qcow2/raw_disk.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow resize [-f FMT] [--shrink] FILE [+|-]SIZE";
constexpr char kDescription[] =
    "Change the virtual size. SIZE is absolute, or relative with + or -.\n"
    "Shrinking needs --shrink; as with qemu-img, the data beyond the new end\n"
    "is discarded and the image file is truncated after its last used cluster.";

Task<Status> resize(const std::string& path, const OpenOptions& o, const std::string& spec, bool allow_shrink) {
  auto disk = co_await open_disk(path, o);
  if (!disk.ok()) co_return std::move(disk).error();
  Disk& d = **disk;
  uint64_t size = d.size();
  std::string digits = spec;
  int sign = 0;
  if (!spec.empty() && (spec[0] == '+' || spec[0] == '-')) {
    sign = spec[0] == '+' ? 1 : -1;
    digits = spec.substr(1);
  }
  auto n = parse_size(digits, "size");
  Status s;
  if (!n.ok()) {
    s = std::move(n).error();
  } else {
    uint64_t target = sign == 0 ? *n : sign > 0 ? size + *n : (*n > size ? 0 : size - *n);
    if (sign < 0 && *n > size) s = Error(EINVAL, "size: cannot shrink below zero");
    else if (target < size && !allow_shrink) s = Error(EINVAL, "shrinking needs --shrink (it may lose data)");
    else if (auto* q = dynamic_cast<qcow2::Qcow2Image*>(&d)) s = co_await q->resize(target);
    else if (auto* r = dynamic_cast<RawDisk*>(&d)) s = r->file().truncate(target);
  }
  Status c = co_await d.close();
  co_return s.ok() ? c : s;
}

}  // namespace

int cmd_resize(int argc, char** argv) {
  Args args;
  args.flag("--shrink", "allow the size to go down").flag("-q,--quiet", "print nothing").flag("-h,--help", "show this help");
  add_open_flags(args);
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.has("-h")) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 2) return fail(std::string("usage: ") + kUsage);
  auto o = open_options(args, false);
  if (!o.ok()) return fail(o.error().message());
  o->no_backing = true;
  o->resize = true;
  Status s = run(resize(args.positional()[0], *o, args.positional()[1], args.has("--shrink")));
  if (!s.ok()) return fail(s);
  if (!args.has("-q")) std::printf("Image resized.\n");
  return 0;
}

}  // namespace uqcow::cli
