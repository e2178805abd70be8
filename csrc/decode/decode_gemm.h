// Interface between the decode kernel (decode_gemm.cu, nvcc) and its host side (decode_ops.cpp).
#pragma once
#include <cuda_runtime.h>

namespace sparseflow {

constexpr int kWarps = 8;              // warps per block, one 16-row tile each
constexpr int kThreads = kWarps * 32;
constexpr int kU = 4;                  // k-steps (of 32) per chunk; packed K is a multiple of 128
constexpr int kStages = 4;             // weight chunks in flight per warp (cp.async ring in shared memory)
constexpr int kMaxM = 64;              // at most 8 n-tiles of 8 tokens

struct DecodeArgs {
  // Packed layout (portable == false): A = tiles x KS x 32 lanes x 16 bytes, E = tiles x KS/4 x 16
  // slots x 16 bytes. Portable form (portable == true, K % 128 == 0): A = values (n_out x K/2),
  // E = metadata (n_out x K/8 bytes); for SwiGLU A2/E2 are up's (A/E gate's).
  const void* A;
  const void* E;
  const void* A2;
  const void* E2;
  const void* x;        // M x K, 4-byte aligned
  const void* bias;     // n_out (2 * n_out for SwiGLU) or null
  void* y;              // M x n_out
  float* ws;            // split-K partials (split > 1)
  int* counters;        // one per row block, zero between launches
  int M, K, KS, tiles, n_out, per;  // per: chunks per split
  unsigned row_blocks, split;
  int nt;               // n-tiles of 8 tokens: 1, 2, 4 or 8
  bool bf16, swiglu, ring;  // ring: cp.async shared-memory pipeline, else registers
  bool portable;            // read the portable form in place (either pipeline)
};

cudaError_t launch_decode24(const DecodeArgs& a, int device, cudaStream_t stream);
// Blocks of the kernel a would launch (nt, bf16, swiglu, ring, portable) resident per SM.
cudaError_t decode24_occupancy(const DecodeArgs& a, int device, int* blocks);
cudaError_t launch_mma_sp_probe(bool bf16, const void* a, const void* b, const void* e, void* d, int cases,
                                cudaStream_t stream);

}  // namespace sparseflow
