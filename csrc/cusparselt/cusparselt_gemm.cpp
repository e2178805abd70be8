// y = x @ W^T with W 2:4-sparse, through cuSPARSELt, planned once and reused.
//
// cuSPARSELt computes D = op(A) op(B) with one structured operand. Layouts (all copy-free for a
// row-major x and W, except where noted):
//   0 kSparseA:    A = W (N x K row), B = x as K x M col, D = N x M col  == y (M x N) row-major
//   1 kSparseAT:   A = W (N x K row), B = x as K x M col, D = N x M row  == y^T (needs a transpose)
//   2 kSparseB:    A = x (M x K row), B = W as K x N col (structured), D = M x N row == y
//   3 kSparseATBt: as 1, but x described as PyTorch's _cslt_sparse_mm does: M x K row, opB = T
//   4 kSparseABt:  as 0, with that description of x
// On an H200 with cuSPARSELt 0.8.0 (benchmarks/probe_cusparselt_layouts.py): layout 4 is the
// fastest with its best algorithm (1.46-1.52x over cuBLAS at M=4096), but its search fails and
// some of its algorithms hit an illegal instruction (M=8, M=2048); layouts 0 and 2 crash inside
// the search. Layout 1 searches and runs safely and is the default (sparseflow.kernels.cusparselt.cslt_layout).
//
// Plans are cached per (device, dtype, N, K, M, algorithm config); creating them per call is what
// makes PyTorch's _cslt_sparse_mm slow. M is padded to a multiple of 16 (cuSPARSELt's alignment
// for 16-bit operands), so M=1 works.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparseLt.h>

#include <array>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace sparseflow {

#define SF_CSLT_CHECK(expr)                                                                   \
  do {                                                                                        \
    cusparseStatus_t _st = (expr);                                                            \
    TORCH_CHECK(_st == CUSPARSE_STATUS_SUCCESS, "sparseflow: cuSPARSELt call ", #expr,        \
                " failed: ", cusparseLtGetErrorString(_st), " (", cusparseLtGetErrorName(_st), \
                ")");                                                                         \
  } while (0)

constexpr int64_t kMAlign = 16;
enum Layout { kSparseA = 0, kSparseAT = 1, kSparseB = 2, kSparseATBt = 3, kSparseABt = 4 };
static bool transposed_out(int layout) { return layout == kSparseAT || layout == kSparseATBt; }
static bool x_row_t(int layout) { return layout == kSparseATBt || layout == kSparseABt; }

static cusparseLtHandle_t* handle_for(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  auto h = std::make_unique<cusparseLtHandle_t>();
  SF_CSLT_CHECK(cusparseLtInit(h.get()));
  return handles.emplace(device, std::move(h)).first->second.get();
}

static cudaDataType cuda_type(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return CUDA_R_16F;
  if (t.scalar_type() == at::kBFloat16) return CUDA_R_16BF;
  TORCH_CHECK(false, "sparseflow: cuSPARSELt path takes float16 or bfloat16, got ", t.scalar_type());
}

static void check_weight_shape(int64_t n, int64_t k) {
  TORCH_CHECK(n % 32 == 0 && k % 32 == 0, "sparseflow: cuSPARSELt needs out_features and in_features to be ",
              "multiples of 32, got N=", n, " K=", k);
}

// Algorithm configuration: config id (-1: library default), split-k, split-k mode, split-k buffers.
using AlgConfig = std::array<int, 4>;

struct Plan {
  cusparseLtMatDescriptor_t a, b, d;  // a: the sparse operand's descriptor, b: x's, d: output's
  int layout = kSparseA;
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t sel;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
  const cusparseLtHandle_t* h = nullptr;
  int stage = 0;  // how far initialisation got, so the destructor frees only what exists
  ~Plan() {
    if (stage >= 5) cusparseLtMatmulPlanDestroy(&plan);
    if (stage >= 4) cusparseLtMatmulAlgSelectionDestroy(&sel);
    if (stage >= 3) cusparseLtMatDescriptorDestroy(&d);
    if (stage >= 2) cusparseLtMatDescriptorDestroy(&b);
    if (stage >= 1) cusparseLtMatDescriptorDestroy(&a);
  }
};

