// uqcow io: a qemu-io style driver. Opens one image (read-write unless -r)
// and runs commands on it in order (-c CMD, repeatable; without -c, one
// command per line of stdin), printing what qemu-io prints. The exit status
// is 1 if any command failed (including a pattern mismatch). On a normal end
// the image is flushed and closed; `abort` ends the process at once with
// abort(3), as qemu-io does, leaving the image as a crash would.
//
// Commands live in kCommands, sorted by name as qemu-io lists them: a name,
// qemu-io's argument counts, synopsis and one-line help, whether the command
// needs a writable image, and a function.
#include <time.h>
#include <unistd.h>

#include <cctype>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "block/open.h"
#include "qcow2/image.h"
#include "tools/cli.h"
#include "uring/aligned_buffer.h"

namespace uqcow::cli {
namespace {

constexpr char kUsage[] = "uqcow io [-r [-U]] [-f FMT] [-t CACHE] [-c CMD]... FILE";
constexpr char kDescription[] =
    "Runs qemu-io style commands on FILE, in order (without -c, reads them from stdin).\n"
    "Without -r the image is opened read-write. Run -c help for the commands.";

// QEMU's BDRV_REQUEST_MAX_BYTES: the largest single request.
constexpr uint64_t kRequestMaxBytes = (INT_MAX >> 9) << 9;

struct IoSession {
  Disk& disk;
  bool quit = false;
};

struct IoCommand;
using CommandFn = Task<bool> (*)(IoSession&, const IoCommand&, const std::vector<std::string>&);

struct IoCommand {
  const char* name;
  const char* altname;  // short alias, or nullptr
  int argmin;           // qemu-io's argument count bounds; argmax -1: unbounded
  int argmax;
  const char* args;     // synopsis
  const char* oneline;  // help text
  bool writes;          // needs a writable image (qemu-io's BLK_PERM_WRITE)
  CommandFn run;
};

// qemu-io's help line; commands without arguments have no synopsis.
void print_usage(const IoCommand& c) {
  std::printf("%s %s%s-- %s\n", c.name, c.args ? c.args : "", c.args ? " " : "", c.oneline);
}

// The options of one command, parsed like glibc getopt() with `spec`
// ("bCl:P:..."): options may follow positional arguments, "--" ends them.
struct CommandOptions {
  std::map<char, std::string> values;  // flags map to ""
  std::vector<std::string> positional;
  bool has(char c) const { return values.count(c) > 0; }
};

bool parse_command_options(const std::vector<std::string>& argv, const char* spec, CommandOptions& out) {
  bool only_positional = false;
  for (size_t i = 1; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (only_positional || a.size() < 2 || a[0] != '-') {
      out.positional.push_back(a);
      continue;
    }
    if (a == "--") {
      only_positional = true;
      continue;
    }
    for (size_t k = 1; k < a.size(); ++k) {
      const char* p = std::strchr(spec, a[k]);
      if (!p || a[k] == ':') {
        std::fprintf(stderr, "%s: invalid option -- '%c'\n", argv[0].c_str(), a[k]);
        return false;
      }
      if (p[1] != ':') {
        out.values[a[k]] = "";
        continue;
      }
      if (k + 1 < a.size()) {
        out.values[a[k]] = a.substr(k + 1);
      } else if (i + 1 < argv.size()) {
        out.values[a[k]] = argv[++i];
      } else {
        std::fprintf(stderr, "%s: option requires an argument -- '%c'\n", argv[0].c_str(), a[k]);
        return false;
      }
      break;
    }
  }
  return true;
}

// qemu-io's cvtnum() and print_cvtnum_err().
bool parse_number(const std::string& text, uint64_t& out) {
  auto v = parse_size(text, "number");
  if (v.ok() && *v <= static_cast<uint64_t>(INT64_MAX)) {
    out = *v;
    return true;
  }
  if (v.ok() || v.error().code() == ERANGE) {
    std::printf("Parsing error: argument too large -- %s\n", text.c_str());
  } else {
    std::printf("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
                text.c_str());
  }
  return false;
}

// qemu-io's parse_pattern(): one byte, in any base strtol() accepts.
bool parse_pattern(const std::string& text, int& out) {
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 0);
  if (text.empty() || *end != '\0' || v < 0 || v > UCHAR_MAX) {
    std::printf("%s is not a valid pattern byte\n", text.c_str());
    return false;
  }
  out = static_cast<int>(v);
  return true;
}

// qemu-io's cvtstr(): "4 KiB", "1.500 MiB", "40 bytes".
std::string cvtstr(double value) {
  static const struct {
    double scale;
    const char* suffix;
  } kUnits[] = {{1ull << 60, " EiB"}, {1ull << 50, " PiB"}, {1ull << 40, " TiB"},
                {1ull << 30, " GiB"}, {1ull << 20, " MiB"}, {1ull << 10, " KiB"}};
  char buf[64];
  const char* suffix = " bytes";
  std::snprintf(buf, sizeof buf, "%f", value);
  for (const auto& u : kUnits) {
    if (value >= u.scale) {
      std::snprintf(buf, sizeof buf, "%.3f", value / u.scale);
      suffix = u.suffix;
      break;
    }
  }
  std::string s = buf;
  auto trim = s.find(".000");
  if (trim != std::string::npos) s.erase(trim);
  return s + suffix;
}

// qemu-io's timestr() without -C: "00.00 sec", or "H:MM:SS.ss" from a second up.
std::string timestr(const timespec& t) {
  char buf[64];
  const double frac = t.tv_nsec / 1e9;
  if (t.tv_sec) {
    std::snprintf(buf, sizeof buf, "%u:%02u:%05.2f", static_cast<unsigned>(t.tv_sec / 3600),
                  static_cast<unsigned>((t.tv_sec / 60) % 60), static_cast<double>(t.tv_sec % 60) + frac);
  } else {
    std::snprintf(buf, sizeof buf, "%05.2f sec", frac);
  }
  return buf;
}

timespec elapsed(const timespec& from, const timespec& to) {
  timespec d{to.tv_sec - from.tv_sec, to.tv_nsec - from.tv_nsec};
  if (d.tv_nsec < 0) {
    --d.tv_sec;
    d.tv_nsec += 1000000000;
  }
  return d;
}

// qemu-io's print_report(): the two result lines of a request, or with -C one
// line for scripts.
void print_report(const char* op, const timespec& t, uint64_t offset, uint64_t count, uint64_t total, int ops,
                  bool terse) {
  const double secs = static_cast<double>(t.tv_sec) + t.tv_nsec / 1e9;
  if (terse) {
    char ts[64];
    std::snprintf(ts, sizeof ts, "%u:%02u:%05.2f", static_cast<unsigned>(t.tv_sec / 3600),
                  static_cast<unsigned>((t.tv_sec / 60) % 60), static_cast<double>(t.tv_sec % 60) + t.tv_nsec / 1e9);
    std::printf("%" PRIu64 ",%d,%s,%.3f,%.3f\n", total, ops, ts, total / secs, ops / secs);
    return;
  }
  std::printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op, total, count, offset);
  std::printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", cvtstr(static_cast<double>(total)).c_str(), ops,
              timestr(t).c_str(), cvtstr(total / secs).c_str(), ops / secs);
}

