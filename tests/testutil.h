// Helpers shared by the cross-component tests: running commands (qemu-img,
// qemu-io, the uqcow binary) and capturing what they print, temporary
// directories under $TEST_TMPDIR, file contents, and a synchronous wrapper
// around a Disk opened on its own reactor.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "block/disk.h"
#include "block/options.h"
#include "engine/result.h"
#include "engine/sync_wait.h"
#include "uring/reactor.h"

namespace uqcow::testing {

struct CommandResult {
  std::string command;  // the argv, shell-quoted, for messages and reproducers
  std::string cwd;      // where it ran ("" = the test's working directory)
  int exit_code = -1;   // the exit status, or 128 + signal number if killed
  std::string out;
  std::string err;

  bool ok() const { return exit_code == 0; }
  // "cd DIR && COMMAND -> exit N" plus stdout and stderr, for failure messages.
  std::string describe() const;
};

// Runs argv[0] (looked up in PATH) with the given arguments, in `cwd` if not
// empty, with stdin from /dev/null and core dumps disabled. Waits for it and
// captures both output streams. Never throws.
CommandResult run_command(const std::vector<std::string>& argv, const std::string& cwd = "");

// gtest assertion: the command exited 0 (prints describe() otherwise).
::testing::AssertionResult Succeeded(const CommandResult& r);

// The absolute path of `name` in PATH, if it is there and executable.
std::optional<std::string> find_tool(const std::string& name);

// Records a skip of the current test when `name` is not in PATH and returns
// false. In SetUp() that skips the test body; in a test body, return when it
// returns false (or use UQ_REQUIRE_TOOL, which does both).
bool require_tool(const std::string& name);

#define UQ_REQUIRE_TOOL(name)                            \
  do {                                                   \
    if (!::uqcow::testing::require_tool(name)) return;   \
  } while (0)

// The uqcow binary: $UQCOW (set by the BUILD file from the //tools:uqcow
// label), made absolute so that commands may run in another directory. Empty
// if the variable is unset.
std::string uqcow_binary();

// Runs the uqcow binary with `args`.
CommandResult run_uqcow(const std::vector<std::string>& args, const std::string& cwd = "");

// A fresh directory under `base`, by default $TEST_TMPDIR (or /tmp), removed
// with its contents on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "uqcow", const std::string& base = "");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Whole-file helpers. read_file returns nullopt if the file cannot be read.
std::optional<std::vector<uint8_t>> read_file(const std::string& path);
bool write_file(const std::string& path, std::span<const uint8_t> data);

// Patches bytes of an existing file in place (pwrite, no truncation).
bool patch_file(const std::string& path, uint64_t offset, std::span<const uint8_t> bytes);
bool patch_be16(const std::string& path, uint64_t offset, uint16_t value);
bool patch_be32(const std::string& path, uint64_t offset, uint32_t value);
bool patch_be64(const std::string& path, uint64_t offset, uint64_t value);
std::optional<uint32_t> peek_be32(const std::string& path, uint64_t offset);
std::optional<uint64_t> peek_be64(const std::string& path, uint64_t offset);

// Byte offsets of the qcow2 header fields (docs/interop/qcow2.txt, "Header"),
// for tests that patch or peek at them. Brought in with
// `using namespace header_field;` where used.
namespace header_field {
enum : uint64_t {
  kMagic = 0,
  kVersion = 4,
  kBackingFileOffset = 8,
  kBackingFileSize = 16,
  kClusterBits = 20,
  kSize = 24,
  kCryptMethod = 32,
  kL1Size = 36,
  kL1TableOffset = 40,
  kRefcountTableOffset = 48,
  kRefcountTableClusters = 56,
  kNbSnapshots = 60,
  kSnapshotsOffset = 64,
  kIncompatibleFeatures = 72,
  kRefcountOrder = 96,
  kHeaderLength = 100,
  kCompressionType = 104,
};
}  // namespace header_field

// ---- building images with qemu-img / qemu-io --------------------------------

// One qemu-io request, e.g. P(1000, 3000, 0x11) is "write -P 0x11 1000 3000".
struct Write {
  enum Kind { kPattern, kZero, kZeroUnmap, kDiscard } kind;
  uint64_t offset;
  uint64_t length;
  unsigned pattern = 0;  // for kPattern

