// Our own 2:4 GEMM for small M (decode): y[M, N] = x[M, K] . W[N, K]^T for M <= 64.
//
// Memory-bound regime: every weight byte is read once, so the kernel is built around streaming
// the compressed weight at HBM speed (fp16 2:4 = 1.125/2 of the dense bytes, hence the 1.78x
// limit). Sparse tensor cores (mma.sp m16n8k32) take the weight as the sparse A operand
// (16 output features x 32 k) and the few tokens as dense B (32 k x 8 tokens).
//
// * Weight layout (built once per weight by sparseflow/kernels/decode.py from the portable format):
//   A[tile][kstep][lane] is one 16-byte mma.sp A fragment per lane, so a warp's load of one
//   k-step is 512 contiguous bytes; E[tile][chunk][slot] holds the metadata of 4 k-steps per
//   16-byte load for the 16 lanes that supply it (sparsity selector 0: threads 0 and 1 of each
//   quad). K is padded to a multiple of 128 (one chunk = 4 k-steps), rows to tiles of 16 and
//   tiles to a multiple of 8 (one tile per warp, 8 warps per block).
// * x (tiny) is staged per chunk into shared memory in B-fragment order by the whole block, so
//   each lane reads its B fragment with one conflict-free 16-byte load and the 8 warps (128
//   output features) share it.
// * Weight fragments stream either through registers (one chunk ahead) or through a per-warp
//   cp.async ring in shared memory (kStages - 1 chunks ahead); the dispatcher times both.
// * Split-K across blocks (grid.y) fills all SMs when N is small (a 4096-row layer is only 32
//   blocks): each split writes fp32 partials, the last block to finish a row block (atomic
//   counter, reset by that block) adds them in a fixed order, so results are deterministic.
// * Epilogue through shared memory: bias, optional SwiGLU (gate/up tiles interleaved in the
//   packed weight: silu(gate) * up is written once, never the 2x-wide intermediate), coalesced
//   row-major stores.
// Argument checks, workspaces and the torch-facing entry points are in decode_ops.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>

#include "decode_gemm.h"

namespace sparseflow {
namespace {



template <typename T>
struct MmaSp;

template <>
struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint4& a, const uint4& b, uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
  }
};

template <>
struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint4& a, const uint4& b, uint32_t e) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
  }
};

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read once: keep it out of L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// Nibble u of each of the four halfwords in (lo, hi), in order: the 16 metadata bits of one row
// for k-step u of the transposed chunk order (halfword p holds groups 4p .. 4p + 3).
__device__ __forceinline__ uint32_t gather_nibbles(uint32_t lo, uint32_t hi, int u) {
  const uint32_t a = (lo >> (4 * u)) & 0x000F000Fu, b = (hi >> (4 * u)) & 0x000F000Fu;
  const uint32_t c = a | (b << 8);  // halfword 0 at bit 0, 2 at 8, 1 at 16, 3 at 24
  return (c | (c >> 12)) & 0xFFFFu;
}

__device__ __forceinline__ uint32_t pick(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }

// x pieces of 8 consecutive k (16 bytes) per chunk: 8*NT rows x 16 pieces; each thread owns up to
// kPieces of them. A piece at (row m, k-step u, octet a) feeds word a of the B fragments of lanes
// (g = m % 8, t = 0..3) of n-tile m / 8.
// TRANSPOSED: the chunk's k order of the in-place register pipeline (see decode24_kernel): k-step
// u, group position p (4 k each) holds the chunk's group 4p + u, so a piece is two 8-byte halves
// 16 k apart (K % 128 == 0 there, so no k bound).
template <int NT, bool TRANSPOSED = false>
struct XStage {
  static constexpr int kTotal = 8 * NT * 16;
  static constexpr int kPieces = (kTotal + kThreads - 1) / kThreads;
  uint32_t w[kPieces][4];

