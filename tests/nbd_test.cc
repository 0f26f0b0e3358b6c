// `uqcow serve` against independent NBD clients: nbdinfo (libnbd) for the
// handshake and the allocation map, qemu-img/qemu-io for data, plus a raw
// socket client for the protocol violations no real client sends. The image
// is built and checked by qemu-img, the oracle.
#include <future>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "tests/nbd_client.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

constexpr uint64_t kSize = 64 << 20;

class NbdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"nbdinfo", "qemu-img", "qemu-io"}) {
      if (!require_tool(tool)) return;
    }
    ASSERT_FALSE(uqcow_binary().empty()) << "$UQCOW is not set";
    image_ = dir_.file("a.qcow2");
    ASSERT_TRUE(socket_dir_.ok());
    socket_ = socket_dir_.socket();
    uri_ = socket_dir_.uri();
    ImageBuilder b(dir_.path());
    b.create("a.qcow2", "qcow2", "cluster_size=65536", kSize);
    b.write("a.qcow2", "qcow2", {P(0, 1 << 20, 0x11), Z(4 << 20, 1 << 20), P(10 << 20, 65536, 0x22)});
    ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
    server_ = std::make_unique<ServeProcess>(image_, socket_);
    ASSERT_TRUE(server_->wait_ready()) << "uqcow serve did not create " << socket_;
  }

  void TearDown() override { server_.reset(); }

  // The server still answers a fresh client correctly.
  void expect_serving() {
    auto r = run_command({"qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", uri_});
    EXPECT_TRUE(Succeeded(r));
    EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  }

  TempDir dir_{"nbd"};
  SocketDir socket_dir_;
  std::string image_, socket_, uri_;
  std::unique_ptr<ServeProcess> server_;
};

TEST_F(NbdTest, InfoShowsSizeAndContexts) {
  auto r = run_command({"nbdinfo", "--json", uri_});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_NE(r.out.find("\"export-size\": " + std::to_string(kSize)), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("base:allocation"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"block_size_maximum\": 33554432"), std::string::npos) << r.out;
}

// nbdinfo --map lines are "start length type description"; data extents
// must be exactly qemu-img map's data extents.
TEST_F(NbdTest, MapMatchesQemuImgMap) {
  auto map = run_command({"nbdinfo", "--map", uri_});
  ASSERT_TRUE(Succeeded(map));
  std::vector<std::pair<uint64_t, uint64_t>> nbd_data;
  std::istringstream lines(map.out);
  uint64_t start, length;
  unsigned type;
  std::string desc;
  while (lines >> start >> length >> type >> desc) {
    if (type == 0) nbd_data.emplace_back(start, length);
    else EXPECT_EQ(desc, "hole,zero") << map.out;
  }
  auto qemu = run_command({"qemu-img", "map", "-U", "-f", "qcow2", image_});
  ASSERT_TRUE(Succeeded(qemu));
  std::vector<std::pair<uint64_t, uint64_t>> qemu_data;
  std::istringstream qlines(qemu.out);
  std::string header, off, len, host, file;
  std::getline(qlines, header);
  while (qlines >> off >> len >> host >> file) {
    qemu_data.emplace_back(std::stoull(off, nullptr, 16), std::stoull(len, nullptr, 16));
  }
  EXPECT_EQ(nbd_data, qemu_data) << map.out << "\n" << qemu.out;
}

TEST_F(NbdTest, ConvertEqualsQemuImg) {
  auto r = run_command({"qemu-img", "convert", "-f", "raw", uri_, "-O", "raw", dir_.file("nbd.raw")});
  ASSERT_TRUE(Succeeded(r));
  ASSERT_TRUE(Succeeded(run_command({"qemu-img", "convert", "-U", "-f", "qcow2", image_, "-O", "raw",
                                     dir_.file("ref.raw")})));
  auto got = read_file(dir_.file("nbd.raw"));
  auto want = read_file(dir_.file("ref.raw"));
  ASSERT_TRUE(got && want);
  EXPECT_TRUE(SameBytes(*got, *want));
}

TEST_F(NbdTest, WritesLandInTheImageAndShutdownIsClean) {
  auto w = run_command({"qemu-io", "-f", "raw", "-c", "write -P 0x33 2M 1M", "-c", "write -z 10M 64k",
                        "-c", "discard 0 64k", "-c", "write -P 0x44 -f 20M 4k", "-c", "flush", uri_});
  ASSERT_TRUE(Succeeded(w));
  EXPECT_EQ(server_->terminate(), 0);
  auto check = run_command({"qemu-img", "check", "-f", "qcow2", image_});
  EXPECT_TRUE(Succeeded(check));
  auto r = run_command({"qemu-io", "-f", "qcow2", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0 10M 64k",
                        "-c", "read -P 0 0 64k", "-c", "read -P 0x11 64k 960k", "-c",
                        "read -P 0x44 20M 4k", image_});
  ASSERT_TRUE(Succeeded(r));
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  // Not dirty: qemu-img info reports no "corrupt" or dirty state, and a
  // read-write open needs no repair.
  EXPECT_EQ(check.out.find("leaked"), std::string::npos) << check.out;
}

TEST_F(NbdTest, SeveralClientsAtOnce) {
  std::vector<std::future<CommandResult>> clients;
  for (int i = 0; i < 4; ++i) {
    uint64_t base = uint64_t(16 + 4 * i) << 20;
    std::string off = std::to_string(base), second = std::to_string(base + (2 << 20));
    std::string pattern = std::to_string(0x50 + i);
    clients.push_back(std::async(std::launch::async, [=, this] {
      return run_command({"qemu-io", "-f", "raw", "-c", "aio_write -P " + pattern + " " + off + " 2M", "-c",
                          "aio_write -P " + pattern + " " + second + " 2M", "-c", "aio_flush", "-c",
                          "read -P " + pattern + " " + off + " 4M", uri_});
    }));
  }
  for (auto& c : clients) {
    CommandResult r = c.get();
    EXPECT_TRUE(Succeeded(r));
    EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  }
  EXPECT_EQ(server_->terminate(), 0);
  EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", "-f", "qcow2", image_})));
}

