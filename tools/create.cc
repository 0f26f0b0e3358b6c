// uqcow create: new qcow2 or raw images, with qemu-img's option names.
#include <openssl/crypto.h>

#include <cstdio>
#include <sstream>

#include "block/open.h"
#include "block/options.h"
#include "qcow2/create.h"
#include "tools/cli.h"
#include "uring/raw_file.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow create [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] FILE [SIZE]";
constexpr char kDescription[] =
    "Create a new image. qcow2 options (-o, comma separated, qemu-img names):\n"
    "  cluster_size, compat (0.10|1.1), refcount_bits, lazy_refcounts,\n"
    "  preallocation (off|metadata|falloc|full), compression_type (zlib|zstd),\n"
    "  extended_l2, data_file, data_file_raw, backing_file, backing_fmt,\n"
    "  encrypt.format (luks|aes), encrypt.cipher-alg (aes-256|aes-128),\n"
    "  encrypt.cipher-mode (xts|cbc), encrypt.ivgen-alg (plain64|plain|essiv),\n"
    "  encrypt.hash-alg (sha256|sha1|sha512), encrypt.iter-time (ms, default 2000).\n"
    "  The passphrase of an encrypted image is read from --passphrase-file.\n"
    "raw options: preallocation (off|falloc|full).\n"
    "SIZE accepts k, M, G, T suffixes and is rounded up to a multiple of 512, as qemu-img does;\n"
    "with a backing file it defaults to the backing file's size.";

Task<Status> create_raw(const std::string& path, uint64_t size, const std::string& options) {
  std::string prealloc = "off";
  if (!options.empty()) {
    if (options.rfind("preallocation=", 0) != 0) {
      co_return Error(EINVAL, "unknown option '" + options + "' for raw create");
    }
    prealloc = options.substr(14);
    if (prealloc != "off" && prealloc != "falloc" && prealloc != "full") {
      co_return Error(EINVAL, "preallocation: '" + prealloc + "' is not off, falloc or full");
    }
  }
  UQ_CO_ASSIGN_OR_RETURN(auto file,
                         RawFile::open(path, {.read_only = false, .create = true, .lock = kCreateLockPerms}));
  // Whole sectors, rounded up, as qemu-img creates raw images.
  size = (size + 511) / 512 * 512;
  UQ_CO_TRY(file->truncate(0));
  UQ_CO_TRY(file->truncate(size));
  if (prealloc == "falloc") UQ_CO_TRY(co_await file->co_write_zeroes(0, size, false));
  if (prealloc == "full") {
    std::vector<std::byte> zeros(1 << 20);
    for (uint64_t off = 0; off < size; off += zeros.size()) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), size - off));
      UQ_CO_TRY(co_await file->co_write(off, std::span<const std::byte>(zeros.data(), n)));
    }
  }
  co_return co_await file->co_flush();
}

// The SIZE argument, refused with qemu-img create's messages.
Result<uint64_t> parse_image_size(const std::string& text) {
  auto size = parse_size(text, "size");
  if (size.ok() && *size <= uint64_t{INT64_MAX}) return size;
  if (!size.ok() && size.error().code() != ERANGE) {
    return Error(EINVAL, "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                         "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
  }
  return Error(EINVAL, "Invalid image size specified. Must be between 0 and 9223372036854775807.");
}

// Whether the -o list sets `size` (and not only, say, cluster_size).
bool has_size_option(const std::string& options) {
  std::stringstream ss(options);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.rfind("size=", 0) == 0) return true;
  }
  return false;
}

// The virtual size of a backing file, for `create -b` without a size.
Task<Result<uint64_t>> backing_size(const std::string& image, const std::string& backing,
                                    const std::string& fmt) {
  OpenOptions o;
  o.format = fmt;
  std::string path = backing;
  if (!backing.empty() && backing[0] != '/' && image.find('/') != std::string::npos) {
    path = image.substr(0, image.rfind('/') + 1) + backing;
  }
  auto disk = co_await open_disk(path, o);
  if (!disk.ok()) co_return std::move(disk).error().with_context("backing file");
  uint64_t size = (*disk)->size();
  (void)co_await (*disk)->close();
  co_return size;
}

}  // namespace

