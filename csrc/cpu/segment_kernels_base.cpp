// Chunk kernels for any CPU (Vectorized's portable fallback, auto-vectorised by the compiler).
#define PL_CAP base
#include "segment_kernels.inc"
