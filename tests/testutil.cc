#include "tests/testutil.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>

#include "block/open.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "engine/when_all.h"

namespace uqcow::testing {
namespace {

std::string shell_quote(const std::string& s) {
  bool plain = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("-_./=:,+@%", c);
  });
  if (plain) return s;
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''"; else out += c;
  }
  return out + "'";
}

// Drains both pipes until the child closes them, without deadlocking on a
// full pipe buffer.
void drain(int out_fd, int err_fd, std::string& out, std::string& err) {
  pollfd fds[2] = {{out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}};
  std::string* sinks[2] = {&out, &err};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
}

}  // namespace

std::string CommandResult::describe() const {
  std::string s = (cwd.empty() ? "" : "cd " + shell_quote(cwd) + " && ") + command +
                  "  -> exit " + std::to_string(exit_code);
  if (!out.empty()) s += "\n--- stdout ---\n" + out.substr(0, 4000);
  if (!err.empty()) s += "\n--- stderr ---\n" + err.substr(0, 4000);
  return s;
}

static CommandResult run_command_once(const std::vector<std::string>& argv, const std::string& cwd);

CommandResult run_command(const std::vector<std::string>& argv, const std::string& cwd) {
  // qemu-img sizes a LUKS key's PBKDF2 iterations by timing them with
  // getrusage; on a fast or busy machine the first timing can read 0 ms and
  // it gives up ("Unable to get accurate CPU usage"), about one run in five
  // with encrypt.iter-time=10. That is QEMU's flake, not the image's: retry.
  CommandResult r;
  for (int attempt = 0; attempt < 20; ++attempt) {
    r = run_command_once(argv, cwd);
    if (r.ok() || r.err.find("Unable to get accurate CPU usage") == std::string::npos) break;
  }
  return r;
}

static CommandResult run_command_once(const std::vector<std::string>& argv, const std::string& cwd) {
  CommandResult r;
  r.cwd = cwd;
  for (const auto& a : argv) r.command += (r.command.empty() ? "" : " ") + shell_quote(a);
  if (argv.empty()) {
    r.err = "run_command: empty argv";
    return r;
  }
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) {
    r.err = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    r.err = std::string("pipe: ") + std::strerror(errno);
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    return r;
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);

  pid_t pid = fork();
  if (pid == 0) {
    // Child: only async-signal-safe calls from here on.
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);  // qemu-io -c abort must not dump core
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) {
      const char msg[] = "run_command: chdir failed\n";
      (void)!::write(2, msg, sizeof msg - 1);
      _exit(127);
    }
    execvp(args[0], args.data());
    const char msg[] = "run_command: exec failed\n";
    (void)!::write(2, msg, sizeof msg - 1);
    _exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (pid < 0) {
    r.err = std::string("fork: ") + std::strerror(errno);
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    return r;
  }
  drain(out_pipe[0], err_pipe[0], r.out, r.err);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.exit_code = 128 + WTERMSIG(status);
  }
  return r;
}

::testing::AssertionResult Succeeded(const CommandResult& r) {
  if (r.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << r.describe();
}

std::optional<std::string> find_tool(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    if (access(name.c_str(), X_OK) == 0) return name;
    return std::nullopt;
  }
  const char* path = std::getenv("PATH");
  std::string dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    struct stat st;
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
    start = end + 1;
  }
  return std::nullopt;
}

namespace {
void skip_for_missing(const std::string& name) {
  GTEST_SKIP() << name << " is not installed (not found in PATH); it is the independent oracle "
               << "of this test (Debian package qemu-utils). Skipping.";
}
}  // namespace

bool require_tool(const std::string& name) {
  if (find_tool(name)) return true;
  skip_for_missing(name);
  return false;
}

std::string uqcow_binary() {
  const char* env = std::getenv("UQCOW");
  if (!env || !*env) return "";
  char resolved[PATH_MAX];
  if (realpath(env, resolved)) return resolved;
  return env;
}

CommandResult run_uqcow(const std::vector<std::string>& args, const std::string& cwd) {
  std::string bin = uqcow_binary();
  if (bin.empty()) {
    CommandResult r;
    r.command = "uqcow";
    r.err = "UQCOW is not set: the test must be run by Bazel with data = [\"//tools:uqcow\"]";
    return r;
  }
  std::vector<std::string> argv{bin};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, cwd);
}

