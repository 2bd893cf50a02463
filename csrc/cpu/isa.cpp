#include "isa.h"

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>

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

}  // namespace comptrust::cpu
