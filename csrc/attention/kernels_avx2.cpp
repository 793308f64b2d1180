// The attention kernels of the AVX2 + FMA path (ymm registers; x86 builds only).
#define LK_UNIT_NAME avx2
#define LK_UNIT_CODE kAvx2
#define LK_UNIT_TARGET "avx2,fma"
#define LK_UNIT_X86_ONLY 1
#define LK_HAVE_AVX2 1
#include "kernels_unit.h"
