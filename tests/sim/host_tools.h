// What the simulation needs from the host: running qemu-img/qemu-io (image
// creation and the independent checks), a temporary directory, and whole
// files. (tests/testutil is private to tests/; this is the small subset the
// simulation uses.)
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace uqcow::sim {

struct CommandResult {
  std::string command;  // shell-quoted argv, for messages
  int exit_code = -1;   // exit status, or 128 + signal
  std::string output;   // stdout and stderr, interleaved

  bool ok() const { return exit_code == 0; }
  std::string describe() const;
};

// Runs argv (argv[0] looked up in PATH) in `cwd` (if not empty), stdin from
// /dev/null, and waits for it.
CommandResult run_command(const std::vector<std::string>& argv, const std::string& cwd = "");

bool have_tool(const std::string& name);

// A fresh directory under $TEST_TMPDIR (or /tmp), removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::optional<std::vector<uint8_t>> read_file(const std::string& path);
bool write_file(const std::string& path, std::span<const uint8_t> data);

}  // namespace uqcow::sim