TEST_F(NbdTest, ClientGoneMidRequestDoesNotHurtTheServer) {
  {
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    auto req = RawClient::request(0x25609513, 1 /* WRITE */, 0, 65536);
    req.resize(28 + 1000);  // the header and a fraction of the payload
    ASSERT_TRUE(c.send_bytes(req));
  }
  {
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    auto req = RawClient::request(0x25609513, 0 /* READ */, 0, 4096);
    req.resize(13);  // half a request header
    ASSERT_TRUE(c.send_bytes(req));
  }
  EXPECT_TRUE(server_->running());
  expect_serving();
}

TEST_F(NbdTest, MalformedRequestsGetAnErrorOrAClosedConnection) {
  RawClient other(socket_);  // an innocent client that stays connected
  ASSERT_TRUE(other.connected());
  {
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    ASSERT_TRUE(c.send_bytes(RawClient::request(0x25609513, 0, kSize, 4096)));
    EXPECT_EQ(c.reply_error(), 22) << "read past the end";
    ASSERT_TRUE(c.send_bytes(RawClient::request(0x25609513, 0, 0, 64 << 20)));
    EXPECT_EQ(c.reply_error(), 22) << "read over the maximum length";
    ASSERT_TRUE(c.send_bytes(RawClient::request(0x25609513, 99, 0, 512)));
    EXPECT_EQ(c.reply_error(), 22) << "unknown command";
    ASSERT_TRUE(c.send_bytes(RawClient::request(0x25609513, 0, 0, 512)));
    EXPECT_EQ(c.reply_error(512), 0) << "a valid read on the same connection";
    ASSERT_TRUE(c.send_bytes(RawClient::request(0xdeadbeef, 0, 0, 512)));
    EXPECT_TRUE(c.closed_by_server()) << "bad magic";
  }
  {
    RawClient c(socket_);
    ASSERT_TRUE(c.connected());
    ASSERT_TRUE(c.send_bytes(RawClient::request(0x25609513, 1 /* WRITE */, 0, 64 << 20)));
    EXPECT_TRUE(c.closed_by_server()) << "write payload over the maximum";
  }
  ASSERT_TRUE(other.send_bytes(RawClient::request(0x25609513, 3 /* FLUSH */, 0, 0)));
  EXPECT_EQ(other.reply_error(), 0);
  EXPECT_TRUE(server_->running());
  expect_serving();
}

// BLOCK_STATUS through a backing chain, with every kind of range: data of the
// top image and of a metadata-preallocated backing file (whose unwritten
// clusters are holes in its host file: still data), zeros without a host
// cluster (hole,zero), zeros that keep their host cluster (zero), and the
// range past the end of the shorter backing file (hole,zero). The expected
// map follows from the qemu-io writes that built the chain.
TEST(NbdChainTest, BlockStatusThroughABackingChain) {
  for (const char* tool : {"nbdinfo", "qemu-img", "qemu-io"}) {
    if (!require_tool(tool)) return;
  }
  ASSERT_FALSE(uqcow_binary().empty()) << "$UQCOW is not set";
  TempDir dir("nbd-chain");
  SocketDir socket_dir;
  ASSERT_TRUE(socket_dir.ok());
  constexpr uint64_t K = 1024, M = 1024 * K;
  ImageBuilder b(dir.path());
  b.create("base.qcow2", "qcow2", "cluster_size=65536,preallocation=metadata", 32 * M);
  b.write("base.qcow2", "qcow2", {P(0, 1 * M, 0x11)});
  b.create("top.qcow2", "qcow2", "cluster_size=65536", 64 * M, "base.qcow2", "qcow2");
  b.write("top.qcow2", "qcow2", {Z(512 * K, 512 * K), P(2 * M, 64 * K, 0x22), P(4 * M, 64 * K, 0x33),
                                 Z(4 * M, 64 * K)});
  ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
  ServeProcess server(dir.file("top.qcow2"), socket_dir.socket(), {"-r"});
  ASSERT_TRUE(server.wait_ready()) << "uqcow serve did not create " << socket_dir.socket();

  auto map = run_command({"nbdinfo", "--map", socket_dir.uri()});
  ASSERT_TRUE(Succeeded(map));
  // (start, length, type) with adjacent extents of one type merged.
  std::vector<std::tuple<uint64_t, uint64_t, unsigned>> got;
  std::istringstream lines(map.out);
  uint64_t start, length;
  unsigned type;
  std::string desc;
  while (lines >> start >> length >> type >> desc) {
    if (!got.empty() && std::get<2>(got.back()) == type) {
      std::get<1>(got.back()) += length;
    } else {
      got.emplace_back(start, length, type);
    }
  }
  const std::vector<std::tuple<uint64_t, uint64_t, unsigned>> want = {
      {0, 512 * K, 0},                    // base data
      {512 * K, 512 * K, 3},              // top zeros over the backing file
      {1 * M, 3 * M, 0},                  // base (preallocated) and top data
      {4 * M, 64 * K, 2},                 // top zeros that keep their cluster
      {4 * M + 64 * K, 28 * M - 64 * K, 0},  // base, preallocated
      {32 * M, 32 * M, 3},                // past the end of the backing file
  };
  EXPECT_EQ(got, want) << map.out << "\n" << b.script();
}

}  // namespace
}  // namespace uqcow::testing
