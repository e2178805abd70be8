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
// * Weight fragments stream through a per-warp cp.async ring in shared memory, kStages - 1 chunks
//   ahead of the one being multiplied, so each SM keeps ~100 KB of loads in flight.
// * Split-K across blocks (grid.y) fills all SMs when N is small (a 4096-row layer is only 32
//   blocks): each split writes fp32 partials, the last block to finish a row block (atomic
//   counter, reset by that block) adds them in a fixed order, so results are deterministic.
// * Epilogue through shared memory: bias, optional SwiGLU (gate/up tiles interleaved in the
//   packed weight: silu(gate) * up is written once, never the 2x-wide intermediate), coalesced
//   row-major stores.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <atomic>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace sparseflow {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kU = 4;       // k-steps (of 32) per chunk
constexpr int kStages = 4;  // weight chunks in flight per warp (cp.async ring in shared memory)
constexpr int kMaxM = 64;

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
template <int NT>
struct XStage {
  static constexpr int kTotal = 8 * NT * 16;
  static constexpr int kPieces = (kTotal + kThreads - 1) / kThreads;
  uint32_t w[kPieces][4];

  __device__ __forceinline__ void load(const uint32_t* __restrict__ x32, int M, int K, int chunk) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int p = threadIdx.x + i * kThreads;
      const int m = p >> 4, k = chunk * 128 + (p & 15) * 8;
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const bool ok = p < kTotal && m < M && k + 2 * h < K;
        w[i][h] = ok ? __ldg(x32 + ((size_t)m * K + k) / 2 + h) : 0u;
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
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int NT>
__host__ __device__ constexpr int xs_words() {  // double-buffered B fragments (reused as the epilogue's tile)
  return 2 * kU * NT * 32 * 4;
}
constexpr int kRingUint4 = kStages * (kU + 1) * 32;  // per warp: per stage kU A fragments + metadata
template <int NT>
__host__ __device__ constexpr int smem_bytes() {
  return xs_words<NT>() * 4 + kWarps * kRingUint4 * 16;
}

template <typename T, int NT, bool SWIGLU>
__global__ void __launch_bounds__(kThreads) decode24_kernel(const uint4* __restrict__ A, const uint4* __restrict__ E,
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

  auto issue = [&](int c) {  // weight fragments of chunk c -> stage c % kStages
    if (c < c1) {
      uint4* st = ring + (c % kStages) * (kU + 1) * 32;
#pragma unroll
      for (int u = 0; u < kU; ++u) cp_async16(st + u * 32, Ap + (size_t)(c * kU + u) * 32);
      cp_async16(st + kU * 32, Ep + (size_t)c * 16);
    }
    cp_async_commit();  // always one group per chunk, so wait_group counts stay uniform
  };

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

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
    const uint4* st = ring + (c % kStages) * (kU + 1) * 32;
    const uint4 e4 = st[kU * 32];
    const uint4* xs = reinterpret_cast<const uint4*>(smem) + buf * (kU * NT * 32);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const uint4 a = st[u * 32];
      const uint32_t e = pick(e4, u);
#pragma unroll
      for (int j = 0; j < NT; ++j) MmaSp<T>::run(acc[j], a, xs[(u * NT + j) * 32 + lane], e);
    }
    if (more) xst.store(smem + (buf ^ 1) * (kU * NT * 32 * 4));
    __syncthreads();
  }
  cp_async_wait<0>();

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

struct Workspace {
  at::Tensor partials, counters;
  std::vector<at::Tensor> retired;  // kept alive: captured CUDA graphs may still point at them
};

Workspace& workspace_for(const at::Tensor& like, int64_t partial_floats, int64_t row_blocks) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, Workspace> spaces;  // one per stream: no cross-stream races
  std::lock_guard<std::mutex> lock(mu);
  auto& w = spaces[{like.get_device(), at::cuda::getCurrentCUDAStream().stream()}];
  if (!w.partials.defined() || w.partials.numel() < partial_floats) {
    if (w.partials.defined()) w.retired.push_back(w.partials);
    w.partials = at::empty({std::max<int64_t>(partial_floats, 1 << 20)}, like.options().dtype(at::kFloat));
  }
  if (!w.counters.defined() || w.counters.numel() < row_blocks) {
    if (w.counters.defined()) w.retired.push_back(w.counters);
    w.counters = at::zeros({std::max<int64_t>(row_blocks, 4096)}, like.options().dtype(at::kInt));
  }
  return w;
}