static void init_sparse_desc(const cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* a, int64_t n, int64_t k,
                             cudaDataType t, int layout) {
  if (layout == kSparseB) {  // W^T: K x N column-major, i.e. W's row-major bytes
    SF_CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, a, k, n, k, 16, t, CUSPARSE_ORDER_COL,
                                                     CUSPARSELT_SPARSITY_50_PERCENT));
  } else {
    SF_CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, a, n, k, k, 16, t, CUSPARSE_ORDER_ROW,
                                                     CUSPARSELT_SPARSITY_50_PERCENT));
  }
}

static void set_alg(const cusparseLtHandle_t* h, cusparseLtMatmulAlgSelection_t* sel, const AlgConfig& c) {
  if (c[0] < 0) return;
  SF_CSLT_CHECK(cusparseLtMatmulAlgSetAttribute(h, sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &c[0], sizeof(int)));
  // Split-k settings as the search or the tuner found them: > 1 splits K, -1 is Segment-K (a
  // Hopper schedule). A value the library refuses leaves its default (no split), so a config read
  // back from a search and set again never fails the call.
  if (c[1] != 1) cusparseLtMatmulAlgSetAttribute(h, sel, CUSPARSELT_MATMUL_SPLIT_K, &c[1], sizeof(int));
  if (c[2] != 0) {
    cusparseLtSplitKMode_t mode = static_cast<cusparseLtSplitKMode_t>(c[2]);
    cusparseLtMatmulAlgSetAttribute(h, sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode));
  }
  if (c[3] > 0) cusparseLtMatmulAlgSetAttribute(h, sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &c[3], sizeof(int));
}

static std::unique_ptr<Plan> make_plan(int device, cudaDataType t, int64_t n, int64_t k, int64_t m,
                                       const AlgConfig& cfg, int layout) {
  TORCH_CHECK(layout >= kSparseA && layout <= kSparseABt, "sparseflow: unknown cuSPARSELt layout ", layout);
  auto p = std::make_unique<Plan>();
  p->h = handle_for(device);
  p->layout = layout;
  init_sparse_desc(p->h, &p->a, n, k, t, layout);
  p->stage = 1;
  if (layout == kSparseB) {
    SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->b, m, k, k, 16, t, CUSPARSE_ORDER_ROW));
    p->stage = 2;
    SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->d, m, n, n, 16, t, CUSPARSE_ORDER_ROW));
  } else {
    if (x_row_t(layout))
      SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->b, m, k, k, 16, t, CUSPARSE_ORDER_ROW));
    else
      SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->b, k, m, k, 16, t, CUSPARSE_ORDER_COL));
    p->stage = 2;
    if (transposed_out(layout))
      SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->d, n, m, m, 16, t, CUSPARSE_ORDER_ROW));
    else
      SF_CSLT_CHECK(cusparseLtDenseDescriptorInit(p->h, &p->d, n, m, n, 16, t, CUSPARSE_ORDER_COL));
  }
  p->stage = 3;
  const cusparseLtMatDescriptor_t* first = layout == kSparseB ? &p->b : &p->a;
  const cusparseLtMatDescriptor_t* second = layout == kSparseB ? &p->a : &p->b;
  const cusparseOperation_t op_b = x_row_t(layout) ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE;
  SF_CSLT_CHECK(cusparseLtMatmulDescriptorInit(p->h, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE, op_b, first, second,
                                               &p->d, &p->d, CUSPARSE_COMPUTE_32F));
  SF_CSLT_CHECK(cusparseLtMatmulAlgSelectionInit(p->h, &p->sel, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT));
  p->stage = 4;
  set_alg(p->h, &p->sel, cfg);
  SF_CSLT_CHECK(cusparseLtMatmulPlanInit(p->h, &p->plan, &p->mm, &p->sel));
  p->stage = 5;
  SF_CSLT_CHECK(cusparseLtMatmulGetWorkspace(p->h, &p->plan, &p->workspace));
  return p;
}

using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, AlgConfig, int>;
static std::mutex g_plan_mu;
static std::map<PlanKey, std::shared_ptr<Plan>> g_plans;
static int64_t g_plans_created = 0;
constexpr size_t kMaxPlans = 4096;

static std::shared_ptr<Plan> get_plan(int device, cudaDataType t, int64_t n, int64_t k, int64_t m,
                                      const AlgConfig& cfg, int layout) {
  PlanKey key{device, static_cast<int>(t), n, k, m, cfg, layout};
  std::lock_guard<std::mutex> lock(g_plan_mu);
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  if (g_plans.size() >= kMaxPlans) g_plans.clear();  // plans in flight stay alive via shared_ptr
  std::shared_ptr<Plan> p = make_plan(device, t, n, k, m, cfg, layout);
  ++g_plans_created;
  g_plans.emplace(key, p);
  return p;
}

