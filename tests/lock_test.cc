// Image locking against QEMU's own tools (issue 13; QEMU's iotest 153 is the
// model). A holder process keeps an image open: `uqcow serve` or `qemu-nbd
// -t` (read-write, or -r), `qemu-io -c sleep` (read-write, -r, -r -U). Then:
//  - ByteForByte: uqcow's holder holds exactly the lock bytes QEMU's holder
//    holds in the same mode, on the image, its external data file and its
//    backing file (read with F_OFD_GETLK from this process);
//  - QemuToolsSeeUqcowAsQemu: every qemu-img/qemu-io command gets the same
//    exit code and lock message against `uqcow serve` as against `qemu-nbd`;
//  - UqcowCommandsMatchQemuImg: every uqcow command that opens an image gets
//    the same decision and lock message as its qemu-img/qemu-io twin against
//    the same QEMU holder;
//  - the refusals and successes spelled out (writers refused with QEMU's
//    message and exit 1, -U readers admitted, read-only sharing), two uqcow
//    processes, force-share on a read-write open, the external data file,
//    the backing file, and the release of every lock after kill -9.
// Commands run in the image's directory with relative names, so the paths
// in the messages are the same for both tools.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tests/nbd_client.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

std::set<int> held_bytes(const std::string& path) { return held_lock_bytes(path); }

std::string bytes_str(const std::set<int>& bytes) {
  std::string s = "{";
  for (int b : bytes) s += (s.size() > 1 ? "," : "") + std::to_string(b);
  return s + "}";
}

// "Failed to get ... lock\nIs another process using the image [...]?" out
// of a tool's stderr, or "" if there is none.
std::string lock_message(const std::string& err) {
  auto start = err.find("Failed to get");
  if (start == std::string::npos) return "";
  auto end = err.find("]?", start);
  return err.substr(start, end == std::string::npos ? std::string::npos : end + 2 - start);
}

// A process that holds an image open until it is destroyed (SIGKILL) or
// terminated. "{socket}" in its argv becomes a fresh unix socket path.
class Holder {
 public:
  // Starts argv in the directory of `path` and waits until `path` has byte
  // `ready_byte` locked (every
  // holder here locks byte 100, consistent read, on the file it opens last
  // or only). Null, with a test failure, if that does not happen.
  static std::unique_ptr<Holder> start(std::vector<std::string> argv, const std::string& path,
                                       int ready_byte = 100) {
    auto h = std::unique_ptr<Holder>(new Holder);
    for (auto& a : argv) {
      if (a == "{socket}") a = h->socket_.socket();
    }
    // In the image's directory: QEMU resolves a relative data_file name
    // against its working directory.
    argv.insert(argv.begin(), {"env", "-C", path.substr(0, path.rfind('/'))});
    h->process_ = ServeProcess::command(argv, h->socket_.socket());
    for (int i = 0; i < 1000; ++i) {
      if (held_bytes(path).count(ready_byte)) return h;
      if (!h->process_->running()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ADD_FAILURE() << "holder did not lock byte " << ready_byte << " of " << path << ": " << argv[0];
    return nullptr;
  }
  // SIGTERM, then the exit status.
  int terminate() { return process_->terminate(); }

 private:
  Holder() = default;
  SocketDir socket_;
  std::unique_ptr<ServeProcess> process_;
};

enum class Server { kUqcow, kQemu };
enum class Mode { kReadWrite, kReadOnly };

class LockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"qemu-img", "qemu-io", "qemu-nbd"}) {
      if (!require_tool(tool)) return;
    }
    ASSERT_FALSE(uqcow_binary().empty()) << "UQCOW is not set";
    img_ = dir_.file("img.qcow2");
    ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "img.qcow2", "16M"})));
    ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "other.qcow2", "16M"})));
    ASSERT_TRUE(Succeeded(qemu_io({"-c", "write -P 0x5a 0 64k", "img.qcow2"})));
    ASSERT_TRUE(Succeeded(qemu_img({"convert", "-O", "qcow2", "img.qcow2", "copy.qcow2"})));
  }

  CommandResult qemu_img(std::vector<std::string> args) {
    args.insert(args.begin(), "qemu-img");
    return run_command(args, dir_.path());
  }
  CommandResult qemu_io(std::vector<std::string> args) {
    args.insert(args.begin(), "qemu-io");
    return run_command(args, dir_.path());
  }
  CommandResult uqcow(const std::vector<std::string>& args) { return run_uqcow(args, dir_.path()); }

  // `uqcow serve` or `qemu-nbd -t` holding dir_/name; `ready` is the file
  // whose byte 100 says the server has opened everything.
  std::unique_ptr<Holder> serve(Server server, Mode mode, const std::string& name,
                                const std::vector<std::string>& extra = {}, const std::string& ready = "") {
    std::vector<std::string> argv;
    if (server == Server::kUqcow) {
      argv = {uqcow_binary(), "serve", "--socket", "{socket}"};
    } else {
      argv = {"qemu-nbd", "-t", "-f", "qcow2", "-k", "{socket}"};
    }
    if (mode == Mode::kReadOnly) argv.push_back("-r");
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(dir_.file(name));
    return Holder::start(argv, dir_.file(ready.empty() ? name : ready));
  }

  // `qemu-io ARGS -c 'sleep 1000000' dir_/name`.
  std::unique_ptr<Holder> qemu_io_holder(const std::vector<std::string>& args, const std::string& name) {
    std::vector<std::string> argv = {"qemu-io"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"-c", "sleep 1000000", dir_.file(name)});
    return Holder::start(argv, dir_.file(name));
  }

  TempDir dir_{"uqcow-lock"};
  std::string img_;
};

