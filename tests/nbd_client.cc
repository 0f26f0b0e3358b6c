#include "tests/nbd_client.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "tests/testutil.h"

namespace uqcow::testing {
namespace {

uint64_t get(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

int connect_unix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

// ---- SocketDir ----------------------------------------------------------------

SocketDir::SocketDir() {
  char dir[] = "/tmp/uqcow-nbd.XXXXXX";
  if (mkdtemp(dir) == nullptr) {
    ADD_FAILURE() << "mkdtemp /tmp/uqcow-nbd.XXXXXX: " << std::strerror(errno);
    return;
  }
  dir_ = dir;
  socket_ = dir_ + "/s";
}

SocketDir::~SocketDir() {
  if (dir_.empty()) return;
  unlink(socket_.c_str());
  rmdir(dir_.c_str());
}

// ---- ServeProcess -----------------------------------------------------------------

ServeProcess::ServeProcess(const std::string& image, const std::string& socket,
                           const std::vector<std::string>& extra_args)
    : socket_(socket) {
  std::vector<std::string> args = {uqcow_binary(), "serve", "--socket", socket};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  args.push_back(image);
  start(args);
}

std::unique_ptr<ServeProcess> ServeProcess::command(const std::vector<std::string>& argv,
                                                    const std::string& socket) {
  std::unique_ptr<ServeProcess> process(new ServeProcess(socket));
  process->start(argv);
  return process;
}

void ServeProcess::start(const std::vector<std::string>& args) {
  // argv is built before fork(): the child only calls exec.
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_ = fork();
  if (pid_ == 0) {
    execvp(argv[0], argv.data());
    _exit(127);
  }
}

ServeProcess::~ServeProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

bool ServeProcess::wait_ready() const {
  for (int i = 0; i < 500 && running(); ++i) {
    int fd = connect_unix(socket_);
    if (fd >= 0) {
      close(fd);
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

bool ServeProcess::running() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }

int ServeProcess::terminate(int timeout_ms) {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  for (int waited = 0; waited <= timeout_ms; waited += 10) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;  // the destructor kills it
}

// ---- RawClient: handshake and the blocking requests ------------------------------

RawClient::RawClient(const std::string& path) {
  fd_ = connect_unix(path);
  if (fd_ < 0) {
    fail("connect " + path + ": " + std::strerror(errno));
    return;
  }
  // Server hello: NBDMAGIC, IHAVEOPT, handshake flags.
  uint8_t hello[18];
  if (!recv_all(hello, sizeof hello)) {
    fail("no server hello");
    return;
  }
  uint8_t opt[20] = {0, 0, 0, 3 /* FIXED_NEWSTYLE | NO_ZEROES */};
  const uint8_t ihaveopt[8] = {'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T'};
  std::memcpy(opt + 4, ihaveopt, 8);
  opt[15] = 1;  // NBD_OPT_EXPORT_NAME, empty name
  if (send(fd_, opt, sizeof opt, MSG_NOSIGNAL) != sizeof opt) {
    fail("sending NBD_OPT_EXPORT_NAME failed");
    return;
  }
  // Export size and transmission flags; NO_ZEROES leaves out the padding.
  uint8_t reply[10];
  if (!recv_all(reply, sizeof reply)) {
    fail("no reply to NBD_OPT_EXPORT_NAME");
    return;
  }
  export_size_ = get(reply, 8);
  transmission_flags_ = static_cast<uint16_t>(get(reply + 8, 2));
  connected_ = true;
}

RawClient::~RawClient() {
  if (fd_ >= 0) close(fd_);
}

bool RawClient::fail(const std::string& why) {
  if (error_.empty()) error_ = why;
  connected_ = false;
  return false;
}

void RawClient::put(uint8_t* p, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}

bool RawClient::recv_all(uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = recv(fd_, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool RawClient::send_bytes(const std::vector<uint8_t>& b) {
  return send(fd_, b.data(), b.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(b.size());
}

std::vector<uint8_t> RawClient::request(uint32_t magic, uint16_t type, uint64_t offset, uint32_t length,
                                        uint16_t flags, uint64_t handle) {
  std::vector<uint8_t> r(28);
  put(r.data(), magic, 4);
  put(r.data() + 4, flags, 2);
  put(r.data() + 6, type, 2);
  put(r.data() + 8, handle, 8);
  put(r.data() + 16, offset, 8);
  put(r.data() + 24, length, 4);
  return r;
}

int64_t RawClient::reply_error(size_t data_len) {
  uint8_t r[16];
  if (!recv_all(r, sizeof r)) return -1;
  uint32_t error = static_cast<uint32_t>(get(r + 4, 4));
  std::vector<uint8_t> data(data_len);
  if (error == 0 && !recv_all(data.data(), data.size())) return -1;
  return error;
}

bool RawClient::closed_by_server() {
  uint8_t b;
  return recv(fd_, &b, 1, 0) <= 0;
}

// ---- RawClient: pipelined requests -------------------------------------------------

uint64_t RawClient::submit(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length,
                           std::span<const uint8_t> payload) {
  if (type == nbd_wire::kCmdWrite) length = static_cast<uint32_t>(payload.size());
  uint64_t handle = next_handle_++;
  auto header = request(nbd_wire::kRequestMagic, type, offset, length, flags, handle);
  out_.insert(out_.end(), header.begin(), header.end());
  if (type == nbd_wire::kCmdWrite) out_.insert(out_.end(), payload.begin(), payload.end());
  in_flight_[handle] = type == nbd_wire::kCmdRead ? length : 0;
  return handle;
}

bool RawClient::call(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length, NbdReply& reply,
                     std::span<const uint8_t> payload) {
  uint64_t handle = submit(type, flags, offset, length, payload);
  RawClient* self = this;
  std::vector<NbdCompletion> done;
  std::string error;
  while (done.empty() || done.back().reply.handle != handle) {
    if (!pump(std::span(&self, 1), done, error)) return fail(error);
  }
  reply = std::move(done.back().reply);
  return true;
}

bool RawClient::on_writable() {
  while (out_sent_ < out_.size()) {
    ssize_t n = send(fd_, out_.data() + out_sent_, out_.size() - out_sent_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) return fail(std::string("send: ") + std::strerror(errno));
    out_sent_ += static_cast<size_t>(n);
  }
  if (out_sent_ == out_.size()) {
    out_.clear();
    out_sent_ = 0;
  }
  return true;
}

bool RawClient::on_readable(std::vector<NbdReply>& replies) {
  for (;;) {
    size_t old = in_.size();
    in_.resize(old + 256 * 1024);
    ssize_t n = recv(fd_, in_.data() + old, in_.size() - old, MSG_DONTWAIT);
    in_.resize(old + (n > 0 ? static_cast<size_t>(n) : 0));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) return fail(std::string("recv: ") + std::strerror(errno));
    if (n == 0) {
      parse_replies(replies);
      return fail("the server closed the connection with " + std::to_string(in_flight_.size()) +
                  " requests in flight");
    }
  }
  return parse_replies(replies);
}

bool RawClient::parse_replies(std::vector<NbdReply>& replies) {
  constexpr size_t kHeader = 16;
  while (in_.size() - in_parsed_ >= kHeader) {
    const uint8_t* p = in_.data() + in_parsed_;
    if (get(p, 4) != nbd_wire::kSimpleReplyMagic) {
      return fail("reply with magic " + std::to_string(get(p, 4)) + ", not a simple reply");
    }
    NbdReply reply;
    reply.error = static_cast<uint32_t>(get(p + 4, 4));
    reply.handle = get(p + 8, 8);
    auto it = in_flight_.find(reply.handle);
    if (it == in_flight_.end()) return fail("reply for handle " + std::to_string(reply.handle) + ", not in flight");
    size_t data_len = reply.error == 0 ? it->second : 0;
    if (in_.size() - in_parsed_ < kHeader + data_len) break;
    reply.data.assign(p + kHeader, p + kHeader + data_len);
    in_parsed_ += kHeader + data_len;
    in_flight_.erase(it);
    replies.push_back(std::move(reply));
  }
  in_.erase(in_.begin(), in_.begin() + static_cast<ptrdiff_t>(in_parsed_));
  in_parsed_ = 0;
  return true;
}

// ---- several clients from one poll loop --------------------------------------------

bool pump(std::span<RawClient* const> clients, std::vector<NbdCompletion>& out, std::string& error,
          int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  size_t before = out.size();
  std::vector<pollfd> fds(clients.size());
  std::vector<NbdReply> replies;
  auto failed = [&](size_t i) {
    error = "client " + std::to_string(i) + ": " + clients[i]->error();
    return false;
  };
  while (out.size() == before) {
    size_t waiting = 0;
    for (size_t i = 0; i < clients.size(); ++i) {
      RawClient& c = *clients[i];
      if (!c.connected_) return failed(i);
      waiting += c.in_flight();
      fds[i] = {c.fd_, static_cast<short>(POLLIN | (c.out_.empty() ? 0 : POLLOUT)), 0};
    }
    if (waiting == 0) {
      error = "pump: no request in flight";
      return false;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      error = "no reply for " + std::to_string(timeout_ms) + " ms with " + std::to_string(waiting) +
              " requests in flight";
      return false;
    }
    int n = poll(fds.data(), fds.size(), static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      error = std::string("poll: ") + std::strerror(errno);
      return false;
    }
    for (size_t i = 0; i < clients.size(); ++i) {
      RawClient& c = *clients[i];
      if ((fds[i].revents & POLLOUT) && !c.on_writable()) return failed(i);
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        replies.clear();
        bool ok = c.on_readable(replies);
        for (auto& r : replies) out.push_back({i, std::move(r)});
        if (!ok) return failed(i);
      }
    }
  }
  return true;
}

bool drain(std::span<RawClient* const> clients, std::vector<NbdCompletion>& out, std::string& error,
           int timeout_ms) {
  for (;;) {
    size_t waiting = 0;
    for (RawClient* c : clients) waiting += c->in_flight();
    if (waiting == 0) return true;
    if (!pump(clients, out, error, timeout_ms)) return false;
  }
}

}  // namespace uqcow::testing
