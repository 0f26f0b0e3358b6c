// Requests that overlap in time, sent to the real `uqcow serve` (issue 12):
//  - OverlapReproTest: the reproduction. A zeroed cluster A gets a
//    write into its middle, a trim and a write of a new cluster B, all in
//    flight together; A must not end up sharing B's host cluster.
//  - NbdRaceTest: several connections keep many random reads, writes, trims,
//    zero writes and flushes in flight over a few clusters, checked byte by
//    byte by the oracle of tests/race_oracle.h.
//  - NbdRaceOracleTest: the same race client against qemu-nbd exporting a raw
//    file, an independent server: the oracle must accept everything it does.
//  - FioOverlapTest: fio's nbd engine, a randwrite and a randtrim job over the
//    same range.
// qemu-img creates every image, and after a clean shutdown (SIGTERM, exit 0)
// `qemu-img check` must find it clean and `qemu-img convert` gives the
// content that is checked again.
//
// NbdRaceTest is seeded (the seed is printed with every failure); the seed
// fixes the requests each connection sends, the server's timing decides how
// they interleave. Environment, for longer runs by hand:
//   UQCOW_RACE_SEED    seed (default 20261201)
//   UQCOW_RACE_ROUNDS  batches per layout (default 24)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "tests/nbd_client.h"
#include "tests/race_oracle.h"
#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

using namespace nbd_wire;

struct Layout {
  const char* name;
  const char* options;  // qemu-img create -o
  uint64_t cluster_size;
};

const Layout kC64k = {"c64k", "cluster_size=65536", 65536};
const Layout kC64kExtL2 = {"c64k_extl2", "cluster_size=65536,extended_l2=on", 65536};
const Layout kC4k = {"c4k", "cluster_size=4096", 4096};
const Layout kC512 = {"c512", "cluster_size=512", 512};
const Layout kC64kV2 = {"c64k_v2", "cluster_size=65536,compat=0.10", 65536};

std::string layout_name(const ::testing::TestParamInfo<Layout>& info) { return info.param.name; }
void PrintTo(const Layout& layout, std::ostream* os) { *os << layout.name << " (" << layout.options << ")"; }

uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 0) : fallback;
}

