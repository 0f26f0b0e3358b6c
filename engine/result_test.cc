#include "engine/result.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "engine/sync_wait.h"
#include "engine/task.h"

namespace uqcow {
namespace {

Result<int> parse_digit(char c) {
  if (c < '0' || c > '9') return Error(EINVAL, std::string("not a digit: ") + c);
  return c - '0';
}

Result<int> sum_of(const std::string& s) {
  int sum = 0;
  for (char c : s) {
    UQ_ASSIGN_OR_RETURN(int d, parse_digit(c));
    sum += d;
  }
  return sum;
}

Status check_sum(const std::string& s, int want) {
  UQ_ASSIGN_OR_RETURN(const int got, sum_of(s));
  if (got != want) return Error(ERANGE, "sum " + std::to_string(got));
  return Status();
}

TEST(AssignOrReturn, AssignsTheValueAndPropagatesTheFirstError) {
  auto ok = sum_of("123");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 6);
  auto bad = sum_of("1x3");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), EINVAL);
  EXPECT_EQ(bad.error().message(), "not a digit: x");
  // Across result types: Result<int> error into a Status.
  EXPECT_EQ(check_sum("9x", 9).code(), EINVAL);
  EXPECT_EQ(check_sum("45", 9).code(), 0);
  EXPECT_EQ(check_sum("44", 9).code(), ERANGE);
}

Task<Result<std::unique_ptr<int>>> make_boxed(int v) {
  if (v < 0) co_return Error(EDOM, "negative");
  co_return std::make_unique<int>(v);
}

Task<Result<int>> unbox_twice(int a, int b) {
  // Move-only values, and co_await inside the macro's expression.
  UQ_CO_ASSIGN_OR_RETURN(std::unique_ptr<int> x, co_await make_boxed(a));
  UQ_CO_ASSIGN_OR_RETURN(auto y, co_await make_boxed(b));
  co_return *x + *y;
}

TEST(AssignOrReturn, CoroutineFormAwaitsAndMovesOnlyValues) {
  auto r = sync_wait(unbox_twice(2, 3));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 5);
  auto e = sync_wait(unbox_twice(2, -1));
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code(), EDOM);
}

}  // namespace
}  // namespace uqcow
