// CUTLASS 2:4 GEMM configuration 26 for cutlass::bfloat16_t (one per file, so they compile in parallel).
#include "../cutlass_gemm_impl.cuh"

SF_CUTLASS_INSTANCE(cutlass::bfloat16_t, 26)
