// Our own 2:4 GEMM for small M (decode): y[M, N] = x[M, K] . W[N, K]^T for M <= 64.
//
// Memory-bound regime: every weight byte is read once, so the kernel is built around streaming
// the compressed weight at HBM speed (fp16 2:4 = 1.125/2 of the dense bytes, hence the 1.78x
// limit). Sparse tensor cores (mma.sp m16n8k32) take the weight as the sparse A operand
// (16 output features x 32 k) and the few tokens as dense B (32 k x 8 tokens).
//
// * Weight layout (built once per weight by sparseflow/decode.py from the portable format):
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
// * Stream-K grid: the (row block, 128-k chunk) iterations are dealt out evenly to the blocks,
//   each running one contiguous range (crossing row-block boundaries), so every SM streams the
//   same bytes: a split-K grid (row blocks x splits) leaves a partial last wave, which cost
//   gate_up at M = 16 a third of its bandwidth (Nsight Compute, 2026-12-03). The host picks the
//   grid: s blocks per row block (split-K as before), or one wave of resident blocks (FILL).
//   A row block shared by several blocks gets fp32 partials (stored as soon as a block leaves
//   it, published with one fence at the end of the block's range); the last block to arrive
//   (atomic counter, reset by that block) adds them in block order, so results are deterministic.
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
__host__ __device__ constexpr int smem_bytes() {  // x stages, the weight rings, the epilogue's tile
  return xs_words<NT>() * 4 + (RING ? kWarps * kRingUint4 * 16 : 0) + kWarps * 16 * 8 * NT * 4;
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
template <typename T, int NT, bool SWIGLU, bool RING, bool PORT>
__global__ void __launch_bounds__(kThreads, NT <= 2 ? 4 : NT == 4 ? 2 : 1) decode24_kernel(const uint4* __restrict__ A, const uint4* __restrict__ E,
                                                            const uint4* __restrict__ A2,
                                                            const uint4* __restrict__ E2,
                                                            const T* __restrict__ x, const T* __restrict__ bias,
                                                            T* __restrict__ y, float4* __restrict__ ws,
                                                            int* __restrict__ counters, int M, int K, int KS,
                                                            int tiles, int n_out) {
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ int is_last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int C = KS / kU;
  // Stream-K: the (row block, chunk) iterations, row block major, are dealt out evenly to the
  // gridDim.x blocks, which run a contiguous range each, crossing row-block boundaries, so every
  // SM streams the same number of weight bytes whatever N, K and the SM count are.
  const int NI = tiles / kWarps * C, G = gridDim.x, b = blockIdx.x;  // iterations, blocks
  // a * b / c, in 32 bits where the product fits (a 64-bit division is a long software routine)
  const bool narrow = static_cast<uint64_t>(NI + 1) * G < (uint64_t{1} << 32);
  auto muldiv = [&](uint32_t a, uint32_t m, uint32_t c, uint32_t minus) {
    return static_cast<int>(narrow ? (a * m - minus) / c : (static_cast<uint64_t>(a) * m - minus) / c);
  };
  const int s = muldiv(b, NI, G, 0), e = muldiv(b + 1, NI, G, 0);
  auto block_of = [&](int it) { return muldiv(it + 1, G, NI, 1); };  // the block running iteration it
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  // This warp's ring of weight stages; each lane copies (cp.async) and later reads only its own
  // 16-byte slots (packed layout), so no synchronisation beyond cp.async.wait_group is needed.
  uint4* ringw = reinterpret_cast<uint4*>(smem + xs_words<NT>()) + warp * kRingUint4;
  uint4* ring = ringw + lane;
  float* fin = reinterpret_cast<float*>(smem + xs_words<NT>() + (RING ? kWarps * kRingUint4 * 4 : 0));
  // Portable form: SwiGLU's even tiles are gate rows, odd tiles up rows (tile parity = warp parity).
  const T* pv = reinterpret_cast<const T*>(SWIGLU && (warp & 1) ? A2 : A);
  const uint8_t* pm = reinterpret_cast<const uint8_t*>(SWIGLU && (warp & 1) ? E2 : E);
  auto prow0_of = [&](int tile) { return (SWIGLU ? tile >> 1 : tile) * 16; };
  // (row block, chunk) of an iteration, stepped without dividing in the loop
  struct Cursor {
    int rb, c;
    __device__ void next(int C) {
      if (++c == C) c = 0, ++rb;
    }
  };
  const Cursor first{s / C, s % C};

  float acc[NT][4];
  auto zero = [&] {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  };
  zero();

  // Row block rb's result, run by all threads: fragments -> fin[warp][16 rows][8*NT tokens] ->
  // bias (+ SwiGLU) -> coalesced row-major stores.
  auto epilogue = [&](int rb) {
    constexpr int MP = 8 * NT;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) fin[(warp * 16 + g + 8 * (q >> 1)) * MP + 8 * j + 2 * t + (q & 1)] = acc[j][q];
    __syncthreads();
    if (!SWIGLU) {
      const int n0 = rb * kWarps * 16;
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
      const int f0 = rb * F;
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
    // fin is written again only after the main loop's next __syncthreads
  };
  // A row block this block ran all of: straight out. Else the partial goes to this block's slot
  // (0: its range began in rb, 1: it began earlier), unfenced: the block keeps streaming, and
  // settle() publishes both slots once at the end.
  auto finish = [&](const Cursor& at) {  // at: the row block's last iteration in this block
    const int rb = at.rb;
    if (s <= rb * C && at.c == C - 1) {
      epilogue(rb);
      return;
    }
    float4* mine = ws + ((size_t)(2 * b + (s >= rb * C ? 0 : 1)) * kWarps + warp) * NT * 32 + lane;
#pragma unroll
    for (int j = 0; j < NT; ++j) __stcg(mine + j * 32, make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
  };
  // The last of a shared row block's blocks to arrive adds all partials in block order
  // (deterministic, whoever is last) and runs its epilogue.
  auto settle = [&] {
    if (s >= e) return;
    const int rbs[2] = {s / C, (e - 1) / C};
    bool fenced = false;
    for (int i = 0; i < 2; ++i) {
      const int rb = rbs[i];
      if ((i == 1 && rb == rbs[0]) || (s <= rb * C && e >= (rb + 1) * C)) continue;  // done, or ran whole
      if (!fenced) {
        __threadfence();
        __syncthreads();
        fenced = true;
      }
      const int first = block_of(rb * C), last = block_of((rb + 1) * C - 1);
      if (threadIdx.x == 0) is_last = atomicAdd(counters + rb, 1) == last - first;
      __syncthreads();
      if (is_last) {
        __threadfence();
        zero();
        // slot 1 only for the first block, and only if its range began before rb
        const int first_slot = muldiv(first, NI, G, 0) < rb * C ? 1 : 0;
#pragma unroll 4
        for (int q = first; q <= last; ++q) {
          const int slot = q == first ? first_slot : 0;
          const float4* src = ws + ((size_t)(2 * q + slot) * kWarps + warp) * NT * 32 + lane;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const float4 v = __ldcg(src + j * 32);
            acc[j][0] += v.x, acc[j][1] += v.y, acc[j][2] += v.z, acc[j][3] += v.w;
          }
        }
        if (threadIdx.x == 0) counters[rb] = 0;  // ready for the next launch on this stream
        epilogue(rb);
      }
      __syncthreads();  // is_last and fin are reused for the second row block
    }
  };

  static_assert((kStages & (kStages - 1)) == 0, "kStages must be a power of two");
  auto issue = [&](int it, const Cursor& at) {  // weight of iteration it -> stage it % kStages
    if (it < e) {
      const int c = at.c, tile = at.rb * kWarps + warp;
      if constexpr (PORT) {
        uint4* st = ringw + (it & (kStages - 1)) * (kU + 1) * 32;
        const int prow0 = prow0_of(tile);
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
        uint4* st = ring + (it & (kStages - 1)) * (kU + 1) * 32;
        const uint4* Ap = A + ((size_t)tile * KS + c * kU) * 32 + lane;
#pragma unroll
        for (int u = 0; u < kU; ++u) cp_async16(st + u * 32, Ap + u * 32);
        cp_async16(st + kU * 32, E + ((size_t)tile * C + c) * 16 + g * 2 + (t & 1));
      }
    }
    cp_async_commit();  // always one group per iteration, so wait_group counts stay uniform
  };

  if constexpr (RING) {
    Cursor cur = first, ld = first;  // cur: iteration it; ld: the next one to copy
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) {
      issue(s + i, ld);
      ld.next(C);
    }
    XStage<NT> xst;
    if (s < e) {
      xst.load(x32, M, K, first.c);
      xst.store(smem);
    }
    __syncthreads();
    for (int it = s; it < e; ++it) {
      const int buf = (it - s) & 1;
      const bool more = it + 1 < e;
      issue(it + kStages - 1, ld);
      ld.next(C);
      if (more) xst.load(x32, M, K, cur.c + 1 == C ? 0 : cur.c + 1);
      cp_async_wait<kStages - 1>();  // this lane's copies of iteration it have landed
      const uint4* xs = reinterpret_cast<const uint4*>(smem) + buf * (kU * NT * 32);
      if constexpr (PORT) {
        __syncwarp();  // ... and the other lanes' (ldmatrix reads rows other lanes copied)
        const uint4* st = ringw + (it & (kStages - 1)) * (kU + 1) * 32;
        const uint16_t* meta = reinterpret_cast<const uint16_t*>(st + 128);  // 16 rows x 8 halfwords
        const int mat = lane >> 3, r = (lane & 7) + ((mat & 1) << 3);
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int q = 2 * u + (mat >> 1);
          const uint4 a = ldmatrix_x4(st + r * 8 + (q ^ (r & 7)));
          const int h = u * 2 + (t & 1);  // thread t of the pair: k 16t .. 16t + 15 of this k-step
          const uint32_t ev = meta[g * 8 + h] | (static_cast<uint32_t>(meta[(g + 8) * 8 + h]) << 16);
#pragma unroll
          for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], ev);
        }
      } else {
        const uint4* st = ring + (it & (kStages - 1)) * (kU + 1) * 32;
        const uint4 e4 = st[kU * 32];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const uint4 a = st[u * 32];
          const uint32_t ev = pick(e4, u);
#pragma unroll
          for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], ev);
        }
      }
      if (more) xst.store(smem + (buf ^ 1) * (kU * NT * 32 * 4));
      __syncthreads();
      if (!more || cur.c == C - 1) {
        finish(cur);
        zero();
      }
      cur.next(C);
    }
    cp_async_wait<0>();
    settle();
  } else {
    uint4 a_cur[kU], a_nxt[kU], e_cur, e_nxt;
    auto load = [&](const Cursor& at, uint4 (&a)[kU], uint4& ev) {
      const int c = at.c, tile = at.rb * kWarps + warp;
      if constexpr (PORT) {
        // this lane's rows g and g + 8 of the tile (past the weight's end: zeros, and metadata
        // 0x4 per group, which is valid)
        const int row0 = prow0_of(tile) + g;
        const bool ok0 = row0 < n_out, ok1 = row0 + 8 < n_out;
        const T* v0 = pv + (size_t)row0 * (K / 2) + 8 * t + c * 64;
        const T* v1 = v0 + (size_t)8 * (K / 2);
        const uint8_t* m0 = pm + (size_t)row0 * (K / 8) + 8 * (t & 1) + c * 16;
        const uint8_t* m1 = m0 + (size_t)8 * (K / 8);
        const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
        a[0] = ok0 ? ld_stream(reinterpret_cast<const uint4*>(v0)) : zero4;
        a[1] = ok1 ? ld_stream(reinterpret_cast<const uint4*>(v1)) : zero4;
        a[2] = ok0 ? ld_stream(reinterpret_cast<const uint4*>(v0 + 32)) : zero4;
        a[3] = ok1 ? ld_stream(reinterpret_cast<const uint4*>(v1 + 32)) : zero4;
        const uint2 pad = make_uint2(0x44444444u, 0x44444444u);
        const uint2 e0 = ok0 ? ld_stream8(m0) : pad, e1 = ok1 ? ld_stream8(m1) : pad;
        ev = make_uint4(e0.x, e0.y, e1.x, e1.y);
      } else {
        const uint4* Ap = A + ((size_t)tile * KS + c * kU) * 32 + lane;
#pragma unroll
        for (int u = 0; u < kU; ++u) a[u] = ld_stream(Ap + u * 32);
        ev = ld_stream(E + ((size_t)tile * C + c) * 16 + g * 2 + (t & 1));
      }
    };
    XStage<NT, PORT> xst;
    Cursor cur = first, ld = first;  // cur: iteration it; ld: it + 1, loaded one ahead
    if (s < e) {
      load(first, a_cur, e_cur);
      xst.load(x32, M, K, first.c);
      xst.store(smem);
    }
    ld.next(C);
    __syncthreads();
    for (int it = s; it < e; ++it) {
      const int buf = (it - s) & 1;
      const bool more = it + 1 < e;
      if (more) {
        load(ld, a_nxt, e_nxt);
        xst.load(x32, M, K, ld.c);
        ld.next(C);
      }
      const uint4* xs = reinterpret_cast<const uint4*>(smem) + buf * (kU * NT * 32);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        uint4 a = a_cur[u];
        uint32_t ev = pick(e_cur, u);
        if constexpr (PORT) {  // regs: row g groups 4t.., row g + 8 groups 4t.., then 16 + 4t..
          a = make_uint4(pick(a_cur[0], u), pick(a_cur[1], u), pick(a_cur[2], u), pick(a_cur[3], u));
          ev = gather_nibbles(e_cur.x, e_cur.y, u) | (gather_nibbles(e_cur.z, e_cur.w, u) << 16);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], ev);
      }
      if (more) xst.store(smem + (buf ^ 1) * (kU * NT * 32 * 4));
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kU; ++u) a_cur[u] = a_nxt[u];
      e_cur = e_nxt;
      if (!more || cur.c == C - 1) {
        finish(cur);
        zero();
      }
      cur.next(C);
    }
    settle();
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