int sm_count(int device) {
  static std::mutex mu;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mu);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return counts[device] = n;
}

template <typename T, int NT, bool SW>
void launch(dim3 grid, const at::Tensor& x, const at::Tensor& A, const at::Tensor& E, const at::Tensor* bias,
            at::Tensor& y, float* ws, int* counters, int M, int K, int KS, int tiles, int n_out, int per) {
  constexpr int bytes = smem_bytes<NT>();
  static std::atomic<uint64_t> ready{0};  // devices on which the kernel may use > 48 KB of shared memory
  const int dev = x.get_device();
  if (!(ready.load() >> dev & 1)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(decode24_kernel<T, NT, SW>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    ready.fetch_or(uint64_t{1} << dev);
  }
  decode24_kernel<T, NT, SW><<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(A.data_ptr()), reinterpret_cast<const uint4*>(E.data_ptr()),
      reinterpret_cast<const T*>(x.data_ptr()), bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
      reinterpret_cast<T*>(y.data_ptr()), reinterpret_cast<float4*>(ws), counters, M, K, KS, tiles, n_out, per);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool SW>
void dispatch_nt(int nt, dim3 grid, const at::Tensor& x, const at::Tensor& A, const at::Tensor& E,
                 const at::Tensor* bias, at::Tensor& y, float* ws, int* counters, int M, int K, int KS, int tiles,
                 int n_out, int per) {
  switch (nt) {
    case 1: return launch<T, 1, SW>(grid, x, A, E, bias, y, ws, counters, M, K, KS, tiles, n_out, per);
    case 2: return launch<T, 2, SW>(grid, x, A, E, bias, y, ws, counters, M, K, KS, tiles, n_out, per);
    case 4: return launch<T, 4, SW>(grid, x, A, E, bias, y, ws, counters, M, K, KS, tiles, n_out, per);
    default: return launch<T, 8, SW>(grid, x, A, E, bias, y, ws, counters, M, K, KS, tiles, n_out, per);
  }
}

}  // namespace

// Default split-K: enough blocks for ~2 per SM (the shared-memory ring allows 2), each split at
// least 2 chunks (256 k) long.
int64_t decode24_default_split(int64_t tiles, int64_t k_padded, int64_t device) {
  const int64_t row_blocks = tiles / kWarps, chunks = k_padded / (kU * 32);
  const int64_t want = 2 * sm_count(static_cast<int>(device));
  int64_t split = std::min<int64_t>((want + row_blocks - 1) / row_blocks, std::max<int64_t>(chunks / 2, 1));
  return std::max<int64_t>(split, 1);
}

