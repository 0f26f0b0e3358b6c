#include "nbd/socket.h"

#include <cerrno>

#include "uring/ops.h"

namespace uqcow::nbd {

Task<Status> recv_exact(int fd, void* buf, size_t len) {
  auto* p = static_cast<std::byte*>(buf);
  size_t done = 0;
  while (done < len) {
    int n = co_await uring::recv(fd, p + done, len - done);
    if (n < 0) co_return errno_error(n, "recv");
    if (n == 0) co_return Error(ECONNRESET, "recv: peer closed the connection");
    done += static_cast<size_t>(n);
  }
  co_return ok_status();
}

Task<Status> send_all(int fd, const void* buf, size_t len) {
  const auto* p = static_cast<const std::byte*>(buf);
  size_t done = 0;
  while (done < len) {
    int n = co_await uring::send(fd, p + done, len - done);
    if (n < 0) co_return errno_error(n, "send");
    done += static_cast<size_t>(n);
  }
  co_return ok_status();
}

}  // namespace uqcow::nbd
