// Encrypted qcow2 images against qemu-img / qemu-io, the independent oracle:
// - uqcow creates and writes LUKS images (several ciphers); qemu-io reads the
//   plaintext back, qemu-img check finds them clean, and the file never
//   holds the plaintext.
// - qemu-img creates LUKS (xts-plain64, cbc-essiv) and legacy AES images;
//   uqcow reads qemu's data and writes (aligned, unaligned, COW head/tail,
//   zero writes); qemu-io reads uqcow's writes; qemu-img check stays clean.
// - A wrong or missing passphrase, and damaged LUKS header fields, fail with
//   a message saying why.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr char kSecret[] = "abc123";

struct Cipher {
  std::string name;
  std::string options;  // encrypt.* create options beyond the format
};

void PrintTo(const Cipher& c, std::ostream* os) { *os << c.name; }

class Encrypted : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img") || !require_tool("qemu-io")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "$UQCOW is not set";
    ASSERT_TRUE(write_file(dir_.file("pw"), std::span<const uint8_t>(
                                                reinterpret_cast<const uint8_t*>(kSecret), sizeof kSecret - 1)));
  }

  std::vector<std::string> qemu_secret() const {
    return {"--object", std::string("secret,id=sec0,data=") + kSecret};
  }
  std::string image_opts(const std::string& image) const {
    return "driver=qcow2,file.filename=" + dir_.file(image) + ",encrypt.key-secret=sec0";
  }

  // qemu-io on the image with the key; every command must succeed.
  ::testing::AssertionResult qemu_io(const std::string& image, const std::vector<std::string>& cmds) {
    std::vector<std::string> argv{"qemu-io"};
    for (auto& a : qemu_secret()) argv.push_back(a);
    argv.insert(argv.end(), {"--image-opts", image_opts(image)});
    for (auto& c : cmds) argv.insert(argv.end(), {"-c", c});
    CommandResult r = run_command(argv, dir_.path());
    if (!r.ok() || r.out.find("failed") != std::string::npos || !r.err.empty()) {
      return ::testing::AssertionFailure() << r.describe();
    }
    return ::testing::AssertionSuccess();
  }

  ::testing::AssertionResult qemu_check(const std::string& image) {
    std::vector<std::string> argv{"qemu-img", "check"};
    for (auto& a : qemu_secret()) argv.push_back(a);
    argv.insert(argv.end(), {"--image-opts", image_opts(image)});
    return Succeeded(run_command(argv, dir_.path()));
  }

  CommandResult uqcow_io(const std::string& image, const std::vector<std::string>& cmds,
                         const std::vector<std::string>& flags = {"--passphrase-file", "pw"}) {
    std::vector<std::string> args{"io"};
    args.insert(args.end(), flags.begin(), flags.end());
    for (auto& c : cmds) args.insert(args.end(), {"-c", c});
    args.push_back(image);
    return run_uqcow(args, dir_.path());
  }

  ::testing::AssertionResult uqcow_io_ok(const std::string& image, const std::vector<std::string>& cmds) {
    CommandResult r = uqcow_io(image, cmds);
    if (!r.ok() || r.out.find("failed") != std::string::npos) return ::testing::AssertionFailure() << r.describe();
    return ::testing::AssertionSuccess();
  }

  // qemu-img create with the key, retried: LUKS creation times a PBKDF and
  // sometimes fails with "Unable to get accurate CPU usage".
  ::testing::AssertionResult qemu_create(const std::string& image, const std::string& options) {
    std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2"};
    for (auto& a : qemu_secret()) argv.push_back(a);
    argv.insert(argv.end(), {"-o", options + ",encrypt.key-secret=sec0", image, "16M"});
    CommandResult r;
    for (int attempt = 0; attempt < 3; ++attempt) {
      r = run_command(argv, dir_.path());
      if (r.ok()) break;
    }
    return Succeeded(r);
  }

  // True if the file holds `n` consecutive bytes equal to `byte`.
  bool file_has_run(const std::string& image, uint8_t byte, size_t n) {
    auto data = read_file(dir_.file(image));
    EXPECT_TRUE(data.has_value());
    if (!data) return true;
    std::vector<uint8_t> run(n, byte);
    return std::search(data->begin(), data->end(), run.begin(), run.end()) != data->end();
  }

  TempDir dir_{"crypto"};
};