  std::string qemu_io_command() const;
};

inline Write P(uint64_t off, uint64_t len, unsigned pattern) { return {Write::kPattern, off, len, pattern}; }
inline Write Z(uint64_t off, uint64_t len) { return {Write::kZero, off, len}; }          // write -z
inline Write ZU(uint64_t off, uint64_t len) { return {Write::kZeroUnmap, off, len}; }   // write -z -u
inline Write D(uint64_t off, uint64_t len) { return {Write::kDiscard, off, len}; }      // discard

// Runs the commands that build a test's images in one directory (relative
// names resolve there, as a user's shell would), and keeps them as a shell
// script for failure messages: a reproducer. Stops at the first command that
// fails; check ok() once at the end.
class ImageBuilder {
 public:
  explicit ImageBuilder(std::string dir) : dir_(std::move(dir)) {}

  const std::string& dir() const { return dir_; }
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::string script() const { return "cd " + dir_ + "\n" + script_; }
  // Guest ranges the build wrote, in order.
  const std::vector<std::pair<uint64_t, uint64_t>>& written() const { return written_; }

  // Runs argv in dir(); with expect_failure, a zero exit is the error (e.g.
  // qemu-io -c abort).
  void run(const std::vector<std::string>& argv, bool expect_failure = false);
  // qemu-img create -q -f FORMAT [-o OPTIONS] [-b BACKING -F BACKING_FORMAT] NAME [SIZE]
  // (SIZE 0: omitted, the backing file's size).
  void create(const std::string& name, const std::string& format, const std::string& options,
              uint64_t size, const std::string& backing = "", const std::string& backing_format = "");
  // One qemu-io invocation with a -c per write, then the `extra` commands.
  void write(const std::string& name, const std::string& format, const std::vector<Write>& writes,
             const std::vector<std::string>& extra = {}, bool expect_failure = false);
  // Fills [offset, offset + length) of an existing file with pseudo-random
  // (incompressible) bytes from std::mt19937_64(seed). In-process; the script
  // records it as a comment.
  void random_bytes(const std::string& name, uint64_t offset, uint64_t length, uint32_t seed);
  void mkdir(const std::string& name) { run({"mkdir", "-p", name}); }

 private:
  std::string dir_;
  std::string script_;
  std::string error_;
  std::vector<std::pair<uint64_t, uint64_t>> written_;
};

// Compares two byte ranges; on a mismatch reports the sizes, the first
// differing offset (plus `base`, e.g. the guest offset of the range) and the
// bytes there, instead of dumping everything.
::testing::AssertionResult SameBytes(std::span<const uint8_t> got, std::span<const uint8_t> want,
                                     uint64_t base = 0);

// The bytes in 0..299 of `path` on which some open file description holds a
// lock (QEMU's image-lock bytes, uring/file_lock.h), probed with F_OFD_GETLK
// from a descriptor that holds none.
std::set<int> held_lock_bytes(const std::string& path);
// Waits up to `timeout_ms` until no lock is held on `path`. A killed uqcow
// releases its locks when the kernel has finished the io_uring requests it
// left in flight, which can be a moment after waitpid() returns.
bool wait_unlocked(const std::string& path, int timeout_ms = 10000);

// Case-insensitive substring test, for error messages.
bool contains_icase(const std::string& haystack, const std::string& needle);

// A Disk opened with open_disk() on a reactor owned by this object, driven
// synchronously. One per thread at a time (one reactor per thread). The disk
// is closed before the reactor goes.
class SyncDisk {
 public:
  static Result<std::unique_ptr<SyncDisk>> open(const std::string& path, OpenOptions options = {});
  ~SyncDisk();

  Disk& disk() { return *disk_; }
  uint64_t size() const { return disk_->size(); }
  Status read(uint64_t offset, std::span<uint8_t> buf);
  // Issues every read at once (when_all) and waits for all of them.
  std::vector<Status> read_concurrently(const std::vector<std::pair<uint64_t, std::span<uint8_t>>>& reqs);
  // Reads the whole disk in chunks of `chunk` bytes (the last may be short).
  Result<std::vector<uint8_t>> read_all(size_t chunk = (1 << 20) + 4097);
  Status close();
  // Drives any task on this disk's reactor to completion (writes, flushes,
  // calls on the concrete image).
  template <class T>
  T run(Task<T> task) {
    return sync_wait(*reactor_, std::move(task));
  }

 private:
  SyncDisk() = default;
  std::unique_ptr<uring::Reactor> reactor_;
  std::unique_ptr<Disk> disk_;
  bool closed_ = false;
};

}  // namespace uqcow::testing