// qemu-io's dump_buffer() (-v): 16 bytes a line, hex then printable ASCII.
void dump_buffer(const std::byte* buf, uint64_t offset, uint64_t len) {
  for (uint64_t i = 0; i < len; i += 16) {
    std::printf("%08" PRIx64 ":  ", offset + i);
    const uint64_t n = std::min<uint64_t>(16, len - i);
    for (uint64_t j = 0; j < n; ++j) std::printf("%02x ", static_cast<unsigned>(buf[i + j]));
    std::printf(" ");
    for (uint64_t j = 0; j < n; ++j) {
      const unsigned char c = static_cast<unsigned char>(buf[i + j]);
      std::putchar(std::isalnum(c) ? c : '.');
    }
    std::printf("\n");
  }
}

// QEMU's blk_check_byte_request(): a request past the end of the disk is an
// I/O error, whatever the format.
Status check_request(const Disk& disk, uint64_t offset, uint64_t count) {
  if (offset > disk.size() || count > disk.size() - offset) return Error(EIO, std::strerror(EIO));
  return Status();
}

// qemu-io's "<op> failed: <strerror>" line. The library's message says more
// than strerror(); it goes to stderr so that stdout stays what qemu-io prints.
void print_failure(const char* op, const Status& status) {
  const char* text = std::strerror(status.code());
  std::printf("%s failed: %s\n", op, text);
  if (status.message() != text) std::fprintf(stderr, "uqcow: %s: %s\n", op, status.message().c_str());
}

