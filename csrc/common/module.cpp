// Python bindings of the sparseflow CUDA extension (imported as sparseflow._C).
#include <torch/extension.h>

namespace sparseflow {
at::Tensor cslt_compress(const at::Tensor& dense, int64_t layout);
at::Tensor cslt_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n, std::vector<int64_t> cfg, int64_t layout);
std::vector<int64_t> cslt_search(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t layout,
                                 int64_t search_ws_mb);
int64_t cslt_version();
int64_t cslt_alg_count(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t layout);
std::vector<int64_t> plan_cache_stats();
at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& meta, int64_t k);
at::Tensor decode24_mm(const at::Tensor& x, const at::Tensor& A, const at::Tensor& E,
                       const c10::optional<at::Tensor>& bias, int64_t n_out, bool swiglu, int64_t split,
                       bool ring);
at::Tensor decode24_mm_portable(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                const c10::optional<at::Tensor>& values2, const c10::optional<at::Tensor>& meta2,
                                const c10::optional<at::Tensor>& bias, bool swiglu, int64_t split, bool ring);
int64_t decode24_default_split(int64_t tiles, int64_t k_padded, int64_t device);
int64_t decode24_blocks_per_sm(int64_t m, bool bf16, bool swiglu, bool ring, bool portable, int64_t device);
at::Tensor mma_sp_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e, bool bf16);
}  // namespace sparseflow

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparseflow CUDA extension: cuSPARSELt 2:4 GEMM with cached plans, our small-M 2:4 kernel, 2:4 format kernels";
  m.def("cslt_compress", &sparseflow::cslt_compress, "2:4 dense N x K -> cuSPARSELt compressed buffer");
  m.def("cslt_mm", &sparseflow::cslt_mm, "y = x @ W^T through a cached cuSPARSELt plan",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("cfg"), py::arg("layout"));
  m.def("cslt_search", &sparseflow::cslt_search, "cusparseLtMatmulSearch; returns the winning config");
  m.def("cslt_alg_count", &sparseflow::cslt_alg_count, "number of cuSPARSELt algorithm configs for a problem");
  m.def("cslt_version", &sparseflow::cslt_version, "cuSPARSELt version as major*1000+minor*100+patch");
  m.def("plan_cache_stats", &sparseflow::plan_cache_stats, "[plans cached, plans created]");
  m.def("decode24_mm", &sparseflow::decode24_mm, "our small-M 2:4 kernel (mma.sp) on a packed weight",
        py::arg("x"), py::arg("A"), py::arg("E"), py::arg("bias"), py::arg("n_out"), py::arg("swiglu"),
        py::arg("split"), py::arg("ring"));
  m.def("decode24_mm_portable", &sparseflow::decode24_mm_portable,
        "our small-M 2:4 kernel reading the portable form directly (K % 128 == 0)", py::arg("x"), py::arg("values"),
        py::arg("meta"), py::arg("values2"), py::arg("meta2"), py::arg("bias"), py::arg("swiglu"), py::arg("split"),
        py::arg("ring"));
  m.def("decode24_default_split", &sparseflow::decode24_default_split, "split-K the decode kernel uses by default");
  m.def("decode24_blocks_per_sm", &sparseflow::decode24_blocks_per_sm,
        "blocks of the decode kernel for m tokens resident per SM", py::arg("m"), py::arg("bf16"), py::arg("swiglu"),
        py::arg("ring"), py::arg("portable"), py::arg("device"));
  m.def("mma_sp_probe", &sparseflow::mma_sp_probe, "one mma.sp on raw per-lane registers (layout tests)");
  m.def("decompress_24", &sparseflow::decompress_24, "portable 2:4 form -> dense (CUDA)");
}
