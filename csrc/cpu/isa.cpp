#include "isa.h"

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>

#ifdef COMPTRUST_X86
#include <cpuid.h>
#endif
#if defined(COMPTRUST_X86) && defined(__linux__)
#include <sys/syscall.h>
#endif
#ifdef __unix__
#include <unistd.h>
#endif

namespace comptrust::cpu {
namespace {

bool cpu_has(Isa isa) {
#ifdef COMPTRUST_X86
  switch (isa) {
    case Isa::kAvx512:
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kScalar:
      return true;
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa select_isa() {
  if (const char* forced = std::getenv("COMPTRUST_CPU_ISA"); forced && *forced) {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
      if (std::strcmp(forced, isa_name(isa)) == 0) {
        TORCH_CHECK(cpu_has(isa), "COMPTRUST_CPU_ISA=", forced, " but this CPU does not support it");
        return isa;
      }
    }
    TORCH_CHECK(false, "COMPTRUST_CPU_ISA=", forced, " is not one of avx512, avx2, scalar");
  }
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (cpu_has(isa)) return isa;
  return Isa::kScalar;
}

std::string selected_isa_name() { return isa_name(select_isa()); }

bool one_weight_stream() {
  if (const char* forced = std::getenv("COMPTRUST_CPU_ONE_STREAM"); forced && *forced) {
    TORCH_CHECK(std::strcmp(forced, "0") == 0 || std::strcmp(forced, "1") == 0, "COMPTRUST_CPU_ONE_STREAM=", forced,
                " is not 0 or 1");
    return forced[0] == '1';
  }
#ifdef COMPTRUST_X86
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

int64_t l1d_bytes() {
  if (const char* forced = std::getenv("COMPTRUST_CPU_L1D_BYTES"); forced && *forced) {
    char* end = nullptr;
    const long long bytes = std::strtoll(forced, &end, 10);
    TORCH_CHECK(*end == '\0' && bytes >= 1024 && bytes <= (1ll << 30),
                "COMPTRUST_CPU_L1D_BYTES=", forced, " is not a byte count from 1024 to 2^30");
    return bytes;
  }
  constexpr int64_t kFallback = 32 * 1024;
#if defined(__unix__) && defined(_SC_LEVEL1_DCACHE_SIZE)
  static const int64_t detected = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  return detected >= 1024 ? detected : kFallback;
#else
  return kFallback;
#endif
}

namespace {
// CPUID leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16; then the kernel's permission for the tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA): without it the first tile instruction faults.
bool amx_bf16_granted() {
#if defined(COMPTRUST_X86) && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
  // The panel conversion uses AVX512-BF16/BW/DQ/VBMI (every AMX CPU so far has them; checked all the same).
  if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vbmi"))
    return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
}  // namespace

bool amx_bf16_usable() {
  static const bool granted = amx_bf16_granted();
  if (const char* off = std::getenv("COMPTRUST_CPU_AMX"); off && std::strcmp(off, "0") == 0) return false;
  return granted && select_isa() == Isa::kAvx512;
}

bool avx512_bf16_usable() {
#ifdef COMPTRUST_X86
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi");
  if (const char* off = std::getenv("COMPTRUST_CPU_BF16"); off && std::strcmp(off, "0") == 0) return false;
  return has && select_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

bool avx512_vnni_usable() {
#ifdef COMPTRUST_X86
  static const bool has = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  return has && select_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

bool avx512_vnni_vbmi_usable() {
#ifdef COMPTRUST_X86
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
  return vbmi && avx512_vnni_usable();
#else
  return false;
#endif
}

}  // namespace comptrust::cpu
