// A tiny assertion helper for the C++ tests, so they need no test framework.
//
//   CHECK(cond)               records a failure (file:line and the expression) when cond is false
//   CHECK_EQ(a, b)            the same for a == b, printing both values (or the first differing
//                             element, for vectors)
//   CHECK_THROWS(expr, Type)  expr must throw an exception of Type
//   return check::summary("test_name");   from main: prints a line, non-zero exit on any failure
//
// Failures do not abort the test, so one run reports every broken expectation. Each test file is
// its own executable, so the counters are per file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace check {

inline int failures = 0;
inline long checks = 0;

/// Prints a value for a failure message: small integers as numbers, not characters.
template <typename T>
std::string describe(const T& value) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, int8_t> || std::is_same_v<T, char>) {
    os << static_cast<int>(value);
  } else if constexpr (requires { os << value; }) {
    os << value;
  } else {
    os << "<unprintable>";
  }
  return os.str();
}

inline void record(bool ok, const char* file, int line, const std::string& message) {
  ++checks;
  if (ok) return;
  ++failures;
  std::cerr << file << ":" << line << ": FAILED: " << message << "\n";
}

template <typename A, typename B>
void equal(const A& a, const B& b, const char* a_text, const char* b_text, const char* file, int line) {
  if (a == b) return record(true, file, line, "");
  record(false, file, line,
         std::string(a_text) + " == " + b_text + " (" + describe(a) + " vs " + describe(b) + ")");
}

template <typename A, typename B>
void equal(const std::vector<A>& a, const std::vector<B>& b, const char* a_text, const char* b_text,
           const char* file, int line) {
  std::string mismatch;
  if (a.size() != b.size()) {
    mismatch = "sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  } else {
    for (size_t i = 0; i < a.size(); ++i) {
      if (!(a[i] == b[i])) {
        mismatch = "first difference at [" + std::to_string(i) + "]: " + describe(a[i]) + " vs " + describe(b[i]);
        break;
      }
    }
  }
  record(mismatch.empty(), file, line, std::string(a_text) + " == " + b_text + " (" + mismatch + ")");
}

inline int summary(const char* test_name) {
  std::cout << test_name << ": " << checks << " checks, " << failures << " failed\n";
  return failures == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK(cond) ::check::record(static_cast<bool>(cond), __FILE__, __LINE__, #cond)
#define CHECK_EQ(a, b) ::check::equal((a), (b), #a, #b, __FILE__, __LINE__)
#define CHECK_THROWS(expr, ExceptionType)                                                   \
  do {                                                                                      \
    bool threw_expected_ = false;                                                           \
    try {                                                                                   \
      (void)(expr);                                                                         \
    } catch (const ExceptionType&) {                                                        \
      threw_expected_ = true;                                                               \
    } catch (...) {                                                                         \
    }                                                                                       \
    ::check::record(threw_expected_, __FILE__, __LINE__, #expr " throws " #ExceptionType); \
  } while (0)
