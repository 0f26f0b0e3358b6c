// Shared plumbing of the uqcow subcommands: argument parsing, running a task
// on a reactor, the common image-open flags, qemu-img style output helpers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "block/disk.h"
#include "block/options.h"
#include "engine/result.h"
#include "engine/sync_wait.h"
#include "engine/task.h"
#include "uring/reactor.h"

namespace uqcow::cli {

// A minimal getopt-like parser. Options are declared up front; `--name=value`,
// `--name value`, `-x value` and `-xVALUE` are accepted; everything else is a
// positional argument. Repeated options keep every value (e.g. io -c).
// -h/--help is built in: it sets help_requested() (print_help lists it).
class Args {
 public:
  // `has_value` options take an argument; the others are flags.
  Args& flag(const std::string& names, const std::string& help);
  Args& option(const std::string& names, const std::string& help, const std::string& metavar = "VALUE");

  // Parses argv[first..]; on error returns a message naming the bad option.
  Status parse(int argc, char** argv, int first = 1);

  bool help_requested() const { return help_requested_; }
  bool has(const std::string& name) const;
  std::optional<std::string> get(const std::string& name) const;
  std::string get_or(const std::string& name, const std::string& fallback) const;
  const std::vector<std::string>& all(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  // Every option given, in command-line order, as (first declared name,
  // value): for commands whose options are a sequence of actions.
  const std::vector<std::pair<std::string, std::string>>& sequence() const { return sequence_; }
  // The option list for --help, one line per option.
  std::string help() const;

 private:
  struct Spec {
    std::vector<std::string> names;  // "-f", "--format"
    bool has_value;
    std::string help;
    std::string metavar;
  };
  const Spec* find(const std::string& name) const;
  std::vector<Spec> specs_;
  std::map<std::string, std::vector<std::string>> values_;  // keyed by first name
  std::vector<std::string> positional_;
  std::vector<std::pair<std::string, std::string>> sequence_;
  bool help_requested_ = false;
};

// Adds the flags every image-opening subcommand shares: -f, -t, -U (force
// share: QEMU's image locking, see OpenOptions), --passphrase-file, and the runtime options
// with QEMU's names (--l2-cache-size, --l2-cache-entry-size,
// --refcount-cache-size, --cache-clean-interval, --lazy-refcounts,
// --overlap-check) plus --image-opt KEY=VALUE for any of them, and
// --inject RULE (fault injection, repeatable).
void add_open_flags(Args& args);
// Builds OpenOptions from those flags. Reads the passphrase file if given.
Result<OpenOptions> open_options(const Args& args, bool read_only);
// The passphrase in `path` without its trailing newline. Passphrases are
// only ever read from files, never taken from the command line.
Result<std::string> read_passphrase_file(const std::string& path);

// Runs `task` to completion on a reactor owned by this call.
template <class T>
T run(Task<T> task) {
  auto reactor = uring::Reactor::create();
  if (!reactor.ok()) {
    std::fprintf(stderr, "uqcow: %s\n", reactor.error().message().c_str());
    std::exit(1);
  }
  return sync_wait(**reactor, std::move(task));
}

// Prints "uqcow: <message>" to stderr and returns `exit_code`.
int fail(const std::string& message, int exit_code = 1);
int fail(const Status& status, int exit_code = 1);

// qemu's size_to_str(): "0 B", "388 KiB", "1 GiB", "1.5 GiB".
std::string human_size(uint64_t bytes);
// JSON string literal with escapes.
std::string json_string(const std::string& s);

// qemu-img's -p: "    (42.00/100%)" redrawn in place. Shown on stderr, and
// only when stderr is a terminal, so it never mixes with a command's output.
class Progress {
 public:
  explicit Progress(bool requested);
  // Reports `done` of `total`; redraws once the value moved by 1% or more.
  void update(uint64_t done, uint64_t total);
  // Shows 100% and ends the line.
  void finish();

 private:
  void draw(double percent);
  bool enabled_;
  double drawn_ = -100;
};

// Prints `usage` and the options; used by every subcommand's --help.
void print_help(const char* usage, const char* description, const Args& args);

// Subcommand entry points (tools/<name>.cc). Each returns the exit code.
int cmd_info(int argc, char** argv);
int cmd_map(int argc, char** argv);
int cmd_convert(int argc, char** argv);
int cmd_compare(int argc, char** argv);
int cmd_io(int argc, char** argv);
int cmd_create(int argc, char** argv);
int cmd_check(int argc, char** argv);
int cmd_resize(int argc, char** argv);
int cmd_snapshot(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_serve(int argc, char** argv);
int cmd_bitmap(int argc, char** argv);

}  // namespace uqcow::cli
