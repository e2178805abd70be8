// Host side of our small-M 2:4 kernel (decode_gemm.cu): argument checks with clear errors,
// split-K choice, per-stream workspaces, and the entry points bound in module.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <tuple>

#include "decode_gemm.h"

namespace sparseflow {
namespace {

struct Workspace {
  at::Tensor partials, counters;
};

// Split-K scratch. A call being captured into a CUDA graph gets its own, allocated here and released
// when the call returns: the allocator keeps a block freed during capture in that graph's private
// pool for as long as the graph lives, and the counters' zero fill is recorded into the graph (it
// runs at every replay). (Kept in a map instead, every capture, and the dispatcher's timing makes
// hundreds, pinned 4 MB for the life of the process.) Eager calls reuse one workspace per (device,
// stream), so concurrent streams do not race on it and a call allocates nothing; the kernel leaves
// the counters at zero. Only the kMaxEager most recently used are kept (PyTorch hands out up to 32
// pooled streams per device): dropping one is safe, as its blocks are reused only by later work
// on the stream it was allocated for.
constexpr size_t kMaxEager = 4;

Workspace workspace_for(const at::Tensor& like, int64_t partial_floats, int64_t row_blocks) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status == cudaStreamCaptureStatusActive) {
    return {at::empty({std::max<int64_t>(partial_floats, 1)}, like.options().dtype(at::kFloat)),
            at::zeros({std::max<int64_t>(row_blocks, 1)}, like.options().dtype(at::kInt))};
  }
  using Key = std::tuple<int, cudaStream_t>;
  static std::mutex mu;
  static std::list<std::pair<Key, Workspace>> recent;  // most recently used first
  std::lock_guard<std::mutex> lock(mu);
  const Key key{like.get_device(), stream};
  auto it = std::find_if(recent.begin(), recent.end(), [&](const auto& e) { return e.first == key; });
  if (it == recent.end()) {
    recent.emplace_front(key, Workspace{});
    if (recent.size() > kMaxEager) recent.pop_back();
  } else {
    recent.splice(recent.begin(), recent, it);
  }
  Workspace& w = recent.front().second;
  if (!w.partials.defined() || w.partials.numel() < partial_floats) {
    w.partials = at::empty({std::max<int64_t>(partial_floats, 1 << 20)}, like.options().dtype(at::kFloat));
  }
  if (!w.counters.defined() || w.counters.numel() < row_blocks) {
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

}  // namespace

// Default split-K: enough blocks for ~2 per SM (the shared-memory ring allows 2), each split at
// least 2 chunks (256 k) long.
int64_t decode24_default_split(int64_t tiles, int64_t k_padded, int64_t device) {
  const int64_t row_blocks = tiles / kWarps, chunks = k_padded / (kU * 32);
  const int64_t want = 2 * sm_count(static_cast<int>(device));
  int64_t split = std::min<int64_t>((want + row_blocks - 1) / row_blocks, std::max<int64_t>(chunks / 2, 1));
  return std::max<int64_t>(split, 1);
}

// n-tiles of 8 tokens the kernel is instantiated for at m tokens.
static int token_tiles(int64_t m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

// Blocks of the kernel instantiation for m tokens (dtype, SwiGLU, pipeline, reading) resident
// per SM: with the SM count, the grid sizes that are whole waves (the dispatcher's split-K
// candidates; the ring's shared memory allows 2 blocks, the register pipeline 4).
int64_t decode24_blocks_per_sm(int64_t m, bool bf16, bool swiglu, bool ring, bool portable, int64_t device) {
  TORCH_CHECK(m >= 1 && m <= kMaxM, "decode24_blocks_per_sm: m must be in 1..", static_cast<int64_t>(kMaxM));
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // the shared-memory attribute is per device
  DecodeArgs a{};
  a.nt = token_tiles(m);
  a.bf16 = bf16, a.swiglu = swiglu, a.ring = ring, a.portable = portable;
  int per_sm = 0;
  C10_CUDA_CHECK(decode24_occupancy(a, static_cast<int>(device), &per_sm));
  return per_sm;
}

namespace {

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "sparseflow decode kernel: x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparseflow decode kernel: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sparseflow decode kernel: x must be a contiguous 2-D tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0, "sparseflow decode kernel: x must be 4-byte aligned");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "sparseflow decode kernel: M must be in 1..",
              static_cast<int64_t>(kMaxM), ", got ", x.size(0));
}

// Bias check, split-K choice, workspace, launch: shared by the packed and the portable entries.
at::Tensor launch(const at::Tensor& x, const void* A, const void* E, const void* A2, const void* E2,
                  const c10::optional<at::Tensor>& bias, int64_t tiles, int64_t KS, int64_t n_out, bool swiglu,
                  int64_t split, bool ring, bool portable) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->get_device() == x.get_device() && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous() && bias->numel() == (swiglu ? 2 * n_out : n_out),
                "sparseflow decode kernel: bias must be a contiguous ", x.scalar_type(), " vector of ",
                swiglu ? 2 * n_out : n_out, " on x's GPU");
    b = &bias.value();
  }
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t chunks = KS / kU, row_blocks = tiles / kWarps;
  if (split <= 0) split = decode24_default_split(tiles, KS * 32, x.get_device());
  split = std::min<int64_t>(split, chunks);
  const int64_t per = (chunks + split - 1) / split;
  split = (chunks + per - 1) / per;
  const int nt = token_tiles(M);
  auto y = at::empty({M, n_out}, x.options());
  float* ws = nullptr;
  int* counters = nullptr;
  Workspace w;  // held until the launch is enqueued
  if (split > 1) {
    w = workspace_for(x, split * tiles * nt * 32 * 4, row_blocks);
    ws = w.partials.data_ptr<float>();
    counters = w.counters.data_ptr<int>();
  }
  DecodeArgs args{A, E, A2, E2, x.data_ptr(), b ? b->data_ptr() : nullptr, y.data_ptr(), ws, counters,
                  static_cast<int>(M), static_cast<int>(K), static_cast<int>(KS), static_cast<int>(tiles),
                  static_cast<int>(n_out), static_cast<int>(per), static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(split), nt, x.scalar_type() == at::kBFloat16, swiglu, ring, portable};
  C10_CUDA_CHECK(launch_decode24(args, x.get_device(), at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace

// x: M x K (contiguous, 4-byte aligned), A: tiles x KS x 32 x 4 int32, E: tiles x KS/4 x 16 x 4
// int32 (sparseflow/kernels/decode.py). Returns y: M x n_out.
at::Tensor decode24_mm(const at::Tensor& x, const at::Tensor& A, const at::Tensor& E,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, bool swiglu, int64_t split,
                       bool ring) {
  check_x(x);
  TORCH_CHECK(A.is_cuda() && E.is_cuda(), "sparseflow decode kernel: tensors must be CUDA");
  TORCH_CHECK(x.get_device() == A.get_device() && A.get_device() == E.get_device(),
              "sparseflow decode kernel: x and the packed weight are on different GPUs");
  const int64_t K = x.size(1);
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
  return launch(x, A.data_ptr(), E.data_ptr(), nullptr, nullptr, bias, tiles, KS, n_out, swiglu, split, ring, false);
}

// The same kernel on the portable form (sparseflow/format.py): values n x K/2 (x's dtype), meta
// n x K/8 uint8, K a multiple of 128, both 16-byte aligned; for SwiGLU values2/meta2 are up's.
at::Tensor decode24_mm_portable(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                const c10::optional<at::Tensor>& values2, const c10::optional<at::Tensor>& meta2,
                                const c10::optional<at::Tensor>& bias, bool swiglu, int64_t split, bool ring) {
  check_x(x);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % (kU * 32) == 0, "sparseflow decode kernel (portable form): K=", K, " is not a multiple of ",
              kU * 32);
  auto check_pair = [&](const at::Tensor& v, const at::Tensor& m, const char* what) {
    TORCH_CHECK(v.is_cuda() && m.is_cuda() && v.get_device() == x.get_device() && m.get_device() == x.get_device(),
                "sparseflow decode kernel: ", what, " must be on x's GPU");
    TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.dim() == 2 && v.size(1) == K / 2 && v.is_contiguous(),
                "sparseflow decode kernel: ", what, " values must be a contiguous ", x.scalar_type(), " n x ", K / 2,
                " tensor, got ", v.scalar_type(), " ", v.sizes());
    TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 2 && m.size(0) == v.size(0) && m.size(1) == K / 8 &&
                    m.is_contiguous(),
                "sparseflow decode kernel: ", what, " metadata must be a contiguous uint8 ", v.size(0), " x ", K / 8,
                " tensor, got ", m.scalar_type(), " ", m.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(m.data_ptr()) % 16 == 0,
                "sparseflow decode kernel: ", what, " values and metadata must be 16-byte aligned");
  };
  check_pair(values, meta, swiglu ? "gate" : "weight");
  const int64_t n = values.size(0);
  const void* v2 = nullptr;
  const void* m2 = nullptr;
  if (swiglu) {
    TORCH_CHECK(values2.has_value() && meta2.has_value() && values2->defined() && meta2->defined(),
                "sparseflow decode kernel: SwiGLU needs up's values and metadata");
    check_pair(*values2, *meta2, "up");
    TORCH_CHECK(values2->size(0) == n, "sparseflow decode kernel: gate and up differ in rows");
    v2 = values2->data_ptr();
    m2 = meta2->data_ptr();
  }
  int64_t tiles = (n + 15) / 16 * (swiglu ? 2 : 1);
  tiles = (tiles + kWarps - 1) / kWarps * kWarps;
  return launch(x, values.data_ptr(), meta.data_ptr(), v2, m2, bias, tiles, K / 32, n, swiglu, split, ring, true);
}

// a, b: cases x 32 x 4 int32 (per-lane registers), e: cases x 32 int32 -> d: cases x 32 x 4 float.
at::Tensor mma_sp_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e, bool bf16) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kInt && a.is_contiguous() && a.dim() == 3 && a.size(1) == 32 &&
                  a.size(2) == 4 && b.sizes() == a.sizes() && b.is_contiguous() && e.is_contiguous() &&
                  e.numel() == a.size(0) * 32,
              "mma_sp_probe: bad arguments");
  c10::cuda::CUDAGuard guard(a.device());
  auto d = at::empty({a.size(0), 32, 4}, a.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_mma_sp_probe(bf16, a.data_ptr(), b.data_ptr(), e.data_ptr(), d.data_ptr(),
                                     static_cast<int>(a.size(0)), at::cuda::getCurrentCUDAStream()));
  return d;
}

}  // namespace sparseflow