const std::string kWriteLocked = "Failed to get \"write\" lock\nIs another process using the image [img.qcow2]?";
const std::string kSharedWriteLocked =
    "Failed to get shared \"write\" lock\nIs another process using the image [img.qcow2]?";

// ---- the bytes ------------------------------------------------------------------

TEST_F(LockTest, ByteForByte) {
  struct Case {
    Mode mode;
    std::vector<std::string> extra;
    std::set<int> want;  // QEMU 7.2's bytes, also checked live below
  } cases[] = {
      {Mode::kReadWrite, {}, {100, 101, 103, 201, 203}},
      {Mode::kReadOnly, {}, {100, 201, 203}},
  };
  for (const auto& c : cases) {
    std::set<int> got[2];
    for (Server s : {Server::kUqcow, Server::kQemu}) {
      auto h = serve(s, c.mode, "img.qcow2", c.extra);
      ASSERT_TRUE(h);
      got[s == Server::kQemu] = held_bytes(img_);
    }
    EXPECT_EQ(got[1], c.want) << "qemu-nbd's bytes";
    EXPECT_EQ(got[0], got[1]) << "uqcow serve " << bytes_str(got[0]) << ", qemu-nbd " << bytes_str(got[1]);
  }
  // -r -U: qemu-nbd has no -U, qemu-io has.
  {
    auto h = serve(Server::kUqcow, Mode::kReadOnly, "img.qcow2", {"-U"});
    ASSERT_TRUE(h);
    std::set<int> uqcow_bytes = held_bytes(img_);
    h.reset();
    auto q = qemu_io_holder({"-r", "-U"}, "img.qcow2");
    ASSERT_TRUE(q);
    EXPECT_EQ(held_bytes(img_), (std::set<int>{100}));
    EXPECT_EQ(uqcow_bytes, held_bytes(img_)) << "uqcow serve -r -U " << bytes_str(uqcow_bytes);
  }
  EXPECT_TRUE(held_bytes(img_).empty()) << "every holder is gone: " << bytes_str(held_bytes(img_));
}