static void check_inputs(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.is_cuda() && packed.is_cuda(), "sparseflow: cuSPARSELt path needs CUDA tensors");
  TORCH_CHECK(x.device() == packed.device(), "sparseflow: x on ", x.device(), " but weight on ", packed.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sparseflow: x must be a contiguous 2-D tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1, "sparseflow: bad cuSPARSELt weight buffer");
  check_weight_shape(n, x.size(1));
  cuda_type(x);
}

// dense: N x K (already 2:4) -> cuSPARSELt's compressed buffer (uint8), independent of M.
at::Tensor cslt_compress(const at::Tensor& dense, int64_t layout) {
  TORCH_CHECK(dense.is_cuda() && dense.dim() == 2 && dense.is_contiguous(),
              "sparseflow: cslt_compress needs a contiguous 2-D CUDA tensor");
  c10::cuda::CUDAGuard guard(dense.device());
  const int64_t n = dense.size(0), k = dense.size(1);
  check_weight_shape(n, k);
  auto h = handle_for(dense.get_device());
  cusparseLtMatDescriptor_t a;
  init_sparse_desc(h, &a, n, k, cuda_type(dense), layout);
  size_t size = 0, buf_size = 0;
  SF_CSLT_CHECK(cusparseLtSpMMACompressedSize2(h, &a, &size, &buf_size));
  auto out = at::empty({static_cast<int64_t>(size)}, dense.options().dtype(at::kByte));
  auto buf = at::empty({static_cast<int64_t>(std::max<size_t>(buf_size, 1))}, dense.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  SF_CSLT_CHECK(cusparseLtSpMMACompress2(h, &a, layout == kSparseB ? 0 : 1, CUSPARSE_OPERATION_NON_TRANSPOSE, dense.data_ptr(),
                                         out.data_ptr(), buf.data_ptr(), stream.stream()));
  cusparseLtMatDescriptorDestroy(&a);
  return out;
}

// Rows of x are independent in the product, so the padding rows may hold anything: their output
// columns are cut off. One copy, no zero fill.
static at::Tensor pad_rows(const at::Tensor& x, int64_t m_pad) {
  if (x.size(0) == m_pad) return x;
  auto xp = at::empty({m_pad, x.size(1)}, x.options());
  xp.narrow(0, 0, x.size(0)).copy_(x);
  return xp;
}

// search_ws_mb: workspace offered to cusparseLtMatmulSearch, which may then also try split-k
// configurations that need more than the default plan; < 0: the plan's own (as PyTorch does).
// SPARSEFLOW_CSLT_MIN_WS_MB (diagnostic, benchmarks/probe_cusparselt_layouts.py --ws-mb): offer every
// call at least this much workspace, to tell an algorithm that fails for want of workspace apart
// from one that fails for other reasons.
static size_t min_workspace() {
  static const size_t bytes = [] {
    const char* v = std::getenv("SPARSEFLOW_CSLT_MIN_WS_MB");
    return v ? size_t(std::max(0L, std::strtol(v, nullptr, 10))) << 20 : size_t(0);
  }();
  return bytes;
}

static void run(const std::shared_ptr<Plan>& p, const at::Tensor& packed, const at::Tensor& xp, at::Tensor& y,
                bool search, int64_t search_ws_mb = -1) {
  size_t ws_bytes =
      search && search_ws_mb > 0 ? std::max<size_t>(p->workspace, size_t(search_ws_mb) << 20) : p->workspace;
  ws_bytes = std::max(ws_bytes, min_workspace());
  at::Tensor ws;
  if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, xp.options().dtype(at::kByte));
  void* ws_ptr = ws_bytes ? ws.data_ptr() : nullptr;
  float alpha = 1.f, beta = 0.f;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const void* first = p->layout == kSparseB ? xp.data_ptr() : packed.data_ptr();
  const void* second = p->layout == kSparseB ? packed.data_ptr() : xp.data_ptr();
  if (search) {
    SF_CSLT_CHECK(cusparseLtMatmulSearch(p->h, &p->plan, &alpha, first, second, &beta, y.data_ptr(), y.data_ptr(),
                                         ws_ptr, &stream, 1));
  } else {
    SF_CSLT_CHECK(cusparseLtMatmul(p->h, &p->plan, &alpha, first, second, &beta, y.data_ptr(), y.data_ptr(), ws_ptr,
                                   &stream, 1));
  }
}

