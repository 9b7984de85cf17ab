// RDR_MULTIVERSION compiles a hot loop once per x86-64 ISA level (AVX-512, AVX2+FMA,
// baseline SSE2); the loader picks the best clone for the CPU it runs on (GNU ifunc).
// That gives 8- and 16-wide vectors without -march=native, so one build runs anywhere.
// Elsewhere (clang, macOS, arm64) it is empty and the baseline build runs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define RDR_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RDR_MULTIVERSION
#endif

// For the loop templates the clones call: a template that is not inlined is compiled
// once, for the baseline ISA, and the clone around it gains nothing.
#if defined(__GNUC__)
#define RDR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RDR_ALWAYS_INLINE inline
#endif