TEST_F(LockTest, ByteForByteDataFileAndBackingFile) {
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "ext.qcow2", "16M"})));
  ASSERT_TRUE(Succeeded(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "top.qcow2"})));
  for (Mode mode : {Mode::kReadWrite, Mode::kReadOnly}) {
    std::set<int> image[2], data[2], top[2], base[2];
    for (Server s : {Server::kUqcow, Server::kQemu}) {
      int i = s == Server::kQemu;
      {
        auto h = serve(s, mode, "ext.qcow2", {}, "data.raw");
        ASSERT_TRUE(h);
        image[i] = held_bytes(dir_.file("ext.qcow2"));
        data[i] = held_bytes(dir_.file("data.raw"));
      }
      {
        auto h = serve(s, mode, "top.qcow2", {}, "img.qcow2");
        ASSERT_TRUE(h);
        top[i] = held_bytes(dir_.file("top.qcow2"));
        base[i] = held_bytes(img_);
      }
    }
    const char* m = mode == Mode::kReadWrite ? "read-write" : "read-only";
    const std::set<int> data_want =
        mode == Mode::kReadWrite ? std::set<int>{100, 101, 103, 203} : std::set<int>{100, 203};
    EXPECT_EQ(data[1], data_want) << "QEMU's data file";
    EXPECT_EQ(base[1], (std::set<int>{100, 201, 203})) << "QEMU's backing file: read-only";
    EXPECT_EQ(image[0], image[1]) << m << " image: uqcow " << bytes_str(image[0]) << ", qemu " << bytes_str(image[1]);
    EXPECT_EQ(data[0], data[1]) << m << " data file: uqcow " << bytes_str(data[0]) << ", qemu " << bytes_str(data[1]);
    EXPECT_EQ(top[0], top[1]) << m << " top: uqcow " << bytes_str(top[0]) << ", qemu " << bytes_str(top[1]);
    EXPECT_EQ(base[0], base[1]) << m << " backing: uqcow " << bytes_str(base[0]) << ", qemu " << bytes_str(base[1]);
  }
}

// ---- uqcow holds, QEMU's tools knock ---------------------------------------------

// What a command's run decided: its exit code and its lock message.
struct Decision {
  int exit_code;
  std::string lock;
  bool operator==(const Decision&) const = default;
};
Decision decision(const CommandResult& r) { return {r.exit_code, lock_message(r.err)}; }
std::string describe(const Decision& d) { return "exit " + std::to_string(d.exit_code) + " [" + d.lock + "]"; }