// read [-bCqv] [-P pattern [-s off] [-l len]] off len
Task<bool> read_command(IoSession& session, const IoCommand& cmd, const std::vector<std::string>& argv) {
  CommandOptions o;
  if (!parse_command_options(argv, "bCl:pP:qs:vr", o) || o.positional.size() != 2) {
    print_usage(cmd);
    co_return false;
  }
  if (o.has('b')) {
    std::printf("read: -b (VM state) is not supported\n");
    co_return false;
  }
  int pattern = 0;
  uint64_t pattern_offset = 0, pattern_count = 0, offset = 0, count = 0;
  if (o.has('P') && !parse_pattern(o.values['P'], pattern)) co_return false;
  if (o.has('s') && !parse_number(o.values['s'], pattern_offset)) co_return false;
  if (o.has('l') && !parse_number(o.values['l'], pattern_count)) co_return false;
  if (!parse_number(o.positional[0], offset) || !parse_number(o.positional[1], count)) co_return false;
  if (count > kRequestMaxBytes) {
    std::printf("length cannot exceed %" PRIu64 ", given %s\n", kRequestMaxBytes, o.positional[1].c_str());
    co_return false;
  }
  if (!o.has('P') && (o.has('s') || o.has('l'))) {
    print_usage(cmd);
    co_return false;
  }
  if (!o.has('l')) pattern_count = count - std::min(count, pattern_offset);
  if (pattern_offset > count || pattern_count > count - pattern_offset) {
    std::printf("pattern verification range exceeds end of read data\n");
    co_return false;
  }

  AlignedBuffer buf(count);
  timespec t1{}, t2{};
  clock_gettime(CLOCK_MONOTONIC, &t1);
  Status status = check_request(session.disk, offset, count);
  if (status.ok()) status = co_await session.disk.read(offset, buf.span());
  clock_gettime(CLOCK_MONOTONIC, &t2);
  if (!status.ok()) {
    print_failure("read", status);
    co_return false;
  }

  bool ok = true;
  if (o.has('P')) {
    const std::byte* p = buf.data() + pattern_offset;
    for (uint64_t i = 0; i < pattern_count; ++i) {
      if (p[i] != static_cast<std::byte>(pattern)) {
        std::printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n",
                    offset + pattern_offset, pattern_count);
        ok = false;
        break;
      }
    }
  }
  if (o.has('q')) co_return ok;
  if (o.has('v')) dump_buffer(buf.data(), offset, count);
  print_report("read", elapsed(t1, t2), offset, count, count, 1, o.has('C'));
  co_return ok;
}

// qemu-io's qemu_io_alloc_from_file(): the file's first `count` bytes,
// repeated until the buffer is full. Errors go to stderr as qemu-io's do.
bool fill_from_file(const std::string& name, std::span<std::byte> buf) {
  std::ifstream in(name, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), std::strerror(errno));
    return false;
  }
  in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  if (in.bad()) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), std::strerror(errno));
    return false;
  }
  const size_t pattern_len = static_cast<size_t>(in.gcount());
  if (pattern_len == 0) {
    std::fprintf(stderr, "%s: file is empty\n", name.c_str());
    return false;
  }
  for (size_t pos = pattern_len; pos < buf.size(); pos += pattern_len) {
    std::memcpy(buf.data() + pos, buf.data(), std::min(pattern_len, buf.size() - pos));
  }
  return true;
}

// write -c: whole clusters through the qcow2 compressed path. Other formats
// cannot compress (qemu-io: ENOTSUP).
Task<Status> write_compressed(Disk& disk, uint64_t offset, std::span<const std::byte> buf) {
  auto* image = dynamic_cast<qcow2::Qcow2Image*>(&disk);
  if (!image) co_return Error(ENOTSUP, std::strerror(ENOTSUP));
  co_return co_await image->write_compressed(offset, buf);
}

