// Host side of our small-M 2:4 kernel (decode_gemm.cu): argument checks with clear errors,
// split-K choice, per-stream workspaces, and the entry points bound in module.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <vector>

#include "decode_gemm.h"

namespace sparseflow {
namespace {

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
                       const c10::optional<at::Tensor>& bias, int64_t n_out, bool swiglu, int64_t split,
                       bool ring) {
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
  DecodeArgs args{A.data_ptr(), E.data_ptr(), x.data_ptr(), b ? b->data_ptr() : nullptr, y.data_ptr(), ws, counters,
                  static_cast<int>(M), static_cast<int>(K), static_cast<int>(KS), static_cast<int>(tiles),
                  static_cast<int>(n_out), static_cast<int>(per), static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(split), nt, x.scalar_type() == at::kBFloat16, swiglu, ring};
  C10_CUDA_CHECK(launch_decode24(args, x.get_device(), at::cuda::getCurrentCUDAStream()));
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
  C10_CUDA_CHECK(launch_mma_sp_probe(bf16, a.data_ptr(), b.data_ptr(), e.data_ptr(), d.data_ptr(),
                                     static_cast<int>(a.size(0)), at::cuda::getCurrentCUDAStream()));
  return d;
}

}  // namespace sparseflow