// Writes of every shape: whole clusters, sub-cluster (COW head and tail into
// a new cluster), unaligned (read-modify-write of sectors), an in-place
// overwrite of an allocated cluster, and zero writes.
const std::vector<std::string> kUqcowWrites = {
    "write -P 0x5a 0 64k",       "write -P 0x5b 100k 3000",  "write -P 0x5c 200k 512",
    "write -P 0x5d 1000 24",     "write -P 0x5e 8k 4k",      "write -z 300k 8k",
    "write -P 0x5f 1M 128k",     "write -z 1064960 4k",
    // A cluster kept allocated with the zero flag, then partly written: the
    // copy-on-write zeros must be stored encrypted.
    "write -P 0x61 2M 64k",      "write -z 2M 64k",          "write -P 0x62 2105344 4k",
};
const std::vector<std::string> kReadBackAfterUqcowWrites = {
    "read -P 0x5a 0 1000",       "read -P 0x5d 1000 24",     "read -P 0x5a 1024 7168",
    "read -P 0x5e 8k 4k",        "read -P 0x5a 12k 52k",     "read -P 0 64k 36k",
    "read -P 0x5b 100k 3000",    "read -P 0 105400 99400",   "read -P 0x5c 200k 512",
    "read -P 0 300k 8k",         "read -P 0x5f 1M 16k",      "read -P 0 1064960 4096",
    "read -P 0x5f 1069056 108k", "read -P 0 1179648 896k",
    "read -P 0 2M 8k",           "read -P 0x62 2105344 4k",  "read -P 0 2109440 52k",
};

class UqcowCreates : public Encrypted, public ::testing::WithParamInterface<Cipher> {};

TEST_P(UqcowCreates, QemuReadsThePlaintextAndCheckIsClean) {
  if (IsSkipped()) return;
  const std::string opts = "encrypt.format=luks,encrypt.iter-time=10" + GetParam().options;
  ASSERT_TRUE(Succeeded(run_uqcow({"create", "-q", "-f", "qcow2", "-o", opts, "--passphrase-file", "pw",
                                   "img.qcow2", "16M"}, dir_.path())));
  ASSERT_TRUE(qemu_check("img.qcow2"));
  ASSERT_TRUE(uqcow_io_ok("img.qcow2", kUqcowWrites));
  // The 0x5f writes go into a fresh cluster; qemu reads what uqcow wrote.
  ASSERT_TRUE(qemu_io("img.qcow2", kReadBackAfterUqcowWrites));
  ASSERT_TRUE(uqcow_io_ok("img.qcow2", kReadBackAfterUqcowWrites));
  EXPECT_TRUE(qemu_check("img.qcow2"));
  EXPECT_TRUE(Succeeded(run_uqcow({"check", "--passphrase-file", "pw", "img.qcow2"}, dir_.path())));
  EXPECT_FALSE(file_has_run("img.qcow2", 0x5a, 512)) << "plaintext found in the file";
  EXPECT_FALSE(file_has_run("img.qcow2", 0x5f, 512)) << "plaintext found in the file";
}

