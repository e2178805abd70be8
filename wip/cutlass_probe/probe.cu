// Feasibility probe (not part of the package): CUTLASS 3.x sm90a sparse GEMM
// configurations, exported with a C ABI so a torch script can time them beside
// cuBLAS and cuSPARSELt. One translation unit per configuration (-DSF_CFG=n).
#include <cstdint>
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using Problem = Shape<int, int, int, int>;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;

template <class T, class Tile, class Cluster, class Sched, class TileSched>
struct Gemm24 {
  using EpiSched = std::conditional_t<std::is_same_v<Sched, Coop>,
                                      cutlass::epilogue::TmaWarpSpecializedCooperative,
                                      cutlass::epilogue::TmaWarpSpecialized>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, 8, T, cutlass::layout::ColumnMajor, 8,
      EpiSched>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      T, cutlass::layout::RowMajor, 8, T, cutlass::layout::ColumnMajor, 8, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Sched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue, TileSched>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using T = cutlass::half_t;
#if SF_CFG == 0
using G = Gemm24<T, Shape<_128, _128, _128>, Shape<_1, _2, _1>, Coop, void>;
#elif SF_CFG == 1
using G = Gemm24<T, Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, void>;
#elif SF_CFG == 2
using G = Gemm24<T, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, void>;
#elif SF_CFG == 3
using G = Gemm24<T, Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 4
using G = Gemm24<T, Shape<_64, _256, _128>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 5
using G = Gemm24<T, Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, cutlass::gemm::StreamKScheduler>;
#elif SF_CFG == 6
using G = Gemm24<T, Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, cutlass::gemm::StreamKScheduler>;
#elif SF_CFG == 7
using G = Gemm24<T, Shape<_128, _128, _128>, Shape<_2, _1, _1>, Coop, void>;
#elif SF_CFG == 8
using G = Gemm24<T, Shape<_64, _16, _128>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 9
using G = Gemm24<T, Shape<_64, _32, _128>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 10
using G = Gemm24<T, Shape<_64, _64, _128>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 11
using G = Gemm24<T, Shape<_128, _16, _128>, Shape<_1, _1, _1>, Coop, void>;
#elif SF_CFG == 12
using G = Gemm24<T, Shape<_128, _64, _128>, Shape<_1, _1, _1>, Coop, void>;
#elif SF_CFG == 13
using G = Gemm24<T, Shape<_64, _16, _256>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 14
using G = Gemm24<T, Shape<_64, _64, _256>, Shape<_1, _1, _1>, Ping, void>;
#elif SF_CFG == 15
using G = Gemm24<T, Shape<_128, _32, _256>, Shape<_1, _1, _1>, Coop, void>;
#endif

using Op = G::Op;
using Main = G::Mainloop;

#define SF_CAT2(a, b) a##b
#define SF_CAT(a, b) SF_CAT2(a, b)
#define SF_FN(name) SF_CAT(name, SF_CFG)

typename Op::Arguments make_args(const void* a, const void* e, const void* b, void* d,
                                 int m, int n, int k) {
  Problem p{m, n, k, 1};
  auto la = Main::SparseConfig::fill_layoutA(p);
  auto le = Main::SparseConfig::fill_layoutE(p);
  auto sb = cutlass::make_cute_packed_stride(typename Op::GemmKernel::StrideB{}, make_shape(n, k, 1));
  auto sd = cutlass::make_cute_packed_stride(typename Op::GemmKernel::StrideD{}, make_shape(m, n, 1));
  typename Op::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm, p,
      {static_cast<const T*>(a), la, static_cast<const T*>(b), sb,
       static_cast<const typename Main::ElementE*>(e), le},
      {{1.0f, 0.0f}, nullptr, sd, static_cast<T*>(d), sd}};
  return args;
}

}  // namespace

extern "C" {

size_t SF_FN(sf_probe_workspace)(int m, int n, int k) {
  auto args = make_args(nullptr, nullptr, nullptr, nullptr, m, n, k);
  return Op::get_workspace_size(args);
}

// y(m x n, column-major) = A(m x k, 2:4 compressed) * B(k x n, column-major)
int SF_FN(sf_probe_gemm)(const void* a, const void* e, const void* b, void* d, int m, int n, int k,
                         void* ws, cudaStream_t stream) {
  auto args = make_args(a, e, b, d, m, n, k);
  Op op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (op.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 2;
  if (op.run(stream) != cutlass::Status::kSuccess) return 3;
  return 0;
}

#if SF_CFG == 0
// The compressed form is the same for every configuration above (tile K = 128).
using Sparse = Main::SparseConfig;
using Util = cutlass::transform::kernel::StructuredSparseCompressorUtility<
    Problem, T, cutlass::layout::RowMajor, Sparse>;
using CompKernel = cutlass::transform::kernel::StructuredSparseCompressor<
    Problem, T, cutlass::layout::RowMajor, Sparse, cutlass::arch::Sm90>;
using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompKernel>;

void sf_probe_sizes(int m, int k, int64_t* a_elems, int64_t* e_bytes) {
  Problem p{m, 1, k, 1};
  auto sa = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>{},
                                             make_shape(m, k, 1));
  Util u(p, sa);
  *a_elems = int64_t(u.get_tensorA_m_physical()) * u.get_tensorA_k_physical();
  *e_bytes = int64_t(u.get_tensor_E_bytes());
}

typename Compressor::Arguments compress_args(const void* dense, void* a, void* e, int m, int k) {
  Problem p{m, 1, k, 1};
  auto sa = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>{},
                                             make_shape(m, k, 1));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  return {p, {static_cast<const T*>(dense), sa, static_cast<T*>(a),
              static_cast<typename Main::ElementE*>(e)}, {hw}};
}

size_t sf_probe_compress_workspace(int m, int k) {
  return Compressor::get_workspace_size(compress_args(nullptr, nullptr, nullptr, m, k));
}

int sf_probe_compress(const void* dense, void* a, void* e, int m, int k, void* ws, cudaStream_t stream) {
  auto args = compress_args(dense, a, e, m, k);
  Compressor op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (op.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 2;
  if (op.run(stream) != cutlass::Status::kSuccess) return 3;
  return 0;
}
#endif
}