// One image made by `qemu-img create`, served by `uqcow serve` for one test.
class ServedImageTest : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    if (!require_tool("qemu-img")) return;
    ASSERT_FALSE(uqcow_binary().empty()) << "$UQCOW is not set";
    ASSERT_TRUE(socket_dir_.ok());
    image_ = dir_.file("a.qcow2");
  }

  // Creates the image and starts the server (fatal failures on error).
  void serve(uint64_t size) {
    ImageBuilder b(dir_.path());
    b.create("a.qcow2", "qcow2", GetParam().options, size);
    ASSERT_TRUE(b.ok()) << b.error() << "\n" << b.script();
    server_ = std::make_unique<ServeProcess>(image_, socket_dir_.socket());
    ASSERT_TRUE(server_->wait_ready()) << "uqcow serve did not create " << socket_dir_.socket();
  }

  // The clean shutdown: on SIGTERM the server answers what is in flight,
  // flushes and closes the image, and exits 0. Then `qemu-img check` must
  // exit 0 (clean: no corruption, no leak).
  void stop_and_check() {
    EXPECT_EQ(server_->terminate(), 0) << "uqcow serve's exit status after SIGTERM";
    EXPECT_TRUE(Succeeded(run_command({"qemu-img", "check", "-f", "qcow2", image_})));
  }

  // The guest content by `qemu-img convert -O raw`.
  std::optional<std::vector<uint8_t>> guest_content() {
    auto r = run_command({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", image_, dir_.file("a.raw")});
    EXPECT_TRUE(Succeeded(r));
    return r.ok() ? read_file(dir_.file("a.raw")) : std::nullopt;
  }

  TempDir dir_{"nbd_race"};
  SocketDir socket_dir_;
  std::string image_;
  std::unique_ptr<ServeProcess> server_;
};

// ---- the reproduction -------------------------------------------------------

constexpr uint64_t kReproRounds = 16;

// Round r of the reproduction: clusters A = 2r and B = 2r + 1.
struct ReproRound {
  ReproRound(uint64_t r, uint64_t c)
      : cluster(c), a(2 * r * c), b((2 * r + 1) * c), id_a(10 * r + 1), id_mid(10 * r + 2), id_b(10 * r + 3),
        id_head(10 * r + 4) {}

  uint64_t head_length() const { return cluster / 32; }
  // The write into A's middle: 30/32 of the cluster, after A's head.
  uint64_t mid_offset() const { return a + cluster / 32; }
  uint64_t mid_length() const { return cluster * 30 / 32; }

  // Whether A may hold `v` at guest offset `g`: A was zeroed, then the mid
  // write and a trim (which leaves the previous data or zero) raced, then
  // (if head_written) its head was written.
  bool a_allows(uint64_t g, uint8_t v, bool head_written) const {
    if (head_written && g < a + head_length()) return v == race_byte(id_head, g);
    if (g >= mid_offset() && g < mid_offset() + mid_length()) return v == 0 || v == race_byte(id_mid, g);
    return v == 0;
  }

  // A's bytes against a_allows(); on failure, how many bytes are wrong and
  // whether they are B's data or A's data from before the zero write (the
  // zeroing lost). A random byte equals either by chance 1 time in 255, so
  // only a majority names the source.
  ::testing::AssertionResult check_a(std::span<const uint8_t> got, bool head_written) const {
    size_t bad = 0, b_data = 0, old_a_data = 0;
    uint64_t first = 0;
    for (uint64_t i = 0; i < cluster; ++i) {
      if (a_allows(a + i, got[i], head_written)) continue;
      if (bad++ == 0) first = i;
      b_data += got[i] == race_byte(id_b, b + i);
      old_a_data += got[i] == race_byte(id_a, a + i);
    }
    if (bad == 0) return ::testing::AssertionSuccess();
    char first_byte[64];
    std::snprintf(first_byte, sizeof first_byte, "first at A+%llu = 0x%02x", static_cast<unsigned long long>(first),
                  got[first]);
    std::string source = b_data * 2 > bad        ? "cluster B's data"
                         : old_a_data * 2 > bad ? "A's data from before the zero write"
                                                : "neither B's data nor A's earlier data";
    return ::testing::AssertionFailure()
           << "cluster A (guest offset " << a << "): " << bad << " of " << cluster
           << " bytes are neither the mid write's data nor zero" << (head_written ? " nor the head write's" : "")
           << "; " << first_byte << "; they are " << source << " (" << b_data << " bytes match B's data, "
           << old_a_data << " A's earlier data)";
  }

  ::testing::AssertionResult check_b(std::span<const uint8_t> got) const {
    return SameBytes(got, race_data(id_b, b, cluster), b);
  }

  uint64_t cluster, a, b;
  uint64_t id_a, id_mid, id_b, id_head;
};

class OverlapReproTest : public ServedImageTest {
 protected:
  // One request at a time; its reply must be a success.
  void call_ok(RawClient& client, uint16_t type, uint16_t flags, uint64_t offset, uint64_t length,
               const char* what, std::vector<uint8_t>* read = nullptr, std::span<const uint8_t> payload = {}) {
    NbdReply reply;
    ASSERT_TRUE(client.call(type, flags, offset, static_cast<uint32_t>(length), reply, payload)) << client.error();
    EXPECT_EQ(reply.error, 0u) << what << " failed";
    if (read != nullptr) *read = std::move(reply.data);
  }

  void run_round(RawClient& client, const ReproRound& r) {
    const uint64_t c = r.cluster;
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdWrite, 0, r.a, c, "WRITE A", nullptr, race_data(r.id_a, r.a, c)));
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdWriteZeroes, kCmdFlagNoHole, r.a, c, "WRITE_ZEROES A (NO_HOLE)"));

    // The three requests go out together, none waiting for another's reply.
    auto mid = race_data(r.id_mid, r.mid_offset(), r.mid_length());
    auto data_b = race_data(r.id_b, r.b, c);
    std::unordered_map<uint64_t, std::string> names;
    names[client.submit(kCmdWrite, 0, r.mid_offset(), 0, mid)] = "WRITE into A's middle";
    names[client.submit(kCmdTrim, 0, r.a, static_cast<uint32_t>(c))] = "TRIM A";
    names[client.submit(kCmdWrite, 0, r.b, 0, data_b)] = "WRITE B";
    std::vector<NbdCompletion> done;
    std::string error;
    RawClient* clients[] = {&client};
    ASSERT_TRUE(drain(clients, done, error)) << error;
    for (const auto& d : done) EXPECT_EQ(d.reply.error, 0u) << names[d.reply.handle] << " failed";

    std::vector<uint8_t> got;
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdRead, 0, r.b, c, "READ B", &got));
    EXPECT_TRUE(r.check_b(got)) << "B after the three requests";
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdRead, 0, r.a, c, "READ A", &got));
    EXPECT_TRUE(r.check_a(got, false)) << "A after the three requests";

    // A later write to A must not reach B.
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdWrite, 0, r.a, r.head_length(), "WRITE A's head", nullptr,
                                    race_data(r.id_head, r.a, r.head_length())));
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdRead, 0, r.b, c, "READ B", &got));
    EXPECT_TRUE(r.check_b(got)) << "B after a write to A's head";
    ASSERT_NO_FATAL_FAILURE(call_ok(client, kCmdRead, 0, r.a, c, "READ A", &got));
    EXPECT_TRUE(r.check_a(got, true)) << "A after the write to its head";
  }
};

