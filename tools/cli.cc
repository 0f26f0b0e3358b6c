#include "tools/cli.h"

#include <cinttypes>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include <unistd.h>

#include "block/open.h"
#include "fault/fault_device.h"

namespace uqcow::cli {
namespace {
std::vector<std::string> split_names(const std::string& names) {
  std::vector<std::string> out;
  std::stringstream ss(names);
  std::string n;
  while (std::getline(ss, n, ',')) out.push_back(n);
  return out;
}
const std::vector<std::string> kEmpty;
}  // namespace

Args& Args::flag(const std::string& names, const std::string& help) {
  specs_.push_back({split_names(names), false, help, ""});
  return *this;
}

Args& Args::option(const std::string& names, const std::string& help, const std::string& metavar) {
  specs_.push_back({split_names(names), true, help, metavar});
  return *this;
}

const Args::Spec* Args::find(const std::string& name) const {
  for (const auto& s : specs_) {
    for (const auto& n : s.names) {
      if (n == name) return &s;
    }
  }
  return nullptr;
}

Status Args::parse(int argc, char** argv, int first) {
  bool only_positional = false;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (only_positional || a.size() < 2 || a[0] != '-') {
      positional_.push_back(a);
      continue;
    }
    if (a == "--") {
      only_positional = true;
      continue;
    }
    if ((a == "-h" || a == "--help") && !find(a)) {
      help_requested_ = true;
      continue;
    }
    std::string name = a, value;
    bool inline_value = false;
    if (a.rfind("--", 0) == 0) {
      auto eq = a.find('=');
      if (eq != std::string::npos) {
        name = a.substr(0, eq);
        value = a.substr(eq + 1);
        inline_value = true;
      }
    } else if (a.size() > 2) {
      // -xVALUE
      const Spec* s = find(a.substr(0, 2));
      if (s && s->has_value) {
        name = a.substr(0, 2);
        value = a.substr(2);
        inline_value = true;
      }
    }
    const Spec* spec = find(name);
    if (!spec) return Error(EINVAL, "unknown option '" + name + "' (see --help)");
    if (spec->has_value && !inline_value) {
      if (i + 1 >= argc) return Error(EINVAL, "option '" + name + "' needs a value");
      value = argv[++i];
    } else if (!spec->has_value && inline_value) {
      return Error(EINVAL, "option '" + name + "' takes no value");
    }
    values_[spec->names.front()].push_back(value);
    sequence_.emplace_back(spec->names.front(), value);
  }
  return Status();
}

bool Args::has(const std::string& name) const {
  const Spec* s = find(name);
  return s && values_.count(s->names.front());
}

std::optional<std::string> Args::get(const std::string& name) const {
  const Spec* s = find(name);
  if (!s) return std::nullopt;
  auto it = values_.find(s->names.front());
  if (it == values_.end() || it->second.empty()) return std::nullopt;
  return it->second.back();
}

std::string Args::get_or(const std::string& name, const std::string& fallback) const {
  auto v = get(name);
  return v ? *v : fallback;
}

const std::vector<std::string>& Args::all(const std::string& name) const {
  const Spec* s = find(name);
  if (!s) return kEmpty;
  auto it = values_.find(s->names.front());
  return it == values_.end() ? kEmpty : it->second;
}

std::string Args::help() const {
  std::string out;
  for (const auto& s : specs_) {
    std::string left = "  ";
    for (size_t i = 0; i < s.names.size(); ++i) left += (i ? ", " : "") + s.names[i];
    if (s.has_value) left += " " + s.metavar;
    if (left.size() < 30) left.resize(30, ' '); else left += "\n" + std::string(30, ' ');
    out += left + s.help + "\n";
  }
  return out;
}

