// Chunk kernels for x86-64 CPUs with AVX2 + FMA + F16C, chosen at run time (segment_kernels.cpp).
// setuptools gives every file of an extension the same flags, so instead of -mavx2 this file
// switches the target with a pragma before any header. GCC's pragma does not define the ISA
// macros that headers test (sleef.h declares its AVX2 functions under __AVX__), so they are
// defined here, matching the pragma.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define PL_CAP avx2
#include "segment_kernels.inc"
#endif