INSTANTIATE_TEST_SUITE_P(
    Ciphers, UqcowCreates,
    ::testing::Values(Cipher{"aes256_xts_plain64", ""},
                      Cipher{"aes128_xts_plain64", ",encrypt.cipher-alg=aes-128"},
                      Cipher{"aes128_cbc_essiv", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                                                 "encrypt.ivgen-alg=essiv"},
                      Cipher{"aes256_cbc_plain", ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain"},
                      Cipher{"sha512", ",encrypt.hash-alg=sha512"},
                      Cipher{"extended_l2", ",extended_l2=on"},
                      Cipher{"cluster_4k", ",cluster_size=4k"}),
    [](const auto& info) { return info.param.name; });

class QemuCreates : public Encrypted, public ::testing::WithParamInterface<Cipher> {};

TEST_P(QemuCreates, UqcowReadsAndWritesQemuReadsBack) {
  if (IsSkipped()) return;
  ASSERT_TRUE(qemu_create("img.qcow2", GetParam().options));
  ASSERT_TRUE(qemu_io("img.qcow2", {"write -P 0x11 0 192k", "write -P 0x12 5M 64k"}));
  ASSERT_TRUE(uqcow_io_ok("img.qcow2", {"read -P 0x11 0 192k", "read -P 0x12 5M 64k", "read -P 0 192k 64k"}));
  // In place over qemu's clusters, then new clusters with COW.
  ASSERT_TRUE(uqcow_io_ok("img.qcow2", {"write -P 0x21 64k 4k", "write -P 0x22 70000 1000",
                                        "write -P 0x23 8M 4k", "write -P 0x24 5304320 8k"}));
  ASSERT_TRUE(qemu_io("img.qcow2", {"read -P 0x11 0 64k", "read -P 0x21 64k 4k", "read -P 0x11 69632 368",
                                    "read -P 0x22 70000 1000", "read -P 0x11 71000 125608",
                                    "read -P 0 8384512 4k", "read -P 0x23 8M 4k", "read -P 0 8392704 60k",
                                    "read -P 0x12 5M 60k", "read -P 0x24 5304320 8k",
                                    "read -P 0 5312512 60k"}));
  EXPECT_TRUE(qemu_check("img.qcow2"));
  EXPECT_FALSE(file_has_run("img.qcow2", 0x23, 512)) << "plaintext found in the file";
  // convert -O raw through the key matches qemu-img's.
  std::vector<std::string> qconv{"qemu-img", "convert"};
  for (auto& a : qemu_secret()) qconv.push_back(a);
  qconv.insert(qconv.end(), {"--image-opts", image_opts("img.qcow2"), "-O", "raw", "q.raw"});
  ASSERT_TRUE(Succeeded(run_command(qconv, dir_.path())));
  ASSERT_TRUE(Succeeded(run_uqcow({"convert", "--passphrase-file", "pw", "-O", "raw", "img.qcow2", "u.raw"},
                                  dir_.path())));
  EXPECT_EQ(read_file(dir_.file("q.raw")), read_file(dir_.file("u.raw")));
  // convert into a new LUKS image: qemu reads the same guest data from it.
  ASSERT_TRUE(Succeeded(run_uqcow({"convert", "--passphrase-file", "pw", "-O", "qcow2", "-o",
                                   "encrypt.format=luks,encrypt.iter-time=10", "--target-passphrase-file", "pw",
                                   "img.qcow2", "re.qcow2"},
                                  dir_.path())));
  EXPECT_TRUE(qemu_check("re.qcow2"));
  qconv[qconv.size() - 4] = image_opts("re.qcow2");
  qconv.back() = "re.raw";
  ASSERT_TRUE(Succeeded(run_command(qconv, dir_.path())));
  EXPECT_EQ(read_file(dir_.file("q.raw")), read_file(dir_.file("re.raw")));
}

INSTANTIATE_TEST_SUITE_P(
    Formats, QemuCreates,
    ::testing::Values(Cipher{"luks_default", "encrypt.format=luks,encrypt.iter-time=10"},
                      Cipher{"luks_aes128_cbc_essiv", "encrypt.format=luks,encrypt.iter-time=10,"
                                                      "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                                                      "encrypt.ivgen-alg=essiv"},
                      Cipher{"luks_cluster_4k", "encrypt.format=luks,encrypt.iter-time=10,cluster_size=4k"},
                      Cipher{"legacy_aes", "encrypt.format=aes"}),
    [](const auto& info) { return info.param.name; });

TEST_F(Encrypted, WrongOrMissingPassphraseFailsWithAMessage) {
  if (IsSkipped()) return;
  ASSERT_TRUE(qemu_create("img.qcow2", "encrypt.format=luks,encrypt.iter-time=10"));
  ASSERT_TRUE(qemu_io("img.qcow2", {"write -P 0x11 0 64k"}));
  ASSERT_TRUE(write_file(dir_.file("wrong"), std::vector<uint8_t>{'n', 'o', 'p', 'e'}));
  CommandResult wrong = uqcow_io("img.qcow2", {"read 0 4k"}, {"--passphrase-file", "wrong"});
  EXPECT_NE(wrong.exit_code, 0) << wrong.describe();
  EXPECT_NE(wrong.err.find("invalid passphrase"), std::string::npos) << wrong.describe();
  // Read-write without a key: refused at open.
  CommandResult rw = uqcow_io("img.qcow2", {"write 0 4k"}, {});
  EXPECT_NE(rw.exit_code, 0) << rw.describe();
  EXPECT_NE(rw.err.find("--passphrase-file"), std::string::npos) << rw.describe();
  // Read-only without a key: metadata work is possible, encrypted data is not.
  CommandResult ro = uqcow_io("img.qcow2", {"read 0 4k"}, {"-r"});
  EXPECT_NE(ro.exit_code, 0) << ro.describe();
  EXPECT_NE((ro.out + ro.err).find("--passphrase-file"), std::string::npos) << ro.describe();
  EXPECT_TRUE(Succeeded(run_uqcow({"check", "img.qcow2"}, dir_.path())));
  // Creating an encrypted image needs a passphrase file.
  CommandResult create = run_uqcow({"create", "-q", "-o", "encrypt.format=luks", "new.qcow2", "1M"}, dir_.path());
  EXPECT_NE(create.exit_code, 0);
  EXPECT_NE(create.err.find("--passphrase-file"), std::string::npos) << create.describe();
}

// Damaged LUKS header fields in an image: open fails naming the field, fast
// (no PBKDF2 with a huge count, no allocation sized by a stripe count).
TEST_F(Encrypted, DamagedLuksHeaderFieldsAreNamed) {
  if (IsSkipped()) return;
  ASSERT_TRUE(Succeeded(run_uqcow({"create", "-q", "-o", "encrypt.format=luks,encrypt.iter-time=10",
                                   "--passphrase-file", "pw", "good.qcow2", "16M"}, dir_.path())));
  auto good = read_file(dir_.file("good.qcow2"));
  ASSERT_TRUE(good.has_value());
  // The FDE extension gives the area's offset; find the LUKS magic instead of
  // parsing the header extensions again here.
  const uint8_t magic[] = {'L', 'U', 'K', 'S', 0xba, 0xbe};
  auto at = std::search(good->begin(), good->end(), std::begin(magic), std::end(magic));
  ASSERT_NE(at, good->end());
  const uint64_t luks = static_cast<uint64_t>(at - good->begin());
  struct Case {
    const char* name;
    uint64_t offset;
    uint32_t value;
    const char* field;
  };
  const Case cases[] = {
      {"magic", 0, 0x4c554b00, "magic"},
      {"key_bytes", 108, 0xffffffff, "key_bytes"},
      {"mk_iterations", 164, 0xffffffff, "mk_digest_iterations"},
      {"slot_iterations", 208 + 4, 0xfffffff0, "key slot 0 iterations"},
      {"slot_stripes", 208 + 44, 0x7fffffff, "key slot 0 stripes"},
      {"slot_offset", 208 + 40, 0x10000000, "key slot 0 key_offset"},
      {"slot_active", 208, 0x1, "key slot 0 active"},
  };
  for (const Case& c : cases) {
    ASSERT_TRUE(write_file(dir_.file("bad.qcow2"), *good));
    ASSERT_TRUE(patch_be32(dir_.file("bad.qcow2"), luks + c.offset, c.value));
    CommandResult r = uqcow_io("bad.qcow2", {"read 0 4k"}, {"-r", "--passphrase-file", "pw"});
    EXPECT_NE(r.exit_code, 0) << c.name << ": " << r.describe();
    EXPECT_NE(r.err.find(c.field), std::string::npos) << c.name << ": " << r.describe();
  }
}

}  // namespace
}  // namespace uqcow::testing