void add_open_flags(Args& args) {
  args.option("-f,--format", "image format: qcow2 or raw (default: probe)", "FMT")
      .option("-t,--cache", "cache mode: writeback (default) or none (O_DIRECT)", "CACHE")
      .flag("-U,--force-share", "open read-only beside a writer: take no lock that conflicts "
            "(QEMU's image locking; refused for a read-write open)")
      .option("--passphrase-file", "file holding the passphrase of an encrypted image", "FILE")
      .option("--l2-cache-size", "L2 cache size (default: covers the disk, max 32M)", "SIZE")
      .option("--l2-cache-entry-size", "L2 cache entry (slice) size (default 4K)", "SIZE")
      .option("--refcount-cache-size", "refcount cache size (default 4 clusters)", "SIZE")
      .option("--cache-clean-interval", "drop cache entries unused this long (default 600)", "SECONDS")
      .option("--lazy-refcounts", "on/off: override the image's lazy refcounts", "on|off")
      .option("--overlap-check", "none, constant, cached (default) or all", "MODE")
      .option("--image-opt", "any runtime option as KEY=VALUE (repeatable)", "KEY=VALUE")
      .option("--inject", "fail I/O after a debug event, blkdebug style (repeatable): "
              "event=NAME,errno=N[,once=on][,after=K][,immediately=on]", "RULE");
}

Result<OpenOptions> open_options(const Args& args, bool read_only) {
  OpenOptions o;
  o.read_only = read_only;
  o.force_share = args.has("-U");
  o.format = args.get_or("-f", "");
  if (auto t = args.get("-t")) {
    UQ_ASSIGN_OR_RETURN(o.cache, parse_cache_mode(*t));
  }
  for (const char* key : {"l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                          "cache-clean-interval", "lazy-refcounts", "overlap-check"}) {
    if (auto v = args.get(std::string("--") + key)) UQ_TRY(apply_open_option(o, key, *v));
  }
  // Fault rules (`--inject RULE`, `--image-opt inject=RULE`) wrap the image's
  // file in a fault injector (fault/).
  auto injector = std::make_shared<FaultInjector>();
  for (const auto& kv : args.all("--image-opt")) {
    auto eq = kv.find('=');
    if (eq == std::string::npos) return Error(EINVAL, "--image-opt: expected KEY=VALUE, got '" + kv + "'");
    if (kv.substr(0, eq) == "inject") {
      UQ_TRY(injector->add_rule(std::string_view(kv).substr(eq + 1)));
    } else {
      UQ_TRY(apply_open_option(o, kv.substr(0, eq), kv.substr(eq + 1)));
    }
  }
  for (const auto& rule : args.all("--inject")) UQ_TRY(injector->add_rule(rule));
  if (!injector->empty()) o.wrap_file = fault_injection(std::move(injector));
  if (auto f = args.get("--passphrase-file")) {
    UQ_ASSIGN_OR_RETURN(o.passphrase, read_passphrase_file(*f));
  }
  return o;
}

Result<std::string> read_passphrase_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return errno_error(errno, "--passphrase-file " + path);
  std::string secret((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // A trailing newline from `echo secret > file` is not part of the secret.
  if (!secret.empty() && secret.back() == '\n') secret.pop_back();
  if (secret.empty()) return Error(EINVAL, "--passphrase-file " + path + ": the file is empty");
  return secret;
}

int fail(const std::string& message, int exit_code) {
  std::fprintf(stderr, "uqcow: %s\n", message.c_str());
  return exit_code;
}

int fail(const Status& status, int exit_code) { return fail(status.message(), exit_code); }

std::string human_size(uint64_t bytes) {
  // qemu's size_to_str(): switch to the next unit once the value reaches
  // 1000 of the current one, print 3 significant digits.
  static const char* suffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  int exp = 0;
  std::frexp(static_cast<double>(bytes) / (1000.0 / 1024.0), &exp);
  int i = std::max(0, (exp - 1) / 10);
  uint64_t div = 1ull << (i * 10);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%0.3g %sB", static_cast<double>(bytes) / static_cast<double>(div),
                suffixes[i]);
  return buf;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

Progress::Progress(bool requested) : enabled_(requested && isatty(STDERR_FILENO)) { draw(0); }

void Progress::update(uint64_t done, uint64_t total) {
  double percent = total ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0;
  if (percent - drawn_ >= 1.0) draw(percent);
}

void Progress::finish() {
  if (!enabled_) return;
  draw(100);
  std::fputc('\n', stderr);
}

void Progress::draw(double percent) {
  if (!enabled_) return;
  drawn_ = percent;
  std::fprintf(stderr, "    (%3.2f/100%%)\r", percent);
  std::fflush(stderr);
}

void print_help(const char* usage, const char* description, const Args& args) {
  std::printf("usage: %s\n\n%s\n\nOptions:\n%s  -h, --help                  show this help\n", usage,
              description, args.help().c_str());
}

}  // namespace uqcow::cli
