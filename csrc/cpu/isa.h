// Run-time choice of the SIMD path for the CPU kernels. One build runs on any x86-64: kernels are
// compiled per ISA with function target attributes and picked here from __builtin_cpu_supports.
#pragma once
#include <cstdint>
#include <string>

// COMPTRUST_PORTABLE_ONLY (setup.py: COMPTRUST_PORTABLE_ONLY=1) builds what a non-x86 CPU gets, the portable
// scalar kernels only, so that build is compiled and tested on x86 too (make test's portable check).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(COMPTRUST_PORTABLE_ONLY)
#define COMPTRUST_X86 1
#endif

namespace comptrust::cpu {

// AVX2 (+FMA, F16C) is the path every kernel has. AVX-512 (F) adds paths where they paid on an AVX-512
// Xeon: the 2:4 kernels (one permute gathers the inputs of both kept-value slots), the int4, int3 and int8
// kernels with float activations at batch < 8 and the panel microkernel (6x32); int8 activations where the
// CPU also has VNNI (avx512_vnni_usable).
enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest path this CPU supports, or the one forced by COMPTRUST_CPU_ISA=avx512|avx2|scalar (the
// tests use it to exercise every path); forcing a path the CPU lacks is an error.
Isa select_isa();

// Whether the bf16 tile-matrix path (AMX-BF16) may run: select_isa() is kAvx512 (so forcing avx2/scalar
// also turns it off), the CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the tile
// state (Linux asks each process to request it once; the first call does). COMPTRUST_CPU_AMX=0 turns it off.
bool amx_bf16_usable();
// Whether the bf16 panel product may run on AVX512-BF16's vdpbf16ps where there is no tile unit (AMD Zen 4,
// Intel Cooper Lake): select_isa() is kAvx512 and the CPU has AVX512-BF16/BW/DQ/VBMI (the panel decoding
// uses them too). COMPTRUST_CPU_BF16=0 turns it off. amx_bf16_usable() takes precedence where both hold.
bool avx512_bf16_usable();
// Whether the int8-activation kernels may take their AVX-512 VNNI path (vpdpbusd): select_isa() is kAvx512
// and the CPU has AVX512-VNNI and AVX512-BW.
bool avx512_vnni_usable();
// ... and VBMI too (vpmultishiftqb, vpermb): the 2:4 int4 values' int8 kernel (sparse24_vnni.cpp).
bool avx512_vnni_vbmi_usable();
// Whether batch-1 kernels that can read several tiles side by side should read one at a time instead (each
// thread's weights one sequential stream): on AMD CPUs, where the 2:4 fp32-values GEMV ran 1.21-1.27x faster that
// way (Zen 5, cold, alternated in one process) and the one-stream int kernels had won on Zen 4; not elsewhere (on
// the host that kernel was first tuned on, four tiles side by side were 1.2x faster). COMPTRUST_CPU_ONE_STREAM=1|0
// overrides.
bool one_weight_stream();
// The L1 data cache of one core in bytes (kernels size what must stay in L1 by it): COMPTRUST_CPU_L1D_BYTES if set
// (the tests take both sides of the choices that depend on it), else what the C library reads from CPUID
// (sysconf _SC_LEVEL1_DCACHE_SIZE), else 32 KiB, the smallest L1 of x86 cores with AVX-512.
int64_t l1d_bytes();
const char* isa_name(Isa isa);
std::string selected_isa_name();

}  // namespace comptrust::cpu
