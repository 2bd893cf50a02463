// torch's extension header and the x86 intrinsics, read with GCC 12's false "uninitialized" warnings off.
// GCC before 12.3 warns wherever an AVX-512 intrinsic that takes an "undefined" merge operand is inlined:
// avx512fintrin.h makes that operand with `__m512i __Y = __Y;` (GCC bug 105593), a few hundred warnings per
// build that buried any real one. The warning's location is GCC's header, so ignoring the two warnings while
// the headers are read silences exactly those; our own code keeps them. torch/extension.h reads immintrin.h
// itself, so this must come before any other include of torch in a translation unit.
#pragma once
#include "isa.h"  // defines COMPTRUST_X86 on x86-64

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/extension.h>
#ifdef COMPTRUST_X86
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
