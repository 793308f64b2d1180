// The attention kernels of the AVX-512 F/BW/DQ/VL + FMA path (zmm registers; x86 builds only).
#define LK_UNIT_NAME avx512
#define LK_UNIT_CODE kAvx512
#define LK_UNIT_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"
#define LK_UNIT_X86_ONLY 1
#define LK_HAVE_AVX2 1
#define LK_HAVE_AVX512 1
#include "kernels_unit.h"
