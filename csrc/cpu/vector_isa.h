// Picks the at::vec implementation for the CPU kernel files from the compiler's target flags.
// Include first, before any ATen header: ATen's vector headers read these macros, and without
// them an extension gets the scalar fallback (no SIMD exp/max). The capability also names the
// inline namespace of at::vec, so these files cannot clash with other files' instantiations.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#endif