// write [-bcCfquz] [-P pattern | -s source_file] off len
Task<bool> write_command(IoSession& session, const IoCommand& cmd, const std::vector<std::string>& argv) {
  CommandOptions o;
  if (!parse_command_options(argv, "bcCfpP:qs:uz", o) || o.positional.size() != 2) {
    print_usage(cmd);
    co_return false;
  }
  if (o.has('b')) {
    std::printf("write: -b (VM state) is not supported\n");
    co_return false;
  }
  const bool zero = o.has('z'), compressed = o.has('c'), fua = o.has('f');
  if (fua && compressed) {
    std::printf("-f and -b or -c cannot be specified at the same time\n");
    co_return false;
  }
  if (o.has('u') && !zero) {
    std::printf("-u requires -z to be specified\n");
    co_return false;
  }
  if (int(zero) + int(o.has('P')) + int(o.has('s')) > 1) {
    std::printf("Only one of -z, -P, and -s can be specified at the same time\n");
    co_return false;
  }
  int pattern = 0xcd;
  uint64_t offset = 0, count = 0;
  if (o.has('P') && !parse_pattern(o.values['P'], pattern)) co_return false;
  if (!parse_number(o.positional[0], offset) || !parse_number(o.positional[1], count)) co_return false;
  if (count > kRequestMaxBytes) {
    std::printf("length cannot exceed %" PRIu64 " without -n, given %s\n", kRequestMaxBytes,
                o.positional[1].c_str());
    co_return false;
  }
  if (compressed && offset % 512) {
    std::printf("%" PRIu64 " is not a sector-aligned value for 'offset'\n", offset);
    co_return false;
  }
  if (compressed && count % 512) {
    std::printf("%" PRIu64 " is not a sector-aligned value for 'count'\n", count);
    co_return false;
  }

  AlignedBuffer buf(zero ? 0 : count);
  if (!zero) {
    if (o.has('s')) {
      if (!fill_from_file(o.values['s'], buf.span())) co_return false;
    } else if (count) {  // (a 0-byte buffer has no storage to fill)
      std::memset(buf.data(), pattern, count);
    }
  }
  timespec t1{}, t2{};
  clock_gettime(CLOCK_MONOTONIC, &t1);
  Disk& disk = session.disk;
  Status status = check_request(disk, offset, count);
  // -z wins over -c, as in qemu-io.
  if (status.ok() && zero) status = co_await disk.write_zeroes(offset, count, o.has('u'));
  else if (status.ok() && compressed) status = co_await write_compressed(disk, offset, buf.span());
  else if (status.ok()) status = co_await disk.write(offset, buf.span());
  // QEMU emulates FUA on qcow2 with a flush once the write is done.
  if (status.ok() && fua) status = co_await disk.flush();
  clock_gettime(CLOCK_MONOTONIC, &t2);
  if (!status.ok()) {
    print_failure("write", status);
    co_return false;
  }
  if (!o.has('q')) print_report("wrote", elapsed(t1, t2), offset, count, count, 1, o.has('C'));
  co_return true;
}

// discard [-Cq] off len
Task<bool> discard_command(IoSession& session, const IoCommand& cmd, const std::vector<std::string>& argv) {
  CommandOptions o;
  if (!parse_command_options(argv, "Cq", o) || o.positional.size() != 2) {
    print_usage(cmd);
    co_return false;
  }
  uint64_t offset = 0, count = 0;
  if (!parse_number(o.positional[0], offset) || !parse_number(o.positional[1], count)) co_return false;
  if (count > kRequestMaxBytes) {
    std::printf("length cannot exceed %" PRIu64 ", given %s\n", kRequestMaxBytes, o.positional[1].c_str());
    co_return false;
  }
  timespec t1{}, t2{};
  clock_gettime(CLOCK_MONOTONIC, &t1);
  Status status = check_request(session.disk, offset, count);
  if (status.ok()) status = co_await session.disk.discard(offset, count);
  clock_gettime(CLOCK_MONOTONIC, &t2);
  if (!status.ok()) {
    print_failure("discard", status);
    co_return false;
  }
  if (!o.has('q')) print_report("discard", elapsed(t1, t2), offset, count, count, 1, o.has('C'));
  co_return true;
}

// flush: prints nothing, as qemu-io; a failure only shows in the exit status
// (and uqcow's message on stderr).
Task<bool> flush_command(IoSession& session, const IoCommand&, const std::vector<std::string>&) {
  Status status = co_await session.disk.flush();
  if (!status.ok()) std::fprintf(stderr, "uqcow: flush: %s\n", status.message().c_str());
  co_return status.ok();
}

// abort: a crash, for crash-consistency tests. Nothing is flushed or closed:
// the image is left as the kernel holds it (what earlier flushes made
// durable, plus whatever writes reached the file). What this process printed
// so far is flushed first, unlike qemu-io whose buffered stdout is lost.
Task<bool> abort_command(IoSession&, const IoCommand&, const std::vector<std::string>&) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::abort();
  co_return false;
}

Task<bool> help_command(IoSession&, const IoCommand&, const std::vector<std::string>& argv);

Task<bool> quit_command(IoSession& session, const IoCommand&, const std::vector<std::string>&) {
  session.quit = true;
  co_return true;
}

