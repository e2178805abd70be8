// y = x @ W^T with W 2:4-sparse on Hopper, through CUTLASS's sm90 sparse GEMM (wgmma.sp, TMA,
// warp-specialized mainloop). Why a second large-M path beside cuSPARSELt: on the H200 the
// cuSPARSELt algorithms that win on an H100 (ids >= 36) fail with an illegal instruction, and
// the ones that run leave the small-tile cases (M = 256 on a 4096-wide layer: 32 tiles of 128 x
// 256 for 132 SMs) at 1.0-1.1x of cuBLAS; CUTLASS's 64-row ping-pong and cluster tiles fill them
// (a stand-alone probe measured 1.2-1.3x there). The dispatcher times every configuration below
// and keeps the fastest kernel per (shape, M-bucket).
//
// The GEMM is posed with W as CUTLASS's sparse A (N x K row-major), x as B (K x M column-major,
// i.e. x's own M x K row-major bytes) and the output D as N x M column-major, i.e. y (M x N)
// row-major: no copies. W's CUTLASS form (values + metadata in the sm90 order) is built once on
// the device by CUTLASS's own compressor from the dense 2:4 weight. Configurations with tile
// K >= 128 read that form as it is; the tile K = 64 ones read the same values with the metadata
// in another order (a permutation, see sparseflow/kernels/cutlass.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace sparseflow::cutlass24 {

// Shapes the kernels take (checked in Python first, so the error names the layer):
// N % kAlignN == 0 and K % kAlignK == 0.
constexpr int64_t kAlignN = 64;
constexpr int64_t kAlignK = 128;
// Configurations per element type (Configs in cutlass_gemm_impl.cuh, one file each in
// csrc/cutlass/inst/; a static_assert there keeps the three in step).
constexpr int kConfigs = 29;

struct Sizes {
  int64_t a_elems;  // compressed values (with CUTLASS's padding)
  int64_t e_bytes;  // metadata
  int64_t workspace;  // compressor scratch
};

// Per element type (float16 and bfloat16; each configuration compiled in inst/f16_*.cu, inst/bf16_*.cu).
template <bool BF16>
struct Ops {
  static std::vector<std::string> names();
  static Sizes sizes(int n, int k);
  // dense (N x K, 2:4) -> a, e; returns a CUTLASS status text on failure, "" on success
  static std::string compress(const void* dense, void* a, void* e, void* ws, int n, int k, int device,
                              cudaStream_t stream);
  static int64_t workspace(int cfg, int n, int m, int k, int device);  // stream-K partials
  // y = x @ W^T; ws holds ws_bytes (the run refuses if workspace() needs more)
  static std::string gemm(int cfg, const void* a, const void* e, const void* x, void* y, int n, int m, int k,
                          void* ws, int64_t ws_bytes, int device, cudaStream_t stream);
};

}  // namespace sparseflow::cutlass24
