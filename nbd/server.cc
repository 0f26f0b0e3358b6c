#include "nbd/server.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "uring/ops.h"

namespace uqcow::nbd {
namespace {

Result<FileDesc> listen_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return Error(ENAMETOOLONG, "socket path too long: " + path);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // A stale socket from an earlier run is replaced; any other file is not.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  FileDesc fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error(errno, "socket");
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || ::listen(fd.get(), 128) < 0) {
    return errno_error(errno, "bind " + path);
  }
  return fd;
}

Result<FileDesc> listen_tcp(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* list = nullptr;
  std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &list);
  if (rc != 0) return Error(EINVAL, "resolve " + host + ": " + gai_strerror(rc));
  int err = EADDRNOTAVAIL;
  for (addrinfo* ai = list; ai; ai = ai->ai_next) {
    FileDesc fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) continue;
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd.get(), 128) == 0) {
      ::freeaddrinfo(list);
      return fd;
    }
    err = errno;
  }
  ::freeaddrinfo(list);
  return errno_error(err, "bind " + host + ":" + service);
}

}  // namespace

Server::~Server() {
  if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
}

Status Server::listen(const ListenAddress& address) {
  UQ_ASSIGN_OR_RETURN(listen_fd_, address.unix_path.empty() ? listen_tcp(address.host, address.port)
                                                            : listen_unix(address.unix_path));
  unix_path_ = address.unix_path;
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) < 0) return errno_error(errno, "sigprocmask");
  signal_fd_.reset(::signalfd(-1, &mask, SFD_CLOEXEC));
  if (!signal_fd_.valid()) return errno_error(errno, "signalfd");
  return ok_status();
}

// Shutting the listening socket down fails the pending accept; shutting the
// clients' receive side down ends their reader loops at the next request
// boundary while replies can still go out.
void Server::stop() {
  stopping_ = true;
  ::shutdown(listen_fd_.get(), SHUT_RDWR);
  for (int fd : client_fds_) ::shutdown(fd, SHUT_RD);
}

Task<void> Server::wait_for_signal() {
  signalfd_siginfo info{};
  int r = co_await uring::read(signal_fd_.get(), &info, sizeof info, static_cast<uint64_t>(-1));
  if (r == 0) std::fprintf(stderr, "uqcow serve: signal %u, shutting down\n", info.ssi_signo);
  stop();
}

Task<void> Server::session(FileDesc socket) {
  const int fd = socket.get();
  client_fds_.insert(fd);
  auto negotiated = co_await negotiate(fd, export_);
  if (negotiated.ok() && !stopping_) co_await serve_transmission(fd, export_, *negotiated);
  client_fds_.erase(fd);
}

Task<void> Server::accept_loop() {
  while (!stopping_) {
    int accepted = co_await uring::accept(listen_fd_.get());
    if (accepted < 0) {
      if (stopping_) break;
      // EMFILE and friends: keep serving the clients we have.
      std::fprintf(stderr, "uqcow serve: accept: %s\n", std::strerror(-accepted));
      co_await uring::sleep_for_ns(100'000'000);
      continue;
    }
    FileDesc fd(accepted);
    if (stopping_) break;
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // fails harmlessly on unix sockets
    sessions_.spawn(session(std::move(fd)));
  }
}

Task<Status> Server::run() {
  TaskGroup loops;
  loops.spawn(wait_for_signal());
  loops.spawn(accept_loop());
  co_await loops.join();
  co_await sessions_.join();
  co_return ok_status();
}

}  // namespace uqcow::nbd