TEST_F(LockTest, QemuToolsSeeUqcowAsQemu) {
  // Commands that change nothing, or are refused under every holder here.
  const std::vector<std::vector<std::string>> commands = {
      {"qemu-img", "info", "img.qcow2"},
      {"qemu-img", "info", "-U", "img.qcow2"},
      {"qemu-img", "check", "img.qcow2"},
      {"qemu-img", "check", "-U", "img.qcow2"},
      {"qemu-img", "map", "img.qcow2"},
      {"qemu-img", "compare", "-U", "img.qcow2", "img.qcow2"},
      {"qemu-io", "-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"},
      {"qemu-io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"},
      {"qemu-io", "-c", "write -P 0x77 0 4k", "img.qcow2"},
      {"qemu-img", "resize", "img.qcow2", "+1M"},
      {"qemu-img", "snapshot", "-c", "snap", "img.qcow2"},
      {"qemu-img", "convert", "-U", "-O", "raw", "img.qcow2", "out.raw"},
      {"qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M"},
  };
  for (Mode mode : {Mode::kReadWrite, Mode::kReadOnly}) {
    for (const auto& cmd : commands) {
      bool writes = cmd[1] == "resize" || cmd[1] == "snapshot" || cmd[1] == "create" || cmd[2] == "-c";
      if (mode == Mode::kReadOnly && writes) continue;  // would succeed and change the image
      Decision got[2];
      for (Server s : {Server::kUqcow, Server::kQemu}) {
        auto h = serve(s, mode, "img.qcow2");
        ASSERT_TRUE(h);
        got[s == Server::kQemu] = decision(run_command(cmd, dir_.path()));
      }
      std::string what;
      for (const auto& a : cmd) what += a + " ";
      EXPECT_EQ(got[0], got[1]) << (mode == Mode::kReadWrite ? "read-write" : "read-only") << " holder, "
                                << what << ": beside uqcow " << describe(got[0]) << ", beside qemu-nbd "
                                << describe(got[1]);
    }
  }
  // The decisions themselves, beside a read-write uqcow serve.
  auto h = serve(Server::kUqcow, Mode::kReadWrite, "img.qcow2");
  ASSERT_TRUE(h);
  auto w = qemu_io({"-c", "write -P 0x77 0 4k", "img.qcow2"});
  EXPECT_EQ(w.exit_code, 1);
  EXPECT_EQ(lock_message(w.err), kWriteLocked) << w.err;
  auto info = qemu_img({"info", "img.qcow2"});
  EXPECT_EQ(info.exit_code, 1);
  EXPECT_EQ(lock_message(info.err), kSharedWriteLocked) << info.err;
  EXPECT_TRUE(Succeeded(qemu_img({"info", "-U", "img.qcow2"})));
  EXPECT_TRUE(Succeeded(qemu_io({"-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
  EXPECT_EQ(h->terminate(), 0);
  EXPECT_TRUE(Succeeded(qemu_io({"-c", "write -P 0x77 0 4k", "img.qcow2"}))) << "uqcow serve has exited";
}

// ---- QEMU holds, uqcow knocks -----------------------------------------------------

// Each uqcow command and its qemu-img/qemu-io twin, run one after the other
// beside the same QEMU holder: the same exit code and the same lock message.
TEST_F(LockTest, UqcowCommandsMatchQemuImg) {
  struct Twin {
    std::vector<std::string> uqcow, qemu;
    bool writes;
  };
  const std::vector<Twin> twins = {
      {{"info", "img.qcow2"}, {"qemu-img", "info", "img.qcow2"}, false},
      {{"info", "-U", "img.qcow2"}, {"qemu-img", "info", "-U", "img.qcow2"}, false},
      {{"check", "img.qcow2"}, {"qemu-img", "check", "img.qcow2"}, false},
      {{"check", "-U", "img.qcow2"}, {"qemu-img", "check", "-U", "img.qcow2"}, false},
      {{"check", "-r", "all", "img.qcow2"}, {"qemu-img", "check", "-r", "all", "img.qcow2"}, true},
      {{"map", "img.qcow2"}, {"qemu-img", "map", "img.qcow2"}, false},
      {{"map", "-U", "img.qcow2"}, {"qemu-img", "map", "-U", "img.qcow2"}, false},
      {{"compare", "img.qcow2", "copy.qcow2"}, {"qemu-img", "compare", "img.qcow2", "copy.qcow2"}, false},
      {{"compare", "-U", "img.qcow2", "copy.qcow2"}, {"qemu-img", "compare", "-U", "img.qcow2", "copy.qcow2"}, false},
      {{"convert", "-O", "raw", "img.qcow2", "u.raw"}, {"qemu-img", "convert", "-O", "raw", "img.qcow2", "q.raw"}, false},
      {{"convert", "-U", "-O", "raw", "img.qcow2", "u.raw"}, {"qemu-img", "convert", "-U", "-O", "raw", "img.qcow2", "q.raw"}, false},
      {{"convert", "-O", "qcow2", "other.qcow2", "img.qcow2"}, {"qemu-img", "convert", "-O", "qcow2", "other.qcow2", "img.qcow2"}, true},
      {{"snapshot", "-l", "img.qcow2"}, {"qemu-img", "snapshot", "-l", "img.qcow2"}, false},
      {{"snapshot", "-c", "s", "img.qcow2"}, {"qemu-img", "snapshot", "-c", "s", "img.qcow2"}, true},
      {{"resize", "img.qcow2", "+1M"}, {"qemu-img", "resize", "img.qcow2", "+1M"}, true},
      {{"io", "-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"}, {"qemu-io", "-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"}, false},
      {{"io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"}, {"qemu-io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"}, false},
      {{"io", "-c", "write -P 0x77 0 4k", "img.qcow2"}, {"qemu-io", "-c", "write -P 0x77 0 4k", "img.qcow2"}, true},
      // -U on a read-write open: refused whatever holds the image.
      {{"io", "-U", "-c", "read 0 4k", "img.qcow2"}, {"qemu-io", "-U", "-c", "read 0 4k", "img.qcow2"}, true},
      {{"create", "-f", "qcow2", "img.qcow2", "1M"}, {"qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M"}, true},
  };
  struct HolderSpec {
    const char* name;
    std::vector<std::string> argv;
    bool read_write;
  };
  const std::vector<HolderSpec> holders = {
      {"qemu-io", {"qemu-io", "-c", "sleep 1000000", img_}, true},
      {"qemu-nbd -t", {"qemu-nbd", "-t", "-f", "qcow2", "-k", "{socket}", img_}, true},
      {"qemu-io -r", {"qemu-io", "-r", "-c", "sleep 1000000", img_}, false},
  };
  for (const auto& hs : holders) {
    auto h = Holder::start(hs.argv, img_);
    ASSERT_TRUE(h) << hs.name;
    for (const auto& t : twins) {
      Decision u = decision(uqcow(t.uqcow));
      Decision q = decision(run_command(t.qemu, dir_.path()));
      std::string what;
      for (const auto& a : t.uqcow) what += a + " ";
      EXPECT_EQ(u, q) << "beside " << hs.name << ": uqcow " << what << describe(u) << "; qemu " << describe(q);
      if (t.writes || hs.read_write) {
        // Under these holders every writer is refused; so is every plain
        // reader beside a read-write holder.
        bool shared = std::find(t.uqcow.begin(), t.uqcow.end(), "-U") != t.uqcow.end() && !t.writes;
        if (!shared) {
          EXPECT_NE(u.exit_code, 0) << "beside " << hs.name << ": uqcow " << what;
        }
      } else {
        EXPECT_EQ(u.exit_code, 0) << "beside " << hs.name << ": uqcow " << what << "(read-only sharing)";
      }
    }
  }
}

// The refusals spelled out, beside `qemu-nbd -t`.
TEST_F(LockTest, UqcowRefusedBesideQemuNbd) {
  auto h = serve(Server::kQemu, Mode::kReadWrite, "img.qcow2");
  ASSERT_TRUE(h);
  auto w = uqcow({"io", "-c", "write -P 0x77 0 4k", "img.qcow2"});
  EXPECT_EQ(w.exit_code, 1);
  EXPECT_EQ(lock_message(w.err), kWriteLocked) << w.err;
  auto r = uqcow({"io", "-r", "-c", "read 0 4k", "img.qcow2"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(lock_message(r.err), kSharedWriteLocked) << r.err;
  auto info = uqcow({"info", "img.qcow2"});
  EXPECT_EQ(info.exit_code, 1);
  EXPECT_EQ(lock_message(info.err), kSharedWriteLocked) << info.err;
  EXPECT_TRUE(Succeeded(uqcow({"info", "-U", "img.qcow2"})));
  EXPECT_TRUE(Succeeded(uqcow({"io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
  auto serve_rw = uqcow({"serve", "--socket", dir_.file("s"), "img.qcow2"});
  EXPECT_EQ(serve_rw.exit_code, 1);
  EXPECT_EQ(lock_message(serve_rw.err), kWriteLocked) << serve_rw.err;
  auto bench = uqcow({"bench", "--rw", "randwrite", "--runtime", "1", "img.qcow2"});
  EXPECT_EQ(bench.exit_code, 1);
  EXPECT_EQ(lock_message(bench.err), kWriteLocked) << bench.err;
  auto force = uqcow({"io", "-U", "-c", "write 0 4k", "img.qcow2"});
  EXPECT_EQ(force.exit_code, 1);
  EXPECT_NE(force.err.find("force-share=on can only be used with read-only images"), std::string::npos) << force.err;
  // Nothing was written: qemu-io sees the original data beside the holder.
  EXPECT_TRUE(Succeeded(qemu_io({"-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
}

TEST_F(LockTest, TwoUqcowProcesses) {
  {
    auto h = serve(Server::kUqcow, Mode::kReadWrite, "img.qcow2");
    ASSERT_TRUE(h);
    auto w = uqcow({"io", "-c", "write 0 4k", "img.qcow2"});
    EXPECT_EQ(w.exit_code, 1);
    EXPECT_EQ(lock_message(w.err), kWriteLocked) << w.err;
    auto r = uqcow({"io", "-r", "-c", "read 0 4k", "img.qcow2"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(lock_message(r.err), kSharedWriteLocked) << r.err;
    EXPECT_TRUE(Succeeded(uqcow({"io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
    EXPECT_TRUE(Succeeded(uqcow({"check", "-U", "img.qcow2"})));
  }
  {
    // Readers share: a read-only server, a read-only io, a bench with
    // several jobs opening the image once each in one process.
    auto h = serve(Server::kUqcow, Mode::kReadOnly, "img.qcow2");
    ASSERT_TRUE(h);
    EXPECT_TRUE(Succeeded(uqcow({"io", "-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
    EXPECT_TRUE(Succeeded(uqcow({"bench", "--rw", "randread", "--jobs", "2", "--runtime", "0.2", "img.qcow2"})));
    auto w = uqcow({"io", "-c", "write 0 4k", "img.qcow2"});
    EXPECT_EQ(w.exit_code, 1);
    EXPECT_EQ(lock_message(w.err), kWriteLocked) << w.err;
  }
  EXPECT_TRUE(Succeeded(uqcow({"io", "-c", "write -P 0x77 0 4k", "img.qcow2"}))) << "both servers are gone";
}

// ---- external data file and backing file ------------------------------------------

TEST_F(LockTest, ExternalDataFile) {
  ASSERT_TRUE(Succeeded(qemu_img({"create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "ext.qcow2", "16M"})));
  const std::string resize_locked =
      "Failed to get \"resize\" lock\nIs another process using the image [data.raw]?";
  for (Server s : {Server::kUqcow, Server::kQemu}) {
    auto h = serve(s, Mode::kReadOnly, "ext.qcow2", {}, "data.raw");
    ASSERT_TRUE(h);
    // The data file may be read and written beside its image, not resized.
    auto r = qemu_img({"resize", "-f", "raw", "data.raw", "+1M"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(lock_message(r.err), resize_locked) << r.err;
    EXPECT_TRUE(Succeeded(qemu_io({"-f", "raw", "-r", "-c", "read 0 4k", "data.raw"})));
  }
  auto h = qemu_io_holder({}, "ext.qcow2");
  ASSERT_TRUE(h);
  auto w = uqcow({"io", "-c", "write 0 4k", "ext.qcow2"});
  EXPECT_EQ(w.exit_code, 1);
  EXPECT_NE(w.err.find("Failed to get \"write\" lock"), std::string::npos) << w.err;
}

TEST_F(LockTest, BackingFileIsReadOnlyShared) {
  ASSERT_TRUE(Succeeded(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "top.qcow2"})));
  {
    // uqcow writes the top: its backing file is held read-only, as QEMU does.
    auto h = serve(Server::kUqcow, Mode::kReadWrite, "top.qcow2", {}, "img.qcow2");
    ASSERT_TRUE(h);
    auto w = qemu_io({"-c", "write 0 4k", "img.qcow2"});
    EXPECT_EQ(w.exit_code, 1);
    EXPECT_EQ(lock_message(w.err), kWriteLocked) << w.err;
    EXPECT_TRUE(Succeeded(qemu_io({"-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
    EXPECT_TRUE(Succeeded(uqcow({"io", "-r", "-c", "read -P 0x5a 0 64k", "img.qcow2"})));
  }
  // Someone writes the backing file: opening the top fails, in either tool,
  // on the backing file's lock.
  auto h = qemu_io_holder({}, "img.qcow2");
  ASSERT_TRUE(h);
  auto u = uqcow({"io", "-r", "-c", "read 0 4k", "top.qcow2"});
  auto q = qemu_io({"-r", "-c", "read 0 4k", "top.qcow2"});
  EXPECT_EQ(u.exit_code, 1);
  EXPECT_EQ(lock_message(q.err), kSharedWriteLocked) << q.err;
  EXPECT_EQ(lock_message(u.err), lock_message(q.err)) << u.err;
  EXPECT_TRUE(Succeeded(uqcow({"io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "top.qcow2"})));
}

// ---- kill -9 ----------------------------------------------------------------------

TEST_F(LockTest, KilledHolderReleasesItsLocks) {
  for (Server s : {Server::kUqcow, Server::kQemu}) {
    auto h = serve(s, Mode::kReadWrite, "img.qcow2");
    ASSERT_TRUE(h);
    EXPECT_EQ(uqcow({"io", "-c", "write 0 4k", "img.qcow2"}).exit_code, 1);
    EXPECT_EQ(qemu_io({"-c", "write 0 4k", "img.qcow2"}).exit_code, 1);
    h.reset();  // SIGKILL
    EXPECT_TRUE(wait_unlocked(img_)) << bytes_str(held_bytes(img_));
    EXPECT_TRUE(Succeeded(uqcow({"io", "-c", "write -P 0x77 0 4k", "img.qcow2"})));
    EXPECT_TRUE(Succeeded(qemu_io({"-c", "read -P 0x77 0 4k", "img.qcow2"})));
  }
}

}  // namespace
}  // namespace uqcow::testing
