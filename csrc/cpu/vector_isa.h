// Selects at::vec's SIMD implementation from the compiler's target flags (-march). Include it
// before any ATen header: an x86 extension otherwise gets at::vec's scalar fallback. The capability
// also names at::vec's inline namespace, so these instantiations cannot clash with torch's.
// On aarch64 nothing is defined: ATen picks its NEON at::vec from __aarch64__ alone (it has no
// CPU_CAPABILITY_NEON), and its SVE one only for CPU_CAPABILITY_SVE256, which needs a build for
// 256-bit SVE (-msve-vector-bits=256) and so would not run on other ARM CPUs.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif
