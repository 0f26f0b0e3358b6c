#include "tests/bitmap_oracle.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <regex>
#include <sstream>

namespace uqcow::testing {

std::optional<std::vector<QemuBitmap>> qemu_bitmaps(const std::string& path) {
  auto r = run_command({"qemu-img", "info", "-U", "--output=json", path});
  if (!r.ok()) return std::nullopt;
  // qemu-img 7.2 prints each bitmap as {"flags": [...], "name": "...",
  // "granularity": N}, in that key order.
  static const std::regex entry(R"re("flags":\s*\[([^\]]*)\],\s*"name":\s*"([^"]*)",\s*"granularity":\s*(\d+))re");
  std::vector<QemuBitmap> out;
  for (std::sregex_iterator it(r.out.begin(), r.out.end(), entry), end; it != end; ++it) {
    const std::string flags = (*it)[1];
    out.push_back(QemuBitmap{.name = (*it)[2],
                             .granularity = std::stoull((*it)[3]),
                             .in_use = flags.find("\"in-use\"") != std::string::npos,
                             .enabled = flags.find("\"auto\"") != std::string::npos});
  }
  return out;
}

const QemuBitmap* find_bitmap(const std::vector<QemuBitmap>& list, const std::string& name) {
  for (const auto& b : list) {
    if (b.name == name) return &b;
  }
  return nullptr;
}

std::optional<Extents> qemu_dirty_extents(const std::string& path, const std::string& name) {
  auto r = run_command({"nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                        "-B", name, path, "]"});
  if (!r.ok()) {
    ADD_FAILURE() << r.describe();
    return std::nullopt;
  }
  Extents out;
  std::istringstream in(r.out);
  uint64_t off, len, flag;
  std::string word;
  while (in >> off >> len >> flag >> word) {
    if (!(flag & 1)) continue;
    if (!out.empty() && out.back().first + out.back().second == off) {
      out.back().second += len;
    } else {
      out.emplace_back(off, len);
    }
  }
  return out;
}

Extents extents_of(const DirtyBitmap& bits) {
  Extents out;
  uint64_t off = 0;
  while (off < bits.size()) {
    bool dirty = false;
    const uint64_t n = bits.run_length(off, bits.size() - off, &dirty);
    if (dirty) {
      if (!out.empty() && out.back().first + out.back().second == off) {
        out.back().second += n;
      } else {
        out.emplace_back(off, n);
      }
    }
    off += n;
  }
  return out;
}

void BitmapModel::mark(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_) return;
  const uint64_t last = std::min(offset + length, size_) - 1;
  for (uint64_t g = offset / granularity_; g <= last / granularity_; ++g) dirty_[g] = 1;
}

void BitmapModel::resize(uint64_t new_size) {
  size_ = new_size;
  dirty_.resize((new_size + granularity_ - 1) / granularity_, 0);
}

Extents BitmapModel::extents() const {
  Extents out;
  for (uint64_t g = 0; g < dirty_.size(); ++g) {
    if (!dirty_[g]) continue;
    const uint64_t off = g * granularity_, len = std::min(granularity_, size_ - off);
    if (!out.empty() && out.back().first + out.back().second == off) {
      out.back().second += len;
    } else {
      out.emplace_back(off, len);
    }
  }
  return out;
}

::testing::AssertionResult BitmapModel::matches(const DirtyBitmap& bits) const {
  if (bits.size() != size_ || bits.granularity() != granularity_) {
    return ::testing::AssertionFailure() << "bitmap of " << bits.size() << " bytes at granularity "
                                         << bits.granularity() << ", expected " << size_ << " at " << granularity_;
  }
  for (uint64_t g = 0; g < dirty_.size(); ++g) {
    if (bits.dirty_at(g * granularity_) != static_cast<bool>(dirty_[g])) {
      return ::testing::AssertionFailure() << "granule " << g << " (offset " << g * granularity_ << ") is "
                                           << (dirty_[g] ? "clean, but a request marked it" : "dirty, but no request touched it");
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult BitmapModel::covered_by(const DirtyBitmap& bits) const {
  if (bits.granularity() != granularity_) {
    return ::testing::AssertionFailure() << "granularity " << bits.granularity() << ", expected " << granularity_;
  }
  for (uint64_t g = 0; g < dirty_.size(); ++g) {
    const uint64_t off = g * granularity_;
    if (dirty_[g] && (off >= bits.size() || !bits.dirty_at(off))) {
      return ::testing::AssertionFailure() << "granule " << g << " (offset " << off
                                           << ") is clean, but a request that may have reached the disk marked it";
    }
  }
  return ::testing::AssertionSuccess();
}

int failures_so_far() {
  const ::testing::TestResult* r = ::testing::UnitTest::GetInstance()->current_test_info()->result();
  int n = 0;
  for (int i = 0; i < r->total_part_count(); ++i) n += r->GetTestPartResult(i).failed();
  return n;
}

CheckCounts check_counts(const CommandResult& r) {
  static const std::regex errors(R"((\d+) errors were found on the image)");
  static const std::regex leaks(R"((\d+) leaked clusters were found on the image)");
  CheckCounts c;
  c.exit_code = r.exit_code;
  const std::string text = r.out + "\n" + r.err;
  std::smatch m;
  if (std::regex_search(text, m, errors)) c.corruptions = std::stoull(m[1]);
  if (std::regex_search(text, m, leaks)) c.leaks = std::stoull(m[1]);
  return c;
}

std::string describe(const CheckCounts& c) {
  return "exit " + std::to_string(c.exit_code) + ", " + std::to_string(c.corruptions) + " corruptions, " +
         std::to_string(c.leaks) + " leaks";
}

bool counts_agree(const std::string& path, const CommandResult& qemu_check, const std::string& where) {
  const int before = failures_so_far();
  auto ucheck = run_uqcow({"check", path});
  EXPECT_EQ(check_counts(ucheck), check_counts(qemu_check))
      << where << ": uqcow check " << describe(check_counts(ucheck)) << ", qemu-img check "
      << describe(check_counts(qemu_check)) << "\n" << ucheck.describe() << "\n" << qemu_check.describe();
  return failures_so_far() == before;
}

bool checks_agree_and_repair(const std::string& path, const CommandResult& qemu_check, const std::string& where) {
  const int before = failures_so_far();
  counts_agree(path, qemu_check, where);

  const std::string by_uqcow = path + ".uqcow-repaired", by_qemu = path + ".qemu-repaired";
  std::filesystem::copy_file(path, by_uqcow, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(path, by_qemu, std::filesystem::copy_options::overwrite_existing);
  auto urepair = run_uqcow({"check", "-q", "-r", "all", by_uqcow});
  EXPECT_EQ(urepair.exit_code, 0) << where << "\n" << urepair.describe();
  auto after = run_command({"qemu-img", "check", by_uqcow});
  EXPECT_EQ(after.exit_code, 0) << where << ": not clean after uqcow check -r all\n" << after.describe();
  if (auto left = qemu_bitmaps(by_uqcow)) {
    for (const auto& b : *left) EXPECT_FALSE(b.in_use) << where << ": uqcow check -r all kept " << b.name << " in use";
  } else {
    ADD_FAILURE() << where << ": qemu-img info cannot read the image uqcow check -r all repaired";
  }
  auto qrepair = run_command({"qemu-img", "check", "-q", "-r", "all", by_qemu});
  EXPECT_EQ(qrepair.exit_code, 0) << where << "\n" << qrepair.describe();
  auto uafter = run_uqcow({"check", by_qemu});
  EXPECT_EQ(uafter.exit_code, 0) << where << ": uqcow check after qemu-img check -r all\n" << uafter.describe();
  std::remove(by_uqcow.c_str());
  std::remove(by_qemu.c_str());
  return failures_so_far() == before;
}

}  // namespace uqcow::testing