TEST_P(OverlapReproTest, MidWriteTrimAndNewClusterWriteInFlightTogether) {
  const uint64_t c = GetParam().cluster_size;
  ASSERT_NO_FATAL_FAILURE(serve(std::max<uint64_t>(2 * kReproRounds * c, 4 << 20)));
  {
    RawClient client(socket_dir_.socket());
    ASSERT_TRUE(client.connected()) << client.error();
    for (uint64_t r = 0; r < kReproRounds; ++r) {
      SCOPED_TRACE("round " + std::to_string(r));
      ASSERT_NO_FATAL_FAILURE(run_round(client, ReproRound(r, c)));
    }
  }
  stop_and_check();
  auto raw = guest_content();
  ASSERT_TRUE(raw.has_value());
  for (uint64_t r = 0; r < kReproRounds; ++r) {
    ReproRound round(r, c);
    ASSERT_GE(raw->size(), round.b + c);
    EXPECT_TRUE(round.check_a(std::span(*raw).subspan(round.a, c), true)) << "round " << r << ", qemu-img convert";
    EXPECT_TRUE(round.check_b(std::span(*raw).subspan(round.b, c))) << "round " << r << ", qemu-img convert";
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, OverlapReproTest, ::testing::Values(kC64k, kC64kExtL2, kC4k), layout_name);

// ---- several connections, many requests in flight -----------------------------------

constexpr size_t kConnections = 4;
constexpr size_t kDepth = 16;               // requests in flight per connection
constexpr size_t kOpsPerConnection = 48;    // per batch
constexpr uint64_t kRaceImageSize = 16 << 20;

// The random requests of one connection. Each connection has its own
// generator, so what it sends depends on the seed alone, whatever order the
// replies come back in. Only the raw output of mt19937_64 (fixed by the
// standard) is used, so a seed means the same requests everywhere.
class RequestGenerator {
 public:
  RequestGenerator(uint64_t seed, size_t connection, uint64_t range, uint64_t cluster)
      : rng_(seed * 0x9e3779b97f4a7c15ull + connection), id_base_((connection + 1) << 32), range_(range),
        cluster_(cluster) {}

  RaceOp next() {
    RaceOp op;
    op.id = id_base_ + ++count_;
    // Weights in percent.
    static constexpr std::pair<RaceKind, uint64_t> kMix[] = {
        {RaceKind::kRead, 24},
        {RaceKind::kWrite, 36},
        {RaceKind::kTrim, 12},
        {RaceKind::kWriteZeroes, 10},
        {RaceKind::kWriteZeroesNoHole, 10},
        {RaceKind::kFlush, 8},
    };
    uint64_t pick = rng_() % 100;
    for (const auto& [kind, weight] : kMix) {
      op.kind = kind;
      if (pick < weight) break;
      pick -= weight;
    }
    if (op.kind == RaceKind::kFlush) return op;
    place(op);
    return op;
  }

 private:
  // Any offset and length, sector or subcluster aligned, or whole clusters;
  // at most half the range.
  void place(RaceOp& op) {
    const uint64_t max_length = range_ / 2;
    switch (rng_() % 3) {
      case 0:
        op.offset = rng_() % range_;
        op.length = 1 + rng_() % max_length;
        break;
      case 1: {
        uint64_t align = 512u << (rng_() % 4);
        op.offset = rng_() % (range_ / align) * align;
        op.length = align * (1 + rng_() % std::max<uint64_t>(1, max_length / align));
        break;
      }
      default:
        op.offset = rng_() % (range_ / cluster_) * cluster_;
        op.length = cluster_ * (1 + rng_() % std::max<uint64_t>(1, max_length / cluster_));
        break;
    }
    op.length = std::min(op.length, range_ - op.offset);
  }

  std::mt19937_64 rng_;
  uint64_t id_base_;
  uint64_t count_ = 0;
  uint64_t range_;
  uint64_t cluster_;
};

// The connections, their generators and the one logical clock: a single
// thread drives every connection, so a tick is taken when a request is
// queued (before the server can see it) and when its reply has arrived
// (after the server finished it), which only widens the windows the oracle
// accepts.
class RaceDriver {
 public:
  RaceDriver(const std::string& socket, uint64_t seed, uint64_t range, uint64_t cluster) : range_(range) {
    for (size_t c = 0; c < kConnections; ++c) {
      clients_.push_back(std::make_unique<RawClient>(socket));
      raw_.push_back(clients_.back().get());
      generators_.emplace_back(seed, c, range, cluster);
    }
  }

  // Empty, or why a connection failed.
  std::string connection_error() const {
    for (const auto& c : clients_) {
      if (!c->connected()) return c->error();
    }
    return "";
  }

  // One batch: every connection sends kOpsPerConnection requests, keeping up
  // to kDepth in flight and sending the next as soon as a reply is in.
  // Returns when every reply has arrived; false (error set) if a connection
  // failed.
  bool run_batch(std::vector<RaceOp>& ops, std::string& error) {
    ops.clear();
    std::vector<std::unordered_map<uint64_t, size_t>> by_handle(clients_.size());
    std::vector<size_t> left(clients_.size(), kOpsPerConnection);
    auto top_up = [&](size_t c) {
      while (left[c] > 0 && clients_[c]->in_flight() < kDepth) {
        RaceOp op = generators_[c].next();
        op.issued = ++clock_;
        by_handle[c][submit(*clients_[c], op)] = ops.size();
        ops.push_back(std::move(op));
        --left[c];
      }
    };
    for (size_t c = 0; c < clients_.size(); ++c) top_up(c);
    std::vector<NbdCompletion> done;
    while (in_flight() > 0) {
      done.clear();
      if (!pump(raw_, done, error)) return false;
      // Every reply of this pump gets its completion time before any new
      // request goes out: those were sent after all of them arrived.
      for (auto& d : done) {
        RaceOp& op = ops[by_handle[d.client].at(d.reply.handle)];
        op.completed = ++clock_;
        op.error = d.reply.error;
        op.data = std::move(d.reply.data);
      }
      for (size_t c = 0; c < clients_.size(); ++c) top_up(c);
    }
    return true;
  }

  // Reads the whole range after a batch (its times follow every reply).
  bool read_back(RaceOp& read, std::string& error) {
    read = RaceOp();
    read.kind = RaceKind::kRead;
    read.length = range_;
    read.issued = ++clock_;
    NbdReply reply;
    if (!clients_[0]->call(kCmdRead, 0, 0, static_cast<uint32_t>(range_), reply)) {
      error = clients_[0]->error();
      return false;
    }
    read.completed = ++clock_;
    read.error = reply.error;
    read.data = std::move(reply.data);
    return true;
  }

 private:
  size_t in_flight() const {
    size_t n = 0;
    for (const auto& c : clients_) n += c->in_flight();
    return n;
  }

  static uint64_t submit(RawClient& client, const RaceOp& op) {
    auto length = static_cast<uint32_t>(op.length);
    switch (op.kind) {
      case RaceKind::kRead: return client.submit(kCmdRead, 0, op.offset, length);
      case RaceKind::kWrite: return client.submit(kCmdWrite, 0, op.offset, 0, race_data(op.id, op.offset, op.length));
      case RaceKind::kTrim: return client.submit(kCmdTrim, 0, op.offset, length);
      case RaceKind::kWriteZeroes: return client.submit(kCmdWriteZeroes, 0, op.offset, length);
      case RaceKind::kWriteZeroesNoHole: return client.submit(kCmdWriteZeroes, kCmdFlagNoHole, op.offset, length);
      case RaceKind::kFlush: return client.submit(kCmdFlush, 0, 0, 0);
    }
    return 0;
  }

  uint64_t range_;
  uint64_t clock_ = 0;
  std::vector<std::unique_ptr<RawClient>> clients_;
  std::vector<RawClient*> raw_;
  std::vector<RequestGenerator> generators_;
};

// Counts the failed replies, the reads the oracle refuses and a wrong
// read-back of the range after the batch; reports the first `report`.
size_t check_batch(const RaceOracle& oracle, const std::vector<RaceOp>& ops, const RaceOp& after, size_t report) {
  size_t problems = 0;
  auto found = [&](const std::string& what) {
    if (problems++ < report) ADD_FAILURE() << what;
  };
  for (const RaceOp& op : ops) {
    if (op.error != 0) {
      found(op.describe() + " failed");
    } else if (op.kind == RaceKind::kRead) {
      auto ok = oracle.check(ops, op.offset, op.data, op.issued, op.completed, problems < report);
      if (!ok) found(op.describe() + ": " + ok.message());
    }
  }
  auto ok = oracle.check(ops, after.offset, after.data, after.issued, after.completed, problems < report);
  if (!ok) found("the range read after the batch: " + std::string(ok.message()));
  return problems;
}

struct RaceSettings {
  uint64_t seed = env_or("UQCOW_RACE_SEED", 20261201);
  uint64_t batches = env_or("UQCOW_RACE_ROUNDS", 24);

  std::string trace() const {
    return "seed " + std::to_string(seed) + " (UQCOW_RACE_SEED=" + std::to_string(seed) +
           " sends the same requests again)";
  }
};

// Runs the race over [0, range) of the export on `socket`: `settings.batches`
// batches, each checked by the oracle, which ends up holding the range as
// read after the last one. Every batch is judged from the range as read
// after the previous one, so one wrong batch does not condemn the next:
// `failed_batches` counts those with a problem; the first three are
// detailed.
void run_race(const std::string& socket, const RaceSettings& settings, uint64_t range, uint64_t cluster,
              RaceOracle& oracle, uint64_t& failed_batches) {
  RaceDriver driver(socket, settings.seed, range, cluster);
  ASSERT_EQ(driver.connection_error(), "");
  std::vector<RaceOp> ops;
  std::string error;
  for (uint64_t b = 0; b < settings.batches; ++b) {
    SCOPED_TRACE("batch " + std::to_string(b));
    ASSERT_TRUE(driver.run_batch(ops, error)) << error;
    RaceOp read;
    ASSERT_TRUE(driver.read_back(read, error)) << error;
    ASSERT_EQ(read.error, 0u) << read.describe() << " after the batch failed";
    failed_batches += check_batch(oracle, ops, read, failed_batches < 3 ? 5 : 0) > 0;
    oracle.reset(std::move(read.data));
  }
}

// 4 connections x 16 requests in flight over 4 clusters, or 64 KiB for small
// clusters (128 clusters of 512 B span two L2 tables).
class NbdRaceTest : public ServedImageTest {};

TEST_P(NbdRaceTest, OverlappingRequestsFromSeveralConnections) {
  const RaceSettings settings;
  SCOPED_TRACE(settings.trace());
  const uint64_t cluster = GetParam().cluster_size;
  const uint64_t range = std::max<uint64_t>(4 * cluster, 64 << 10);
  ASSERT_NO_FATAL_FAILURE(serve(kRaceImageSize));
  RaceOracle oracle(0, std::vector<uint8_t>(range, 0));
  uint64_t failed_batches = 0;
  ASSERT_NO_FATAL_FAILURE(run_race(socket_dir_.socket(), settings, range, cluster, oracle, failed_batches));
  EXPECT_EQ(failed_batches, 0u) << "batches with a failed request or a read the oracle refuses, of "
                                << settings.batches;
  stop_and_check();
  auto raw = guest_content();
  ASSERT_TRUE(raw.has_value());
  std::vector<uint8_t> want(kRaceImageSize, 0);
  std::copy(oracle.start().begin(), oracle.start().end(), want.begin());
  EXPECT_TRUE(SameBytes(*raw, want)) << "qemu-img convert against what the client read last";
}

INSTANTIATE_TEST_SUITE_P(Layouts, NbdRaceTest, ::testing::Values(kC64k, kC64kExtL2, kC4k, kC512, kC64kV2),
                         layout_name);

// The race client and its oracle against an independent server: qemu-nbd
// exporting a raw file (trims punch holes, zero writes may too). Its every
// batch must pass, or the oracle refuses what a correct server may do.
TEST(NbdRaceOracleTest, AcceptsQemuNbdOnARawFile) {
  UQ_REQUIRE_TOOL("qemu-nbd");
  const RaceSettings settings;
  SCOPED_TRACE(settings.trace());
  TempDir dir("nbd_race_oracle");
  SocketDir socket_dir;
  ASSERT_TRUE(socket_dir.ok());
  const uint64_t range = 256 << 10;
  const std::string file = dir.file("a.raw");
  ASSERT_TRUE(write_file(file, std::vector<uint8_t>(kRaceImageSize, 0)));
  auto server = ServeProcess::command({"qemu-nbd", "-f", "raw", "--discard=unmap", "--shared=" +
                                       std::to_string(kConnections + 1), "--persistent", "--socket",
                                       socket_dir.socket(), file},
                                      socket_dir.socket());
  ASSERT_TRUE(server->wait_ready()) << "qemu-nbd did not create " << socket_dir.socket();
  RaceOracle oracle(0, std::vector<uint8_t>(range, 0));
  uint64_t failed_batches = 0;
  ASSERT_NO_FATAL_FAILURE(run_race(socket_dir.socket(), settings, range, 65536, oracle, failed_batches));
  EXPECT_EQ(failed_batches, 0u) << "batches the oracle refuses, of " << settings.batches;
  EXPECT_EQ(server->terminate(), 0) << "qemu-nbd's exit status after SIGTERM";
  auto raw = read_file(file);
  ASSERT_TRUE(raw.has_value());
  std::vector<uint8_t> want(kRaceImageSize, 0);
  std::copy(oracle.start().begin(), oracle.start().end(), want.begin());
  EXPECT_TRUE(SameBytes(*raw, want)) << "the raw file against what the client read last";
}

// ---- fio: randwrite and randtrim over one range -----------------------------------

bool fio_has_nbd_engine() {
  auto r = run_command({"fio", "--enghelp"});
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    line.erase(0, line.find_first_not_of(" \t"));
    if (line == "nbd") return true;
  }
  return false;
}

