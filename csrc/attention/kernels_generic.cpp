// The attention kernels of the generic path: the compiler's baseline ISA (x86-64 SSE2, aarch64
// NEON, ...) without explicit vectors. Every build has it; it serves CPUs without AVX2 + FMA.
#define LK_UNIT_NAME generic
#define LK_UNIT_CODE kGeneric
#include "kernels_unit.h"
