// uqcow resize: change the virtual size of an image, like qemu-img resize.
#include <cstdio>

#include "block/open.h"
#include "block/raw_disk.h"
#include "qcow2/image.h"
#include "tools/cli.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow resize [-f FMT] [--shrink] FILE [+|-]SIZE";
constexpr char kDescription[] =
    "Change the virtual size. SIZE is absolute, or relative with + or -.\n"
    "Shrinking needs --shrink; as with qemu-img, the data past the new end is\n"
    "discarded and the image file is truncated after its last used cluster. A\n"
    "qcow2 size must be a multiple of 512. Errors use qemu-img resize's wording.";

// The size argument, parsed as qemu-img resize parses it (QemuOpts 'size').
Result<uint64_t> parse_resize_size(const std::string& digits) {
  auto n = parse_size(digits, "size");
  if (n.ok()) return n;
  if (n.error().code() == ERANGE) return Error(EINVAL, "Value '" + digits + "' is out of range for parameter 'size'");
  return Error(EINVAL,
               "Parameter 'size' expects a non-negative number below 2^64\n"
               "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
               "and exabytes, respectively.");
}

// qemu-img's img_resize checks, in its order, over int64 arithmetic as
// there (a size of 2^63 or more is negative). Returns the new size.
Result<uint64_t> target_size(uint64_t current, uint64_t n, int sign, bool allow_shrink) {
  const int64_t total = static_cast<int64_t>(sign == 0 ? n : sign > 0 ? current + n : current - n);
  if (total <= 0) return Error(EINVAL, "New image size must be positive");
  if (static_cast<uint64_t>(total) < current && !allow_shrink) {
    return Error(EINVAL,
                 "Use the --shrink option to perform a shrink operation.\n"
                 "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                 "Before performing such an operation, make sure there is no important data there.");
  }
  return static_cast<uint64_t>(total);
}

Task<Status> resize(const std::string& path, const OpenOptions& o, const std::string& spec, bool allow_shrink) {
  std::string digits = spec;
  int sign = 0;
  if (!spec.empty() && (spec[0] == '+' || spec[0] == '-')) {
    sign = spec[0] == '+' ? 1 : -1;
    digits = spec.substr(1);
  }
  // Parsed before the image is opened, as qemu-img does.
  UQ_CO_ASSIGN_OR_RETURN(uint64_t n, parse_resize_size(digits));
  UQ_CO_ASSIGN_OR_RETURN(auto disk, co_await open_disk(path, o));
  Disk& d = *disk;
  auto target = target_size(d.size(), n, sign, allow_shrink);
  Status s;
  if (!target.ok()) s = std::move(target).error();
  else if (auto* q = dynamic_cast<qcow2::Qcow2Image*>(&d)) s = co_await q->resize(*target);
  else if (auto* r = dynamic_cast<RawDisk*>(&d)) s = r->file().truncate(*target);
  Status c = co_await d.close();
  co_return s.ok() ? c : s;
}

}  // namespace

int cmd_resize(int argc, char** argv) {
  Args args;
  args.flag("--shrink", "allow the size to go down").flag("-q,--quiet", "print nothing").flag("-h,--help", "show this help");
  add_open_flags(args);
  // The size is the last argument, taken before the options are parsed so
  // that "-1G" is not an option (qemu-img resize does the same).
  std::string size_arg;
  if (argc >= 3 && std::string(argv[argc - 1]) != "-h" && std::string(argv[argc - 1]) != "--help") {
    size_arg = argv[--argc];
  }
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.has("-h")) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (size_arg.empty() || args.positional().size() != 1) return fail(std::string("usage: ") + kUsage);
  auto o = open_options(args, false);
  if (!o.ok()) return fail(o.error().message());
  // The backing chain is opened (read-only), as qemu-img resize opens it:
  // growing over a longer backing file zeroes what it would show through.
  o->resize = true;
  Status s = run(resize(args.positional()[0], *o, size_arg, args.has("--shrink")));
  if (!s.ok()) return fail(s);
  if (!args.has("-q")) std::printf("Image resized.\n");
  return 0;
}

}  // namespace uqcow::cli
