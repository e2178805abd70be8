// Python bindings of the CUTLASS sm90 2:4 GEMM (imported as sparseflow._cutlass; built only where
// CUTLASS's headers are found, for sm_90a). Checks here name the problem before any CUDA call.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cutlass_gemm.cuh"

namespace sparseflow::cutlass24 {

static bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "sparseflow CUTLASS 2:4 GEMM: float16 or bfloat16 tensors only, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

static void check_shape(int64_t n, int64_t k) {
  TORCH_CHECK(n > 0 && n % kAlignN == 0 && k > 0 && k % kAlignK == 0, "sparseflow CUTLASS 2:4 GEMM: N (", n,
              ") must be a multiple of ", kAlignN, " and K (", k, ") of ", kAlignK);
  TORCH_CHECK(n < (int64_t(1) << 31) && k < (int64_t(1) << 31), "sparseflow CUTLASS 2:4 GEMM: N and K must fit in int32");
}

static Sizes sizes_of(bool bf16, int64_t n, int64_t k) {
  return bf16 ? Ops<true>::sizes(int(n), int(k)) : Ops<false>::sizes(int(n), int(k));
}

std::vector<std::string> configs(bool bf16) { return bf16 ? Ops<true>::names() : Ops<false>::names(); }

// dense N x K (2:4) -> (values, metadata) in CUTLASS's sm90 order
std::tuple<at::Tensor, at::Tensor> compress(const at::Tensor& dense) {
  TORCH_CHECK(dense.is_cuda() && dense.dim() == 2 && dense.is_contiguous(),
              "sparseflow CUTLASS compress: need a contiguous 2-D CUDA tensor");
  bool bf16 = is_bf16(dense);
  int64_t n = dense.size(0), k = dense.size(1);
  check_shape(n, k);
  c10::cuda::CUDAGuard guard(dense.device());
  Sizes s = sizes_of(bf16, n, k);
  auto a = at::empty({s.a_elems}, dense.options());
  auto e = at::empty({s.e_bytes}, dense.options().dtype(at::kByte));
  auto ws = at::zeros({std::max<int64_t>(s.workspace, 1)}, dense.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  int dev = dense.get_device();
  std::string err = bf16 ? Ops<true>::compress(dense.data_ptr(), a.data_ptr(), e.data_ptr(), ws.data_ptr(), n, k, dev,
                                               stream)
                         : Ops<false>::compress(dense.data_ptr(), a.data_ptr(), e.data_ptr(), ws.data_ptr(), n, k,
                                                dev, stream);
  TORCH_CHECK(err.empty(), "sparseflow CUTLASS compress (", n, " x ", k, ") failed: ", err);
  return {a, e};
}

// y (M x n) = x (M x K) @ W^T, W given as compress()'s (a, e)
at::Tensor mm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& e, int64_t n, int64_t cfg) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "sparseflow CUTLASS 2:4 GEMM: x must be a contiguous 2-D CUDA tensor");
  bool bf16 = is_bf16(x);
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && a.device() == x.device() && e.device() == x.device(),
              "sparseflow CUTLASS 2:4 GEMM: x and the weight differ in dtype or device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "sparseflow CUTLASS 2:4 GEMM: x must be 16-byte aligned");
  int64_t m = x.size(0), k = x.size(1);
  check_shape(n, k);
  TORCH_CHECK(m < (int64_t(1) << 31), "sparseflow CUTLASS 2:4 GEMM: M must fit in int32");
  auto names = configs(bf16);
  TORCH_CHECK(cfg >= 0 && cfg < int64_t(names.size()), "sparseflow CUTLASS 2:4 GEMM: config ", cfg, " out of range 0..",
              names.size() - 1);
  Sizes s = sizes_of(bf16, n, k);
  TORCH_CHECK(a.numel() == s.a_elems && e.numel() == s.e_bytes,
              "sparseflow CUTLASS 2:4 GEMM: the compressed weight does not match N = ", n, ", K = ", k);
  auto y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  c10::cuda::CUDAGuard guard(x.device());
  int dev = x.get_device();
  int64_t wsb = bf16 ? Ops<true>::workspace(cfg, n, m, k, dev) : Ops<false>::workspace(cfg, n, m, k, dev);
  at::Tensor ws;
  if (wsb > 0) ws = at::empty({wsb}, x.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  void* wsp = wsb > 0 ? ws.data_ptr() : nullptr;
  std::string err = bf16 ? Ops<true>::gemm(cfg, a.data_ptr(), e.data_ptr(), x.data_ptr(), y.data_ptr(), n, m, k, wsp,
                                           dev, stream)
                         : Ops<false>::gemm(cfg, a.data_ptr(), e.data_ptr(), x.data_ptr(), y.data_ptr(), n, m, k, wsp,
                                            dev, stream);
  TORCH_CHECK(err.empty(), "sparseflow CUTLASS 2:4 GEMM (", names[cfg], ", M = ", m, ", N = ", n, ", K = ", k,
              ") failed: ", err);
  return y;
}

}  // namespace sparseflow::cutlass24

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace c = sparseflow::cutlass24;
  m.doc() = "sparseflow's CUTLASS sm90 2:4 GEMM (Hopper, wgmma.sp)";
  m.def("configs", &c::configs, "names of the compiled configurations", py::arg("bf16"));
  m.def("compress", &c::compress, "dense 2:4 N x K -> (values, metadata) in CUTLASS's sm90 order");
  m.def("mm", &c::mm, "y = x @ W^T with W from compress()", py::arg("x"), py::arg("a"), py::arg("e"), py::arg("n"),
        py::arg("cfg"));
  m.attr("ALIGN_N") = c::kAlignN;
  m.attr("ALIGN_K") = c::kAlignK;
}
