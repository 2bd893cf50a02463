#pragma once
#include <string>

namespace comptrust::cpu {
// "avx512", "avx2" or "scalar": the path chosen at run time from the CPU's features, or forced by
// the environment variable COMPTRUST_CPU_ISA (used by the tests to exercise every path).
std::string selected_isa_name();
}  // namespace comptrust::cpu