at::Tensor transpose_rows(const at::Tensor& src, int64_t m);  // format_kernels.cu

// y (M x N) = x (M x K) @ W^T with W given as cuSPARSELt's compressed buffer.
static at::Tensor finish(const at::Tensor& y, int64_t m, int64_t m_pad, int layout) {
  if (transposed_out(layout)) return transpose_rows(y, m);  // y^T (N x m_pad) -> y
  return m_pad == m ? y : y.narrow(0, 0, m);
}

static at::Tensor alloc_out(const at::Tensor& x, int64_t m_pad, int64_t n, int layout) {
  return transposed_out(layout) ? at::empty({n, m_pad}, x.options()) : at::empty({m_pad, n}, x.options());
}

at::Tensor cslt_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n, std::vector<int64_t> cfg_in,
                   int64_t layout) {
  check_inputs(x, packed, n);
  TORCH_CHECK(cfg_in.size() == 4, "sparseflow: algorithm config must have 4 entries");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t m_pad = (m + kMAlign - 1) / kMAlign * kMAlign;
  AlgConfig cfg{(int)cfg_in[0], (int)cfg_in[1], (int)cfg_in[2], (int)cfg_in[3]};
  auto p = get_plan(x.get_device(), cuda_type(x), n, k, m_pad, cfg, static_cast<int>(layout));
  auto xp = pad_rows(x, m_pad);
  auto y = alloc_out(x, m_pad, n, static_cast<int>(layout));
  run(p, packed, xp, y, false);
  return finish(y, m, m_pad, static_cast<int>(layout));
}

// Runs cusparseLtMatmulSearch for this shape and returns the winning config
// [config id, split-k, split-k mode, split-k buffers, workspace bytes].
std::vector<int64_t> cslt_search(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t layout,
                                 int64_t search_ws_mb) {
  check_inputs(x, packed, n);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t m_pad = (m + kMAlign - 1) / kMAlign * kMAlign;
  // A private plan: search mutates it, and cached plans must stay as they were built.
  std::shared_ptr<Plan> p = make_plan(x.get_device(), cuda_type(x), n, k, m_pad, AlgConfig{-1, 1, 0, 0}, static_cast<int>(layout));
  auto xp = pad_rows(x, m_pad);
  auto y = alloc_out(x, m_pad, n, static_cast<int>(layout));
  run(p, packed, xp, y, true, search_ws_mb);
  int alg = 0, split_k = 1, buffers = 0;
  cusparseLtSplitKMode_t mode = CUSPARSELT_INVALID_MODE;
  SF_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(p->h, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(int)));
  SF_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(p->h, &p->sel, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(int)));
  SF_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(p->h, &p->sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode)));
  SF_CSLT_CHECK(
      cusparseLtMatmulAlgGetAttribute(p->h, &p->sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &buffers, sizeof(int)));
  SF_CSLT_CHECK(cusparseLtMatmulGetWorkspace(p->h, &p->plan, &p->workspace));
  // Keep the searched plan itself under its config: in this process later calls run exactly what
  // the search timed (a new process rebuilds it from the config).
  AlgConfig cfg{alg, split_k, static_cast<int>(mode), buffers};
  {
    std::lock_guard<std::mutex> lock(g_plan_mu);
    g_plans[PlanKey{x.get_device(), static_cast<int>(cuda_type(x)), n, k, m_pad, cfg, static_cast<int>(layout)}] = p;
  }
  return {alg, split_k, static_cast<int64_t>(mode), buffers, static_cast<int64_t>(p->workspace)};
}

// Number of algorithm configurations cuSPARSELt offers for this problem (ids 0..count-1).
int64_t cslt_alg_count(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t layout) {
  check_inputs(x, packed, n);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t m_pad = (x.size(0) + kMAlign - 1) / kMAlign * kMAlign;
  auto p = get_plan(x.get_device(), cuda_type(x), n, x.size(1), m_pad, AlgConfig{-1, 1, 0, 0},
                    static_cast<int>(layout));
  int max_id = 0;
  SF_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(p->h, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id, sizeof(int)));
  return max_id;
}

int64_t cslt_version() {
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  return major * 1000 + minor * 100 + patch;
}

std::vector<int64_t> plan_cache_stats() {
  std::lock_guard<std::mutex> lock(g_plan_mu);
  return {static_cast<int64_t>(g_plans.size()), g_plans_created};
}

}  // namespace sparseflow