TempDir::TempDir(const std::string& prefix, const std::string& base) {
  const char* env = std::getenv("TEST_TMPDIR");
  std::string root = !base.empty() ? base : env && *env ? env : "/tmp";
  std::string tmpl = root + "/" + prefix + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data())) path_ = buf.data();
  else ADD_FAILURE() << "mkdtemp " << tmpl << ": " << std::strerror(errno);
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::optional<std::vector<uint8_t>> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return std::nullopt;
  }
  std::vector<uint8_t> data(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pread(fd, data.data() + done, data.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (done != data.size()) return std::nullopt;
  return data;
}

bool write_file(const std::string& path, std::span<const uint8_t> data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  bool ok = patch_file(path, 0, data);
  ::close(fd);
  return ok;
}

bool patch_file(const std::string& path, uint64_t offset, std::span<const uint8_t> bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done,
                         static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return done == bytes.size();
}

namespace {
template <int N>
bool patch_be(const std::string& path, uint64_t offset, uint64_t value) {
  uint8_t b[N];
  for (int i = 0; i < N; ++i) b[i] = static_cast<uint8_t>(value >> (8 * (N - 1 - i)));
  return patch_file(path, offset, b);
}
template <int N>
std::optional<uint64_t> peek_be(const std::string& path, uint64_t offset) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  uint8_t b[N];
  ssize_t n = ::pread(fd, b, N, static_cast<off_t>(offset));
  ::close(fd);
  if (n != N) return std::nullopt;
  uint64_t v = 0;
  for (int i = 0; i < N; ++i) v = v << 8 | b[i];
  return v;
}
}  // namespace

bool patch_be16(const std::string& path, uint64_t offset, uint16_t value) {
  return patch_be<2>(path, offset, value);
}
bool patch_be32(const std::string& path, uint64_t offset, uint32_t value) {
  return patch_be<4>(path, offset, value);
}
bool patch_be64(const std::string& path, uint64_t offset, uint64_t value) {
  return patch_be<8>(path, offset, value);
}
std::optional<uint32_t> peek_be32(const std::string& path, uint64_t offset) {
  auto v = peek_be<4>(path, offset);
  if (!v) return std::nullopt;
  return static_cast<uint32_t>(*v);
}
std::optional<uint64_t> peek_be64(const std::string& path, uint64_t offset) {
  return peek_be<8>(path, offset);
}

::testing::AssertionResult SameBytes(std::span<const uint8_t> got, std::span<const uint8_t> want,
                                     uint64_t base) {
  if (got.size() == want.size() && (got.empty() || std::memcmp(got.data(), want.data(), got.size()) == 0)) {
    return ::testing::AssertionSuccess();
  }
  size_t n = std::min(got.size(), want.size());
  auto mismatch = std::mismatch(got.begin(), got.begin() + static_cast<ptrdiff_t>(n), want.begin());
  size_t first = static_cast<size_t>(mismatch.first - got.begin());
  if (first == n && got.size() == want.size()) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure();
  if (got.size() != want.size()) {
    failure << "sizes differ: got " << got.size() << " bytes, want " << want.size() << "; ";
  }
  if (first < n) {
    size_t last = first;
    while (last < n && got[last] != want[last]) ++last;
    char msg[160];
    std::snprintf(msg, sizeof msg,
                  "first difference at offset %" PRIu64 " (0x%" PRIx64
                  "): got 0x%02x, want 0x%02x; %zu differing byte(s) in a row",
                  base + first, base + first, got[first], want[first], last - first);
    failure << msg;
  } else {
    failure << "the common prefix of " << n << " bytes is identical";
  }
  return failure;
}

std::set<int> held_lock_bytes(const std::string& path) {
  std::set<int> held;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return held;
  for (int b = 0; b < 300; ++b) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = b;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK) held.insert(b);
  }
  ::close(fd);
  return held;
}

bool wait_unlocked(const std::string& path, int timeout_ms) {
  for (int waited = 0; waited < timeout_ms; waited += 5) {
    if (held_lock_bytes(path).empty()) return true;
    ::usleep(5000);
  }
  return held_lock_bytes(path).empty();
}

