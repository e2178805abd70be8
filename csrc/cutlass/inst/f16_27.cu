// CUTLASS 2:4 GEMM configuration 27 for cutlass::half_t (one per file, so they compile in parallel).
#include "../cutlass_gemm_impl.cuh"

SF_CUTLASS_INSTANCE(cutlass::half_t, 27)
