#include "tests/fuzz/fuzz_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "qcow2/header.h"

namespace uqcow::fuzz {
namespace {

// Removed with its files when the process exits normally.
struct PrivateDir {
  std::string path;
  ~PrivateDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

const std::string& private_dir() {
  static const PrivateDir dir{[] {
    const char* base = std::getenv("TEST_TMPDIR");
    if (base == nullptr) base = std::getenv("TMPDIR");
    std::string templ = std::string(base != nullptr ? base : "/tmp") + "/uqcow-fuzz.XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      std::perror("uqcow fuzz: mkdtemp");
      std::abort();
    }
    return templ;
  }()};
  return dir.path;
}

}  // namespace

uring::Reactor& reactor() {
  static std::unique_ptr<uring::Reactor> r = [] {
    auto created = uring::Reactor::create();
    if (!created.ok()) {
      std::fprintf(stderr, "uqcow fuzz: no io_uring: %s\n", created.error().message().c_str());
      std::abort();
    }
    return std::move(created).value();
  }();
  return *r;
}

std::string write_input(std::span<const uint8_t> data, const char* name) {
  std::string path = private_dir() + "/" + name;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::perror("uqcow fuzz: open");
    std::abort();
  }
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n <= 0) {
      std::perror("uqcow fuzz: write");
      std::abort();
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return path;
}

bool refers_only_to_private_files(std::span<const uint8_t> data) {
  auto header = qcow2::parse_header(data.first(std::min<size_t>(data.size(), 2u << 20)));
  if (!header.ok() || !header->data_file) return true;
  return header->data_file->find('/') == std::string::npos;
}

}  // namespace uqcow::fuzz