class FioOverlapTest : public ServedImageTest {};

TEST_P(FioOverlapTest, RandwriteAndRandtrimJobsOverOneRange) {
  UQ_REQUIRE_TOOL("fio");
  if (!fio_has_nbd_engine()) GTEST_SKIP() << "fio has no nbd engine";
  ASSERT_NO_FATAL_FAILURE(serve(64 << 20));
  // Both jobs cover the same 4 MiB (64 clusters of 64 KiB); write sizes
  // include 4k, sizes that are not multiples of the cluster and 512-byte
  // alignment, so partly written clusters (and subclusters) are common.
  auto fio = run_command({"fio", "--ioengine=nbd", "--uri=" + socket_dir_.uri(), "--offset=0", "--size=4M",
                          "--time_based", "--runtime=4", "--iodepth=16", "--output-format=terse", "--blockalign=512",
                          "--name=write", "--rw=randwrite", "--bssplit=4k/30:6k/10:60k/20:64k/10:68k/10:132k/20",
                          "--name=trim", "--rw=randtrim", "--bssplit=4k/30:12k/20:64k/25:136k/25"});
  EXPECT_TRUE(Succeeded(fio));
  stop_and_check();
}

INSTANTIATE_TEST_SUITE_P(Layouts, FioOverlapTest, ::testing::Values(kC64kExtL2, kC64k), layout_name);

}  // namespace
}  // namespace uqcow::testing