// x: M x K (contiguous, 4-byte aligned), A: tiles x KS x 32 x 4 int32, E: tiles x KS/4 x 16 x 4
// int32 (sparseflow/decode.py). Returns y: M x n_out.
at::Tensor decode24_mm(const at::Tensor& x, const at::Tensor& A, const at::Tensor& E,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, bool swiglu, int64_t split) {
  TORCH_CHECK(x.is_cuda() && A.is_cuda() && E.is_cuda(), "sparseflow decode kernel: tensors must be CUDA");
  TORCH_CHECK(x.get_device() == A.get_device() && A.get_device() == E.get_device(),
              "sparseflow decode kernel: x and the packed weight are on different GPUs");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparseflow decode kernel: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sparseflow decode kernel: x must be a contiguous 2-D tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0, "sparseflow decode kernel: x must be 4-byte aligned");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "sparseflow decode kernel: M must be in 1..", static_cast<int64_t>(kMaxM), ", got ", M);
  TORCH_CHECK(A.scalar_type() == at::kInt && A.dim() == 4 && A.size(2) == 32 && A.size(3) == 4,
              "sparseflow decode kernel: bad packed values ", A.sizes());
  const int64_t tiles = A.size(0), KS = A.size(1);
  TORCH_CHECK(tiles % kWarps == 0 && KS % kU == 0 && KS * 32 >= K && KS * 32 < K + kU * 32,
              "sparseflow decode kernel: packed weight (", tiles, " tiles, ", KS, " k-steps) does not fit K=", K);
  TORCH_CHECK(E.scalar_type() == at::kInt && E.dim() == 4 && E.size(0) == tiles && E.size(1) == KS / kU &&
                  E.size(2) == 16 && E.size(3) == 4,
              "sparseflow decode kernel: bad packed metadata ", E.sizes());
  const int64_t rows = swiglu ? tiles / 2 * 16 : tiles * 16;
  TORCH_CHECK(n_out >= 1 && n_out <= rows, "sparseflow decode kernel: n_out=", n_out, " exceeds the packed rows ", rows);
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == (swiglu ? 2 * n_out : n_out),
                "sparseflow decode kernel: bias must be a contiguous ", x.scalar_type(), " vector of ",
                swiglu ? 2 * n_out : n_out);
    b = &bias.value();
  }
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t chunks = KS / kU, row_blocks = tiles / kWarps;
  if (split <= 0) split = decode24_default_split(tiles, KS * 32, x.get_device());
  split = std::min<int64_t>(split, chunks);
  const int64_t per = (chunks + split - 1) / split;
  split = (chunks + per - 1) / per;
  const int nt = M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8;
  auto y = at::empty({M, n_out}, x.options());
  float* ws = nullptr;
  int* counters = nullptr;
  if (split > 1) {
    auto& w = workspace_for(x, split * tiles * nt * 32 * 4, row_blocks);
    ws = w.partials.data_ptr<float>();
    counters = w.counters.data_ptr<int>();
  }
  dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(split));
  const int iM = static_cast<int>(M), iK = static_cast<int>(K), iKS = static_cast<int>(KS);
  const int it = static_cast<int>(tiles), in = static_cast<int>(n_out), ip = static_cast<int>(per);
  if (x.scalar_type() == at::kHalf) {
    if (swiglu) dispatch_nt<__half, true>(nt, grid, x, A, E, b, y, ws, counters, iM, iK, iKS, it, in, ip);
    else dispatch_nt<__half, false>(nt, grid, x, A, E, b, y, ws, counters, iM, iK, iKS, it, in, ip);
  } else {
    if (swiglu) dispatch_nt<__nv_bfloat16, true>(nt, grid, x, A, E, b, y, ws, counters, iM, iK, iKS, it, in, ip);
    else dispatch_nt<__nv_bfloat16, false>(nt, grid, x, A, E, b, y, ws, counters, iM, iK, iKS, it, in, ip);
  }
  return y;
}

// a, b: cases x 32 x 4 int32 (per-lane registers), e: cases x 32 int32 -> d: cases x 32 x 4 float.
at::Tensor mma_sp_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e, bool bf16) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kInt && a.is_contiguous() && a.dim() == 3 && a.size(1) == 32 &&
                  a.size(2) == 4 && b.sizes() == a.sizes() && b.is_contiguous() && e.is_contiguous() &&
                  e.numel() == a.size(0) * 32,
              "mma_sp_probe: bad arguments");
  c10::cuda::CUDAGuard guard(a.device());
  auto d = at::empty({a.size(0), 32, 4}, a.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* pa = reinterpret_cast<const uint4*>(a.data_ptr());
  const auto* pb = reinterpret_cast<const uint4*>(b.data_ptr());
  const auto* pe = reinterpret_cast<const uint32_t*>(e.data_ptr());
  auto* pd = reinterpret_cast<float4*>(d.data_ptr());
  if (bf16) mma_probe_kernel<__nv_bfloat16><<<a.size(0), 32, 0, stream>>>(pa, pb, pe, pd);
  else mma_probe_kernel<__half><<<a.size(0), 32, 0, stream>>>(pa, pb, pe, pd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace sparseflow