  __device__ __forceinline__ void load(const uint32_t* __restrict__ x32, int M, int K, int chunk) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int p = threadIdx.x + i * kThreads;
      const int m = p >> 4;
      if constexpr (TRANSPOSED) {
        const int u = (p & 15) >> 2, a = p & 3, k = chunk * 128 + 32 * a + 4 * u;  // group 8a + u, then 8a + 4 + u
        const bool ok = p < kTotal && m < M;
#pragma unroll
        for (int h = 0; h < 4; ++h) w[i][h] = ok ? __ldg(x32 + ((size_t)m * K + k + (h >> 1) * 16) / 2 + (h & 1)) : 0u;
      } else {
        const int k = chunk * 128 + (p & 15) * 8;
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const bool ok = p < kTotal && m < M && k + 2 * h < K;
          w[i][h] = ok ? __ldg(x32 + ((size_t)m * K + k) / 2 + h) : 0u;
        }
      }
    }
  }

  __device__ __forceinline__ void store(uint32_t* __restrict__ xs) const {  // xs: [kU][NT][32 lanes][4 words]
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int p = threadIdx.x + i * kThreads;
      if (p < kTotal) {
        const int m = p >> 4, u = (p & 15) >> 2, a = p & 3;
        uint32_t* dst = xs + ((u * NT + (m >> 3)) * 32 + (m & 7) * 4) * 4 + a;
#pragma unroll
        for (int h = 0; h < 4; ++h) dst[h * 4] = w[i][h];  // lane t = h holds k = 8a + 2h, 8a + 2h + 1
      }
    }
  }
};

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
// src_bytes < 16 fills the rest of the 16 bytes with zeros (0: a row past the weight's end).
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Four 8x8 b16 matrices from shared memory, lane l giving the address of row l % 8 of matrix l / 8;
// register i of lane (g, t) = matrix i, row g, elements 2t and 2t + 1: the mma A fragment order.
__device__ __forceinline__ uint4 ldmatrix_x4(const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  uint4 v;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
// Metadata for rows past the weight's end: every nibble (0, 1), valid, over zero values.
__device__ __align__(16) const uint8_t kPadMeta[16] = {0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44,
                                                       0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44};
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int NT>
__host__ __device__ constexpr int xs_words() {  // double-buffered B fragments (reused as the epilogue's tile)
  return 2 * kU * NT * 32 * 4;
}
constexpr int kRingUint4 = kStages * (kU + 1) * 32;  // per warp: per stage kU A fragments + metadata
template <int NT, bool RING>
__host__ __device__ constexpr int smem_bytes() {
  return xs_words<NT>() * 4 + (RING ? kWarps * kRingUint4 * 16 : 0);
}

// RING: weights stream through the cp.async ring (kStages - 1 chunks ahead); else through
// registers, one chunk ahead. Which is faster depends on the shape; the dispatcher measures both.
// PORT (with RING): the weight is read in the portable form (values n_out x K/2, metadata
// n_out x K/8 bytes, K % 128 == 0) instead of the packed fragment order, so no second copy of
// the weight is needed: each chunk's 16 rows x 128 bytes of values and 16 rows x 16 bytes of
// metadata are copied row-contiguously (coalesced) into the warp's ring stage, values swizzled
// (16-byte piece q of row r at slot q ^ (r % 8): conflict-free), and ldmatrix.x4 hands each lane
// its A fragment; the metadata is bit-for-bit what mma.sp wants, only rows g and g + 8 are paired.
// PORT without RING: registers, one chunk ahead, straight from the portable form. The chunk's k
// order is transposed (k-step u, group position p <- the chunk's group 4p + u; x is staged in the
// same order, and a sum does not care about order), which makes lane (g, t)'s A fragments of all
// four k-steps two 16-byte pieces of rows g and g + 8 (groups 4t.., 16 + 4t..: each warp load is
// 8 rows x 64 contiguous bytes) and its metadata 8 bytes of each row (halfword p, nibble u).
// Two token tiles (M 9-16): at most 64 registers, so 4 blocks per SM (at 74, gate_up's 448 blocks
// took 1.13 waves and reached 54% of DRAM peak in Nsight Compute on the H200; capped, 1.11x faster).
// Other tile counts name no block count: a minimum of 1 lets ptxas take 86 registers at one token
// tile (2 blocks per SM, 1.2x slower on gate_up), unnamed it takes 64.
template <typename T, int NT, bool SWIGLU, bool RING, bool PORT>
__global__ void __launch_bounds__(kThreads, NT == 2 ? 4 : 0) decode24_kernel(const uint4* __restrict__ A, const uint4* __restrict__ E,
                                                            const uint4* __restrict__ A2,
                                                            const uint4* __restrict__ E2,
                                                            const T* __restrict__ x, const T* __restrict__ bias,
                                                            T* __restrict__ y, float4* __restrict__ ws,
                                                            int* __restrict__ counters, int M, int K, int KS,
                                                            int tiles, int n_out, int chunks_per_split) {
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ int is_last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * kWarps + warp;
  const int C = KS / kU;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(C, c0 + chunks_per_split);
  const uint4* Ap = A + (size_t)tile * KS * 32 + lane;
  const uint4* Ep = E + (size_t)tile * C * 16 + g * 2 + (t & 1);
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  // This warp's ring of weight stages; each lane copies (cp.async) and later reads only its own
  // 16-byte slots, so no synchronisation beyond cp.async.wait_group is needed for them.
  uint4* ring = reinterpret_cast<uint4*>(smem + xs_words<NT>()) + warp * kRingUint4 + lane;

  uint4* ringw = reinterpret_cast<uint4*>(smem + xs_words<NT>()) + warp * kRingUint4;  // this warp's ring
  // Portable form: this tile's 16 rows of one weight (SwiGLU: even tiles gate, odd tiles up).
  const int prow0 = (SWIGLU ? tile >> 1 : tile) * 16;
  const T* pv = reinterpret_cast<const T*>(SWIGLU && (tile & 1) ? A2 : A);
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(SWIGLU && (tile & 1) ? E2 : E);

  auto issue = [&](int c) {  // weight of chunk c -> stage c % kStages
    if (c < c1) {
      if constexpr (PORT) {
        uint4* st = ringw + (c % kStages) * (kU + 1) * 32;
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // 16 rows x 8 pieces of 16 bytes (k-step q / 2, half q % 2)
          const int p = i * 32 + lane, r = p >> 3, q = p & 7;
          const bool ok = prow0 + r < n_out;
          const T* src = ok ? pv + (size_t)(prow0 + r) * (K / 2) + c * 64 + q * 8 : pv;
          cp_async16_zfill(st + r * 8 + (q ^ (r & 7)), src, ok ? 16 : 0);
        }
        if (lane < 16) {
          const bool ok = prow0 + lane < n_out;
          cp_async16(st + 128 + lane, ok ? pm + (size_t)(prow0 + lane) * (K / 8) + c * 16 : kPadMeta);
        }
      } else {
        uint4* st = ring + (c % kStages) * (kU + 1) * 32;
#pragma unroll
        for (int u = 0; u < kU; ++u) cp_async16(st + u * 32, Ap + (size_t)(c * kU + u) * 32);
        cp_async16(st + kU * 32, Ep + (size_t)c * 16);
      }
    }
    cp_async_commit();  // always one group per chunk, so wait_group counts stay uniform
  };

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  if constexpr (RING) {
  #pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(c0 + i);
    XStage<NT> xst;
    if (c0 < c1) {
      xst.load(x32, M, K, c0);
      xst.store(smem);
    }
    __syncthreads();
    for (int c = c0; c < c1; ++c) {
      const int buf = (c - c0) & 1;
      const bool more = c + 1 < c1;
      issue(c + kStages - 1);
      if (more) xst.load(x32, M, K, c + 1);
      cp_async_wait<kStages - 1>();  // this lane's copies of chunk c have landed
      const uint4* xs = reinterpret_cast<const uint4*>(smem) + buf * (kU * NT * 32);
      if constexpr (PORT) {
        __syncwarp();  // ... and the other lanes' (ldmatrix reads rows other lanes copied)
        const uint4* st = ringw + (c % kStages) * (kU + 1) * 32;
        const uint16_t* meta = reinterpret_cast<const uint16_t*>(st + 128);  // 16 rows x 8 halfwords
        const int mat = lane >> 3, r = (lane & 7) + ((mat & 1) << 3);
  #pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int q = 2 * u + (mat >> 1);
          const uint4 a = ldmatrix_x4(st + r * 8 + (q ^ (r & 7)));
          const int h = u * 2 + (t & 1);  // thread t of the pair: k 16t .. 16t + 15 of this k-step
          const uint32_t e = meta[g * 8 + h] | (static_cast<uint32_t>(meta[(g + 8) * 8 + h]) << 16);
  #pragma unroll
          for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], e);
        }
      } else {
        const uint4* st = ring + (c % kStages) * (kU + 1) * 32;
        const uint4 e4 = st[kU * 32];
  #pragma unroll
        for (int u = 0; u < kU; ++u) {
          const uint4 a = st[u * 32];
          const uint32_t e = pick(e4, u);
  #pragma unroll
          for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], e);
        }
      }
      if (more) xst.store(smem + (buf ^ 1) * (kU * NT * 32 * 4));
      __syncthreads();
    }
    cp_async_wait<0>();
  } else {
    uint4 a_cur[kU], a_nxt[kU], e_cur, e_nxt;
    // PORT: this lane's rows g and g + 8 of the tile (null past the weight's end: zeros, and
    // metadata 0x4 per group, which is valid)
    const bool ok0 = prow0 + g < n_out, ok1 = prow0 + g + 8 < n_out;
    const T* v0 = pv + (size_t)(prow0 + g) * (K / 2) + 8 * t;  // + 64 per chunk
    const T* v1 = v0 + (size_t)8 * (K / 2);
    const uint8_t* m0 = pm + (size_t)(prow0 + g) * (K / 8) + 8 * (t & 1);  // + 16 per chunk
    const uint8_t* m1 = m0 + (size_t)8 * (K / 8);
    auto load = [&](int c, uint4 (&a)[kU], uint4& e) {
      if constexpr (PORT) {
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        a[0] = ok0 ? ld_stream(reinterpret_cast<const uint4*>(v0 + c * 64)) : zero;
        a[1] = ok1 ? ld_stream(reinterpret_cast<const uint4*>(v1 + c * 64)) : zero;
        a[2] = ok0 ? ld_stream(reinterpret_cast<const uint4*>(v0 + c * 64 + 32)) : zero;
        a[3] = ok1 ? ld_stream(reinterpret_cast<const uint4*>(v1 + c * 64 + 32)) : zero;
        const uint2 pad = make_uint2(0x44444444u, 0x44444444u);
        const uint2 e0 = ok0 ? ld_stream8(m0 + c * 16) : pad, e1 = ok1 ? ld_stream8(m1 + c * 16) : pad;
        e = make_uint4(e0.x, e0.y, e1.x, e1.y);
      } else {
#pragma unroll
        for (int u = 0; u < kU; ++u) a[u] = ld_stream(Ap + (size_t)(c * kU + u) * 32);
        e = ld_stream(Ep + (size_t)c * 16);
      }
    };
    XStage<NT, PORT> xst;
    if (c0 < c1) {
      load(c0, a_cur, e_cur);
      xst.load(x32, M, K, c0);
      xst.store(smem);
    }
    __syncthreads();
    for (int c = c0; c < c1; ++c) {
      const int buf = (c - c0) & 1;
      const bool more = c + 1 < c1;
      if (more) {
        load(c + 1, a_nxt, e_nxt);
        xst.load(x32, M, K, c + 1);
      }
      const uint4* xs = reinterpret_cast<const uint4*>(smem) + buf * (kU * NT * 32);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        uint4 a = a_cur[u];
        uint32_t e = pick(e_cur, u);
        if constexpr (PORT) {  // regs: row g groups 4t.., row g + 8 groups 4t.., then 16 + 4t..
          a = make_uint4(pick(a_cur[0], u), pick(a_cur[1], u), pick(a_cur[2], u), pick(a_cur[3], u));
          e = gather_nibbles(e_cur.x, e_cur.y, u) | (gather_nibbles(e_cur.z, e_cur.w, u) << 16);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], e);
      }
      if (more) xst.store(smem + (buf ^ 1) * (kU * NT * 32 * 4));
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kU; ++u) a_cur[u] = a_nxt[u];
      e_cur = e_nxt;
    }
  }

  const int splits = gridDim.y;
  if (splits > 1) {  // publish partials; the last block of this row block reduces them
    float4* mine = ws + ((size_t)blockIdx.y * tiles + tile) * NT * 32 + lane;
#pragma unroll
    for (int j = 0; j < NT; ++j) __stcg(mine + j * 32, make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int s = 0; s < splits; ++s) {  // fixed order: the sum does not depend on who finished last
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float4 v = __ldcg(ws + ((size_t)s * tiles + tile) * NT * 32 + j * 32 + lane);
        acc[j][0] += v.x, acc[j][1] += v.y, acc[j][2] += v.z, acc[j][3] += v.w;
      }
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch on this stream
  }

  // Epilogue: fragments -> fin[warp][16 rows][8*NT tokens] -> coalesced row-major stores.
  constexpr int MP = 8 * NT;
  float* fin = reinterpret_cast<float*>(smem);  // kWarps*16*MP floats == xs_words<NT>()
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) fin[(warp * 16 + g + 8 * (q >> 1)) * MP + 8 * j + 2 * t + (q & 1)] = acc[j][q];
  __syncthreads();
  if (!SWIGLU) {
    const int n0 = blockIdx.x * kWarps * 16;
    for (int i = threadIdx.x; i < M * kWarps * 16; i += kThreads) {
      const int m = i / (kWarps * 16), r = i % (kWarps * 16), n = n0 + r;
      if (n < n_out) {
        float v = fin[r * MP + m];
        if (bias != nullptr) v += to_f(bias[n]);
        y[(size_t)m * n_out + n] = from_f<T>(v);
      }
    }
  } else {  // warp 2i: gate rows, warp 2i+1: up rows of the same 16 features
    constexpr int F = kWarps / 2 * 16;
    const int f0 = blockIdx.x * F;
    for (int i = threadIdx.x; i < M * F; i += kThreads) {
      const int m = i / F, f = i % F, n = f0 + f;
      if (n < n_out) {
        const int r = (f >> 4) * 32 + (f & 15);
        float gate = fin[r * MP + m], up = fin[(r + 16) * MP + m];
        if (bias != nullptr) gate += to_f(bias[n]), up += to_f(bias[n_out + n]);
        y[(size_t)m * n_out + n] = from_f<T>(gate / (1.f + __expf(-gate)) * up);
      }
    }
  }
}