const IoCommand kCommands[] = {
    {"abort", nullptr, 0, 0, nullptr, "simulate a program crash using abort(3)", false, abort_command},
    {"discard", "d", 2, -1, "[-Cq] off len", "discards a number of bytes at a specified offset", true,
     discard_command},
    {"flush", "f", 0, 0, nullptr, "flush all in-core file state to disk", false, flush_command},
    {"help", "?", 0, 1, "[command]", "help for one or all commands", false, help_command},
    {"quit", "q", 0, 0, nullptr, "exit the program", false, quit_command},
    {"read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
     "reads a number of bytes at a specified offset", false, read_command},
    {"write", "w", 2, -1, "[-bcCfquz] [-P pattern | -s source_file] off len",
     "writes a number of bytes at a specified offset", true, write_command},
};

const IoCommand* find_command(const std::string& name) {
  for (const auto& c : kCommands) {
    if (name == c.name || (c.altname && name == c.altname)) return &c;
  }
  return nullptr;
}

Task<bool> help_command(IoSession&, const IoCommand&, const std::vector<std::string>& argv) {
  if (argv.size() == 2) {
    const IoCommand* c = find_command(argv[1]);
    if (!c) {
      std::printf("command %s not found\n", argv[1].c_str());
      co_return false;
    }
    print_usage(*c);
    co_return true;
  }
  for (const auto& c : kCommands) print_usage(c);
  std::printf("\nUse 'help commandname' for extended help.\n");
  co_return true;
}

// qemu-io's breakline() and command(): split on spaces, look the command up,
// check the argument count, run it.
Task<bool> run_command(IoSession& session, const std::string& line) {
  std::vector<std::string> argv;
  for (size_t pos = 0; pos < line.size();) {
    size_t end = line.find(' ', pos);
    if (end == std::string::npos) end = line.size();
    if (end > pos) argv.push_back(line.substr(pos, end - pos));
    pos = end + 1;
  }
  if (argv.empty()) co_return true;
  const IoCommand* c = find_command(argv[0]);
  if (!c) {
    std::fprintf(stderr, "command \"%s\" not found\n", argv[0].c_str());
    co_return false;
  }
  const int args = static_cast<int>(argv.size()) - 1;
  if (args < c->argmin || (c->argmax != -1 && args > c->argmax)) {
    if (c->argmax == -1) {
      std::fprintf(stderr, "bad argument count %d to %s, expected at least %d arguments\n", args,
                   argv[0].c_str(), c->argmin);
    } else if (c->argmin == c->argmax) {
      std::fprintf(stderr, "bad argument count %d to %s, expected %d arguments\n", args, argv[0].c_str(),
                   c->argmin);
    } else {
      std::fprintf(stderr, "bad argument count %d to %s, expected between %d and %d arguments\n", args,
                   argv[0].c_str(), c->argmin, c->argmax);
    }
    co_return false;
  }
  if (c->writes && session.disk.read_only()) {
    std::fprintf(stderr, "uqcow: Block node is read-only\n");
    co_return false;
  }
  co_return co_await c->run(session, *c, argv);
}

Task<int> io_task(std::string path, OpenOptions options, std::vector<std::string> commands, bool from_stdin) {
  auto disk = co_await open_disk(path, options);
  if (!disk.ok()) co_return fail(disk.error());
  IoSession session{**disk};
  bool failed = false;
  const bool prompt = from_stdin && isatty(STDIN_FILENO);
  for (size_t i = 0; !session.quit; ++i) {
    std::string line;
    if (from_stdin) {
      if (prompt) {
        std::printf("uqcow io> ");
        std::fflush(stdout);
      }
      if (!std::getline(std::cin, line)) break;
    } else if (i < commands.size()) {
      line = commands[i];
    } else {
      break;
    }
    // Awaited outside the condition: GCC 12 miscompiles co_await there.
    bool ok = co_await run_command(session, line);
    if (!ok) failed = true;
    std::fflush(stdout);
  }
  Status closed = co_await (*disk)->close();
  if (!closed.ok()) co_return fail(closed);
  co_return failed ? 1 : 0;
}

}  // namespace

int cmd_io(int argc, char** argv) {
  Args args;
  args.flag("-r,--read-only", "open the image read-only")
      .option("-c,--cmd", "command to run (repeatable; run in order)", "CMD");
  add_open_flags(args);
  if (Status s = args.parse(argc, argv); !s.ok()) return fail(s);
  if (args.help_requested()) {
    print_help(kUsage, kDescription, args);
    return 0;
  }
  if (args.positional().size() != 1) return fail("io: expecting one image file name (see --help)");
  auto options = open_options(args, /*read_only=*/args.has("-r"));
  if (!options.ok()) return fail(options.error());
  const auto& commands = args.all("-c");
  return run(io_task(args.positional()[0], std::move(*options), commands, commands.empty()));
}

}  // namespace uqcow::cli
