// Run-time choice of the SIMD path for the CPU kernels. One build runs on any x86-64: kernels are
// compiled per ISA with function target attributes and picked here from __builtin_cpu_supports.
#pragma once
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define COMPTRUST_X86 1
#endif

namespace comptrust::cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest path this CPU supports, or the one forced by COMPTRUST_CPU_ISA=avx512|avx2|scalar (the tests
// use it to exercise every path); forcing a path the CPU lacks is an error.
Isa select_isa();
const char* isa_name(Isa isa);
std::string selected_isa_name();

// AVX-512 VNNI (vpdpbusd: u8 x s8 dot products), used by the int8-activation kernels on the avx512 path.
bool cpu_has_avx512_vnni();

}  // namespace comptrust::cpu
