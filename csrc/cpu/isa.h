// Run-time choice of the SIMD path for the CPU kernels. One build runs on any x86-64: kernels are
// compiled per ISA with function target attributes and picked here from __builtin_cpu_supports.
#pragma once
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define COMPTRUST_X86 1
#endif

namespace comptrust::cpu {

// AVX2 (+FMA, F16C) is the widest path: AVX-512 machines run it too. At batch 1 the kernels stream
// weights at DRAM speed with AVX2 already, and one x86 path keeps every kernel testable on any x86 box.
enum class Isa { kScalar, kAvx2 };

// The widest path this CPU supports, or the one forced by COMPTRUST_CPU_ISA=avx2|scalar (the tests
// use it to exercise every path); forcing a path the CPU lacks is an error.
Isa select_isa();
const char* isa_name(Isa isa);
std::string selected_isa_name();

}  // namespace comptrust::cpu