// One mma.sp per warp on raw per-lane registers: lets the tests check our reading of the PTX
// fragment and metadata layouts directly.
template <typename T>
__global__ void mma_probe_kernel(const uint4* a, const uint4* b, const uint32_t* e, float4* d) {
  const int i = blockIdx.x * 32 + threadIdx.x;
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  MmaSp<T>::run(c, a[i], b[i], e[i]);
  d[i] = make_float4(c[0], c[1], c[2], c[3]);
}

// occupancy != null: no launch, *occupancy = blocks of this instantiation resident per SM.
template <typename T, int NT, bool SW, bool RING, bool PORT>
cudaError_t launch_t(const DecodeArgs& a, int device, cudaStream_t stream, int* occupancy) {
  constexpr int bytes = smem_bytes<NT, RING>();
  static std::atomic<uint64_t> ready{0};  // devices on which the kernel may use > 48 KB of shared memory
  if (!(ready.load() >> device & 1)) {
    cudaError_t err = cudaFuncSetAttribute(decode24_kernel<T, NT, SW, RING, PORT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
    ready.fetch_or(uint64_t{1} << device);
  }
  if (occupancy != nullptr)
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(occupancy, decode24_kernel<T, NT, SW, RING, PORT>, kThreads,
                                                         bytes);
  decode24_kernel<T, NT, SW, RING, PORT><<<dim3(a.row_blocks, a.split), kThreads, bytes, stream>>>(
      static_cast<const uint4*>(a.A), static_cast<const uint4*>(a.E), static_cast<const uint4*>(a.A2),
      static_cast<const uint4*>(a.E2), static_cast<const T*>(a.x),
      static_cast<const T*>(a.bias), static_cast<T*>(a.y), reinterpret_cast<float4*>(a.ws), a.counters, a.M, a.K,
      a.KS, a.tiles, a.n_out, a.per);
  return cudaGetLastError();
}

template <typename T, bool SW, bool RING, bool PORT>
cudaError_t launch_nt(const DecodeArgs& a, int device, cudaStream_t stream, int* occ) {
  switch (a.nt) {
    case 1: return launch_t<T, 1, SW, RING, PORT>(a, device, stream, occ);
    case 2: return launch_t<T, 2, SW, RING, PORT>(a, device, stream, occ);
    case 4: return launch_t<T, 4, SW, RING, PORT>(a, device, stream, occ);
    default: return launch_t<T, 8, SW, RING, PORT>(a, device, stream, occ);
  }
}

template <typename T, bool SW>
cudaError_t launch_ring(const DecodeArgs& a, int device, cudaStream_t stream, int* occ) {
  if (a.portable)
    return a.ring ? launch_nt<T, SW, true, true>(a, device, stream, occ)
                  : launch_nt<T, SW, false, true>(a, device, stream, occ);
  return a.ring ? launch_nt<T, SW, true, false>(a, device, stream, occ)
                : launch_nt<T, SW, false, false>(a, device, stream, occ);
}

cudaError_t dispatch(const DecodeArgs& a, int device, cudaStream_t stream, int* occ) {
  if (a.bf16) {
    return a.swiglu ? launch_ring<__nv_bfloat16, true>(a, device, stream, occ)
                    : launch_ring<__nv_bfloat16, false>(a, device, stream, occ);
  }
  return a.swiglu ? launch_ring<__half, true>(a, device, stream, occ)
                  : launch_ring<__half, false>(a, device, stream, occ);
}

}  // namespace

cudaError_t launch_decode24(const DecodeArgs& a, int device, cudaStream_t stream) {
  return dispatch(a, device, stream, nullptr);
}

cudaError_t decode24_occupancy(const DecodeArgs& a, int device, int* blocks) {
  return dispatch(a, device, nullptr, blocks);
}

cudaError_t launch_mma_sp_probe(bool bf16, const void* a, const void* b, const void* e, void* d, int cases,
                                cudaStream_t stream) {
  const auto* pa = static_cast<const uint4*>(a);
  const auto* pb = static_cast<const uint4*>(b);
  const auto* pe = static_cast<const uint32_t*>(e);
  auto* pd = static_cast<float4*>(d);
  if (bf16) mma_probe_kernel<__nv_bfloat16><<<cases, 32, 0, stream>>>(pa, pb, pe, pd);
  else mma_probe_kernel<__half><<<cases, 32, 0, stream>>>(pa, pb, pe, pd);
  return cudaGetLastError();
}

}  // namespace sparseflow
