// Python bindings of the CUTLASS sm90 2:4 GEMM (imported as sparseflow._cutlass; built only where
// CUTLASS's headers are found, for sm_90a). sparseflow/kernels/cutlass.py checks every argument first
// (linear() allocates the output here, mm() takes it); these functions report a failure as a
// returned message, never by throwing (on the H200 an exception thrown from this module ended the
// Python process with a segmentation fault instead of raising; see "C++ exceptions" in
// benchmarks/NOTES.md), and re-check only what would otherwise corrupt memory.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cutlass_gemm.cuh"

namespace sparseflow::cutlass24 {

static bool half_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::vector<std::string> configs(bool bf16) { return bf16 ? Ops<true>::names() : Ops<false>::names(); }

// [compressed values, metadata bytes, compressor workspace bytes] for an N x K weight
std::vector<int64_t> sizes(bool bf16, int64_t n, int64_t k) {
  Sizes s = bf16 ? Ops<true>::sizes(int(n), int(k)) : Ops<false>::sizes(int(n), int(k));
  return {s.a_elems, s.e_bytes, s.workspace};
}

int64_t workspace(bool bf16, int64_t cfg, int64_t n, int64_t m, int64_t k, int64_t device) {
  // the query sets the kernel up on `device` (shared memory limit, clusters that fit) as run does
  if (device < 0 || device >= at::cuda::device_count()) return 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return bf16 ? Ops<true>::workspace(int(cfg), int(n), int(m), int(k), int(device))
              : Ops<false>::workspace(int(cfg), int(n), int(m), int(k), int(device));
}

// dense N x K (2:4) -> a, e (sized by sizes()); "" or what failed
std::string compress(const at::Tensor& dense, at::Tensor& a, at::Tensor& e, at::Tensor& ws) {
  if (!dense.is_cuda() || dense.dim() != 2 || !dense.is_contiguous() || !half_or_bf16(dense))
    return "dense must be a contiguous 2-D float16/bfloat16 CUDA tensor";
  bool bf16 = dense.scalar_type() == at::kBFloat16;
  int64_t n = dense.size(0), k = dense.size(1);
  if (n <= 0 || k <= 0 || n % kAlignN || k % kAlignK) return "N or K not aligned";
  auto s = sizes(bf16, n, k);
  if (a.numel() != s[0] || a.scalar_type() != dense.scalar_type() || e.numel() != s[1] || ws.numel() < s[2])
    return "output buffers do not match sizes()";
  c10::cuda::CUDAGuard guard(dense.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  int dev = dense.get_device();
  return bf16 ? Ops<true>::compress(dense.data_ptr(), a.data_ptr(), e.data_ptr(), ws.data_ptr(), n, k, dev, stream)
              : Ops<false>::compress(dense.data_ptr(), a.data_ptr(), e.data_ptr(), ws.data_ptr(), n, k, dev, stream);
}

// The checks and the launch behind mm() and linear(); ws_bytes: what the caller allocated at w
// (the run checks it against what the configuration needs).
static std::string run_mm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& e, at::Tensor& y, void* w,
                          int64_t ws_bytes, int64_t cfg) {
  if (!x.is_cuda() || x.dim() != 2 || !x.is_contiguous() || !half_or_bf16(x) || y.dim() != 2 ||
      !y.is_contiguous() || y.scalar_type() != x.scalar_type() || a.scalar_type() != x.scalar_type())
    return "x and y must be contiguous 2-D CUDA tensors of the weight's dtype";
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 || reinterpret_cast<uintptr_t>(y.data_ptr()) % 16)
    return "x and y must be 16-byte aligned";
  bool bf16 = x.scalar_type() == at::kBFloat16;
  int64_t m = x.size(0), k = x.size(1), n = y.size(1);
  if (y.size(0) != m || n <= 0 || k <= 0 || n % kAlignN || k % kAlignK) return "shapes do not match";
  auto s = sizes(bf16, n, k);
  if (a.numel() != s[0] || e.numel() != s[1]) return "the compressed weight does not match N and K";
  if (cfg < 0 || cfg >= kConfigs) return "no such configuration";  // per call: no name strings built
  if (a.get_device() != x.get_device() || e.get_device() != x.get_device() || y.get_device() != x.get_device())
    return "x, y and the weight must be on one device";
  if (m == 0) return "";
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  int dev = x.get_device();
  return bf16 ? Ops<true>::gemm(int(cfg), a.data_ptr(), e.data_ptr(), x.data_ptr(), y.data_ptr(), n, m, k, w,
                                ws_bytes, dev, stream)
              : Ops<false>::gemm(int(cfg), a.data_ptr(), e.data_ptr(), x.data_ptr(), y.data_ptr(), n, m, k, w,
                                 ws_bytes, dev, stream);
}

// y (M x N) = x (M x K) @ W^T with W as compress()'s (a, e); "" or what failed
std::string mm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& e, at::Tensor& y,
               const c10::optional<at::Tensor>& ws, int64_t cfg) {
  if (ws.has_value() && (ws->scalar_type() != at::kByte || !ws->is_cuda() || ws->get_device() != x.get_device()))
    return "the workspace must be a uint8 tensor on x's device";
  return run_mm(x, a, e, y, ws.has_value() ? ws->data_ptr() : nullptr, ws.has_value() ? ws->numel() : 0, cfg);
}

// mm() with y and the workspace (ws_bytes, as workspace() gave it) allocated here: the hot path
// (sparseflow.kernels.cutlass.mm_unchecked). A torch.empty from Python cost 3.4 us of host time on the
// H200's host, at::empty here ~2 us less (measured with scripts/probe_host_cost.py). Returns (y, "")
// or (None, what failed).
std::tuple<c10::optional<at::Tensor>, std::string> linear(const at::Tensor& x, const at::Tensor& a,
                                                           const at::Tensor& e, int64_t n, int64_t ws_bytes,
                                                           int64_t cfg) {
  if (!x.is_cuda() || x.dim() != 2 || n <= 0 || ws_bytes < 0)
    return {c10::nullopt, "x must be a 2-D CUDA tensor, N and the workspace size positive"};
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::Tensor ws;
  if (ws_bytes) ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  std::string err = run_mm(x, a, e, y, ws_bytes ? ws.data_ptr() : nullptr, ws_bytes, cfg);
  if (!err.empty()) return {c10::nullopt, err};
  return {y, err};
}

}  // namespace sparseflow::cutlass24

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace c = sparseflow::cutlass24;
  m.doc() = "sparseflow's CUTLASS sm90 2:4 GEMM (Hopper, wgmma.sp)";
  m.def("configs", &c::configs, "names of the compiled configurations", py::arg("bf16"));
  m.def("sizes", &c::sizes, "[values, metadata bytes, compressor workspace bytes] of an N x K weight");
  m.def("workspace", &c::workspace, "workspace bytes of one GEMM");
  m.def("compress", &c::compress, "dense 2:4 N x K -> (a, e) in CUTLASS's sm90 order; '' or the failure");
  m.def("mm", &c::mm, "y = x @ W^T with W from compress(); '' or the failure", py::arg("x"), py::arg("a"),
        py::arg("e"), py::arg("y"), py::arg("ws"), py::arg("cfg"));
  m.def("linear", &c::linear, "mm() with y and the workspace allocated here: (y, '') or (None, the failure)",
        py::arg("x"), py::arg("a"), py::arg("e"), py::arg("n"), py::arg("ws_bytes"), py::arg("cfg"));
  m.attr("ALIGN_N") = c::kAlignN;
  m.attr("ALIGN_K") = c::kAlignK;
  m.attr("CONFIGS") = c::kConfigs;
}