template <typename T, int NT, bool SW, bool RING, bool PORT>
struct Variant {
  static constexpr auto kernel = decode24_kernel<T, NT, SW, RING, PORT>;
  static constexpr int bytes = smem_bytes<NT, RING>();

  static cudaError_t prepare(int device) {  // once per device: allow > 48 KB of shared memory
    static std::atomic<uint64_t> ready{0};
    if (ready.load() >> device & 1) return cudaSuccess;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess) ready.fetch_or(uint64_t{1} << device);
    return err;
  }
  static cudaError_t launch(const DecodeArgs& a, int device, cudaStream_t stream) {
    if (cudaError_t err = prepare(device); err != cudaSuccess) return err;
    kernel<<<a.blocks, kThreads, bytes, stream>>>(
        static_cast<const uint4*>(a.A), static_cast<const uint4*>(a.E), static_cast<const uint4*>(a.A2),
        static_cast<const uint4*>(a.E2), static_cast<const T*>(a.x), static_cast<const T*>(a.bias),
        static_cast<T*>(a.y), reinterpret_cast<float4*>(a.ws), a.counters, a.M, a.K, a.KS, a.tiles, a.n_out);
    return cudaGetLastError();
  }
  static int resident(int device) {  // blocks per SM x SMs, cached per device
    static std::atomic<int> cached[64] = {};
    const int slot = device & 63;
    if (int v = cached[slot].load(); v > 0) return v;
    int per_sm = 0, sms = 0;
    if (prepare(device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return 0;
    const int v = per_sm * sms;
    cached[slot].store(v);
    return v;
  }
};

// f(Variant<...>{}) for a's variant (dtype, n-tiles, SwiGLU, pipeline, layout).
template <typename T, bool SW, bool RING, bool PORT, typename F>
auto with_nt(const DecodeArgs& a, F&& f) {
  switch (a.nt) {
    case 1: return f(Variant<T, 1, SW, RING, PORT>{});
    case 2: return f(Variant<T, 2, SW, RING, PORT>{});
    case 4: return f(Variant<T, 4, SW, RING, PORT>{});
    default: return f(Variant<T, 8, SW, RING, PORT>{});
  }
}
template <typename T, bool SW, typename F>
auto with_pipeline(const DecodeArgs& a, F&& f) {
  if (a.portable) return a.ring ? with_nt<T, SW, true, true>(a, f) : with_nt<T, SW, false, true>(a, f);
  return a.ring ? with_nt<T, SW, true, false>(a, f) : with_nt<T, SW, false, false>(a, f);
}
template <typename F>
auto with_variant(const DecodeArgs& a, F&& f) {
  if (a.bf16) return a.swiglu ? with_pipeline<__nv_bfloat16, true>(a, f) : with_pipeline<__nv_bfloat16, false>(a, f);
  return a.swiglu ? with_pipeline<__half, true>(a, f) : with_pipeline<__half, false>(a, f);
}

}  // namespace

cudaError_t launch_decode24(const DecodeArgs& a, int device, cudaStream_t stream) {
  return with_variant(a, [&](auto v) { return decltype(v)::launch(a, device, stream); });
}

int decode24_resident_blocks(const DecodeArgs& a, int device) {
  return with_variant(a, [&](auto v) { return decltype(v)::resident(device); });
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