int cmd_create(int argc, char** argv) {
  Args args;
  args.option("-f,--format", "image format: qcow2 (default) or raw", "FMT")
      .option("-o,--options", "format options, comma separated (repeatable)", "OPTIONS")
      .option("-b,--backing", "backing file (qcow2 only)", "FILE")
      .option("-F,--backing-format", "backing file format", "FMT")
      .option("--passphrase-file", "file holding the passphrase of a new encrypted image", "FILE")
      .flag("-q,--quiet", "print nothing")
      .flag("-h,--help", "show this help");
  Status parsed = args.parse(argc, argv);
  if (!parsed.ok()) return fail(parsed);
  if (args.has("-h")) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  const auto& pos = args.positional();
  if (pos.empty() || pos.size() > 2) return fail(std::string("usage: ") + kUsage);
  const std::string path = pos[0];
  const std::string format = args.get_or("-f", "qcow2");
  std::string options;
  for (const auto& o : args.all("-o")) options += (options.empty() ? "" : ",") + o;

  if (format == "raw") {
    if (pos.size() < 2) return fail("raw images need a SIZE");
    auto size = parse_image_size(pos[1]);
    if (!size.ok()) return fail(size.error().message());
    Status s = run(create_raw(path, *size, options));
    if (!s.ok()) return fail(s);
    if (!args.has("-q")) std::printf("Formatting '%s', fmt=raw size=%llu\n", path.c_str(), (unsigned long long)*size);
    return 0;
  }
  if (format != "qcow2") return fail("format '" + format + "' is not supported (qcow2, raw)");
  qcow2::CreateOptions co;
  Status s = qcow2::parse_create_options(options, co);
  if (!s.ok()) return fail(s);
  if (auto f = args.get("--passphrase-file")) {
    auto secret = read_passphrase_file(*f);
    if (!secret.ok()) return fail(secret.error().message());
    co.passphrase = std::move(secret).value();
  }
  if (auto b = args.get("-b")) co.backing_file = *b;
  if (auto f = args.get("-F")) co.backing_format = *f;
  if (!co.backing_file.empty() && co.backing_format.empty()) {
    auto probed = probe_format(co.backing_file[0] == '/' || path.find('/') == std::string::npos
                                   ? co.backing_file
                                   : path.substr(0, path.rfind('/') + 1) + co.backing_file);
    if (!probed.ok()) return fail(probed.error().message());
    co.backing_format = *probed;
  }
  if (pos.size() == 2) {
    if (has_size_option(options)) {
      return fail(path + ": The image size must be specified only once");
    }
    auto size = parse_image_size(pos[1]);
    if (!size.ok()) return fail(size.error().message());
    co.size = *size;
  } else if (has_size_option(options)) {
    // -o size= was parsed into co.size.
  } else if (!co.backing_file.empty()) {
    auto size = run(backing_size(path, co.backing_file, co.backing_format));
    if (!size.ok()) return fail(size.error().message());
    co.size = *size;
  } else {
    return fail("image creation needs a SIZE");
  }
  s = run(qcow2::create_image(path, co));
  OPENSSL_cleanse(co.passphrase.data(), co.passphrase.size());
  if (!s.ok()) return fail(s);
  if (!args.has("-q")) {
    // qemu-img's line, data_file options included where given.
    std::string data_file;
    if (!co.data_file.empty()) data_file = " data_file=" + co.data_file + (co.data_file_raw ? " data_file_raw=on" : "");
    std::printf("Formatting '%s', fmt=qcow2 cluster_size=%u extended_l2=%s compression_type=%s "
                "size=%llu%s lazy_refcounts=%s refcount_bits=%u\n",
                path.c_str(), co.cluster_size, co.extended_l2 ? "on" : "off",
                co.compression_type == qcow2::CompressionType::kZstd ? "zstd" : "zlib",
                (unsigned long long)co.size, data_file.c_str(), co.lazy_refcounts ? "on" : "off", co.refcount_bits);
  }
  return 0;
}

}  // namespace uqcow::cli