bool contains_icase(const std::string& haystack, const std::string& needle) {
  auto lower = [](std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  return lower(haystack).find(lower(needle)) != std::string::npos;
}

// ---------------------------------------------------------------------------
// ImageBuilder

std::string Write::qemu_io_command() const {
  char buf[96];
  switch (kind) {
    case kPattern:
      std::snprintf(buf, sizeof buf, "write -P 0x%02x %" PRIu64 " %" PRIu64, pattern, offset, length);
      break;
    case kZero:
      std::snprintf(buf, sizeof buf, "write -z %" PRIu64 " %" PRIu64, offset, length);
      break;
    case kZeroUnmap:
      std::snprintf(buf, sizeof buf, "write -z -u %" PRIu64 " %" PRIu64, offset, length);
      break;
    case kDiscard:
      std::snprintf(buf, sizeof buf, "discard %" PRIu64 " %" PRIu64, offset, length);
      break;
  }
  return buf;
}

void ImageBuilder::run(const std::vector<std::string>& argv, bool expect_failure) {
  if (!ok()) return;
  CommandResult r = run_command(argv, dir_);
  script_ += r.command + (expect_failure ? "   # expected to fail" : "") + "\n";
  if (r.ok() == expect_failure) {
    error_ = (expect_failure ? "expected to fail but succeeded: " : "") + r.describe();
  }
}

void ImageBuilder::create(const std::string& name, const std::string& format, const std::string& options,
                          uint64_t size, const std::string& backing, const std::string& backing_format) {
  std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", format};
  if (!options.empty()) argv.insert(argv.end(), {"-o", options});
  if (!backing.empty()) argv.insert(argv.end(), {"-b", backing, "-F", backing_format});
  argv.push_back(name);
  if (size) argv.push_back(std::to_string(size));
  run(argv);
}

void ImageBuilder::write(const std::string& name, const std::string& format, const std::vector<Write>& writes,
                         const std::vector<std::string>& extra, bool expect_failure) {
  std::vector<std::string> argv{"qemu-io", "-f", format};
  for (const Write& w : writes) {
    argv.insert(argv.end(), {"-c", w.qemu_io_command()});
    written_.emplace_back(w.offset, w.length);
  }
  for (const auto& e : extra) argv.insert(argv.end(), {"-c", e});
  argv.push_back(name);
  run(argv, expect_failure);
}

void ImageBuilder::random_bytes(const std::string& name, uint64_t offset, uint64_t length, uint32_t seed) {
  if (!ok()) return;
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> data(length);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  script_ += "# " + name + ": " + std::to_string(length) + " bytes from std::mt19937_64(" +
             std::to_string(seed) + ") at " + std::to_string(offset) + "\n";
  if (!patch_file(dir_ + "/" + name, offset, data)) error_ = "writing random bytes into " + name;
  written_.emplace_back(offset, length);
}

// ---------------------------------------------------------------------------
// SyncDisk

Result<std::unique_ptr<SyncDisk>> SyncDisk::open(const std::string& path, OpenOptions options) {
  UQ_ASSIGN_OR_RETURN(auto reactor, uring::Reactor::create());
  std::unique_ptr<SyncDisk> d(new SyncDisk());
  d->reactor_ = std::move(reactor);
  UQ_ASSIGN_OR_RETURN(d->disk_, sync_wait(*d->reactor_, open_disk(path, std::move(options))));
  return d;
}

SyncDisk::~SyncDisk() {
  (void)close();
  disk_.reset();
}

Status SyncDisk::close() {
  if (closed_ || !disk_) return Status();
  closed_ = true;
  return sync_wait(*reactor_, disk_->close());
}

Status SyncDisk::read(uint64_t offset, std::span<uint8_t> buf) {
  return sync_wait(*reactor_,
                   disk_->read(offset, std::span<std::byte>(reinterpret_cast<std::byte*>(buf.data()), buf.size())));
}

std::vector<Status> SyncDisk::read_concurrently(
    const std::vector<std::pair<uint64_t, std::span<uint8_t>>>& reqs) {
  std::vector<Task<Status>> tasks;
  tasks.reserve(reqs.size());
  for (const auto& [offset, buf] : reqs) {
    tasks.push_back(disk_->read(offset, std::span<std::byte>(reinterpret_cast<std::byte*>(buf.data()), buf.size())));
  }
  return sync_wait(*reactor_, when_all(std::move(tasks)));
}

Result<std::vector<uint8_t>> SyncDisk::read_all(size_t chunk) {
  std::vector<uint8_t> data(static_cast<size_t>(disk_->size()));
  for (uint64_t pos = 0; pos < data.size(); pos += chunk) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, data.size() - pos));
    Status s = read(pos, std::span<uint8_t>(data.data() + pos, n));
    if (!s.ok()) return s.error();
  }
  return data;
}

}  // namespace uqcow::testing
