// FastDivmod (src/core/fast_divmod.hpp) against the plain operators: every divisor up to 4096 with
// the numerators around each multiple of it and at the ends of the range, and random pairs up to
// 2^31 - 1.
#include <cstdint>
#include <random>

#include "check.hpp"
#include "core/fast_divmod.hpp"

using flashep::FastDivmod;

namespace {

long mismatches = 0;

void expect(const FastDivmod& f, int d, int n) {
  if (f.div(n) != n / d || f.mod(n) != n % d) {
    if (++mismatches <= 10) {
      CHECK_EQ(f.div(n), n / d);
      CHECK_EQ(f.mod(n), n % d);
    }
  }
}

void test_small_divisors() {
  const int top = 2147483647;
  for (int d = 1; d <= 4096; ++d) {
    const FastDivmod f = FastDivmod::of(d);
    CHECK_EQ(f.divisor, uint32_t(d));
    for (int n = 0; n < 3 * d + 3; ++n) expect(f, d, n);
    for (int k : {7, 100, 1000, 8191, 65536})
      for (int delta = -1; delta <= 1; ++delta) {
        const int64_t n = int64_t(k) * d + delta;
        if (n >= 0 && n <= top) expect(f, d, static_cast<int>(n));
      }
    for (int n = top; n > top - 2 * d - 2 && n >= 0; --n) expect(f, d, n);
  }
}

void test_random() {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000000; ++i) {
    const int d = 1 + static_cast<int>(rng() % (i % 2 ? 2147483647u : 70000u));
    const int n = static_cast<int>(rng() % 2147483648u);
    expect(FastDivmod::of(d), d, n);
  }
  for (int d : {2147483647, 1073741824, 1073741825, 65535, 65537})
    for (int n : {0, 1, d - 1, 2147483646, 2147483647}) expect(FastDivmod::of(d), d, n);
}

}  // namespace

int main() {
  test_small_divisors();
  test_random();
  CHECK_EQ(mismatches, 0L);
  CHECK_EQ(FastDivmod::of(0).divisor, 0u);
  return check::summary("test_fast_divmod");
}
