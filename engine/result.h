// Error values for the I/O path: -errno plus a human-readable message.
//
// Nothing on the I/O path throws. A function that can fail returns Status
// (no value) or Result<T>. Success never allocates: the message string is
// only built on the error path.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <variant>

namespace uqcow {

class Error {
 public:
  // `code` is a positive errno value (EIO, ENOSPC, ...).
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}

  int code() const { return code_; }
  // The negative errno, QEMU style.
  int neg() const { return -code_; }
  const std::string& message() const { return message_; }

  // Prefixes the message with context, keeping the code ("open a.qcow2: ...").
  Error&& with_context(const std::string& context) && {
    message_ = context + ": " + message_;
    return std::move(*this);
  }

 private:
  int code_;
  std::string message_;
};

// Builds an Error from a negative or positive errno with strerror appended.
inline Error errno_error(int err, const std::string& what) {
  if (err < 0) err = -err;
  return Error(err, what + ": " + std::strerror(err));
}

// Declared before their definitions: attributes go on the definitions only
// (GCC warns when an explicit specialization's declaration repeats them).
template <class T>
class Result;

template <>
class Result<void>;

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}
  // From a failed Status (propagating an error across result types). Must
  // not be called with a successful Status.
  Result(const Result<void>& failed);

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const T& value() const& { return std::get<0>(v_); }
  T& operator*() & { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : code_(error.code()), message_(std::move(error).message()) {}

  bool ok() const { return code_ == 0; }
  explicit operator bool() const { return ok(); }
  Error error() const { return Error(code_, message_); }
  int code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  int code_ = 0;
  std::string message_;
};

using Status = Result<void>;

template <class T>
Result<T>::Result(const Result<void>& failed) : v_(failed.error()) {}

inline Status ok_status() { return Status(); }

}  // namespace uqcow

// Propagates an error from a Status/Result expression inside a function that
// returns Status or Result<U>. UQ_CO_TRY is the coroutine form.
#define UQ_TRY(expr)                                       \
  do {                                                     \
    auto uq_try_status_ = (expr);                          \
    if (!uq_try_status_.ok()) return std::move(uq_try_status_).error(); \
  } while (0)

#define UQ_CO_TRY(expr)                                    \
  do {                                                     \
    auto uq_try_status_ = (expr);                          \
    if (!uq_try_status_.ok()) co_return std::move(uq_try_status_).error(); \
  } while (0)

// Abseil's ASSIGN_OR_RETURN for Result<T>: evaluates `expr` (a Result<T>),
// returns its error from the enclosing function (Status or Result<U>) if it
// failed, else declares/assigns `lhs` from its value. UQ_CO_ASSIGN_OR_RETURN
// is the coroutine form; `expr` may contain co_await:
//   UQ_CO_ASSIGN_OR_RETURN(uint64_t host, co_await alloc_clusters(n));
#define UQ_RESULT_CONCAT_INNER_(a, b) a##b
#define UQ_RESULT_CONCAT_(a, b) UQ_RESULT_CONCAT_INNER_(a, b)
#define UQ_ASSIGN_OR_RETURN_IMPL_(ret, tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) ret std::move(tmp).error();           \
  lhs = std::move(tmp).value()
#define UQ_ASSIGN_OR_RETURN(lhs, expr) \
  UQ_ASSIGN_OR_RETURN_IMPL_(return, UQ_RESULT_CONCAT_(uq_result_, __LINE__), lhs, expr)
#define UQ_CO_ASSIGN_OR_RETURN(lhs, expr) \
  UQ_ASSIGN_OR_RETURN_IMPL_(co_return, UQ_RESULT_CONCAT_(uq_result_, __LINE__), lhs, expr)
