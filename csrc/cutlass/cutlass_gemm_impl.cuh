// CUTLASS templates behind cutlass_gemm.cuh: the GEMM configurations and the compressor.
#pragma once

#include <atomic>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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

#include "cutlass_gemm.cuh"

namespace sparseflow::cutlass24 {
namespace detail {

using namespace cute;
using Problem = Shape<int, int, int, int>;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using StreamK = cutlass::gemm::StreamKScheduler;
constexpr int kMaxDevices = 64;

// The device's SM count (the persistent tile scheduler sizes its grid by it), queried once per
// device instead of on every call as CUTLASS's KernelHardwareInfo does. 0 where unknown.
inline int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  int c = cache[device].load(std::memory_order_relaxed);
  if (c == 0 && cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device) == cudaSuccess)
    cache[device].store(c, std::memory_order_relaxed);
  return c;
}

// One configuration: tile (rows of W x tokens x K), cluster, schedule, tile scheduler.
template <class T, int TN, int TM, int TK, int CN, int CM, class Sched, class TileSched = void>
struct Gemm24 {
  using Tile = Shape<Int<TN>, Int<TM>, Int<TK>>;
  using Cluster = Shape<Int<CN>, Int<CM>, _1>;
  using EpiSched = std::conditional_t<std::is_same_v<Sched, Coop>, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                      cutlass::epilogue::TmaWarpSpecialized>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, 8, T,
      cutlass::layout::ColumnMajor, 8, EpiSched>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, T, cutlass::layout::RowMajor, 8, T,
      cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Sched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue, TileSched>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static std::string name() {
    std::string s = std::to_string(TN) + "x" + std::to_string(TM) + "x" + std::to_string(TK);
    if (CN * CM > 1) s += " cluster " + std::to_string(CN) + "x" + std::to_string(CM);
    s += std::is_same_v<Sched, Coop> ? " cooperative" : " ping-pong";
    if constexpr (std::is_same_v<TileSched, StreamK>) s += " stream-K";
    return s;
  }

  // clusters: how many of this kernel's clusters fit on the GPU at once (0: CUTLASS estimates)
  static typename Op::Arguments args(const void* a, const void* e, const void* x, void* y, int n, int m, int k,
                                     int device, int clusters = 0) {
    using Main = typename Op::CollectiveMainloop;
    Problem p{n, m, k, 1};
    auto sb = cutlass::make_cute_packed_stride(typename Op::GemmKernel::StrideB{}, make_shape(m, k, 1));
    auto sd = cutlass::make_cute_packed_stride(typename Op::GemmKernel::StrideD{}, make_shape(n, m, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count(device);
    hw.max_active_clusters = clusters;
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            p,
            {static_cast<const T*>(a), Main::SparseConfig::fill_layoutA(p), static_cast<const T*>(x), sb,
             static_cast<const typename Main::ElementE*>(e), Main::SparseConfig::fill_layoutE(p)},
            {{1.0f, 0.0f}, nullptr, sd, static_cast<T*>(y), sd},
            hw};
  }
};

// The configurations the dispatcher times (indices are the cfg numbers it records), chosen from
// 16 measured on the H200 in a stand-alone probe (benchmarks/NOTES.md). Tiles are rows of
// W x tokens x K: the small token tiles serve decode-sized M, where many row tiles and a deep K
// tile keep enough bytes in flight. Each is compiled in its own file under csrc/cutlass/inst/
// (they build in parallel); kConfigs must match those files.
template <class T>
using Configs = std::tuple<Gemm24<T, 128, 128, 128, 1, 2, Coop>,  // 0: M 256-1024 (qkv, gate_up)
                           Gemm24<T, 128, 256, 128, 2, 1, Coop>,  // 1: M >= 1024
                           Gemm24<T, 128, 64, 128, 1, 1, Coop>,   // 2: M = 256 (o, down); M = 64 (gate_up)
                           Gemm24<T, 64, 32, 128, 1, 1, Ping>,    // 3: M = 64 (o, down)
                           Gemm24<T, 64, 64, 256, 1, 1, Ping>,    // 4: M = 64 (qkv)
                           Gemm24<T, 128, 16, 128, 1, 1, Coop>,   // 5: M <= 16 (qkv, gate_up)
                           Gemm24<T, 64, 16, 256, 1, 1, Ping>,    // 6: M <= 16 (o, down)
                           // 7, 8: token counts whose fixed tiles leave the last wave part-empty
                           // (H100, qkv: configuration 1 took 73.8 us at M = 704 and 64.2 us at
                           // M = 1024): the stream-K scheduler deals K iterations over idle SMs
                           Gemm24<T, 128, 128, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 128, 256, 128, 1, 1, Coop, StreamK>,
                           // 9-11: token tiles between the powers of two, so that some tile fits
                           // M = 300, 700 or 1337 without a mostly-empty last tile (M = 300 in
                           // 128-token tiles runs 3 tiles for 2.3 tiles of work; in 160-token
                           // tiles, 2 for 1.9); 64-row ping-pong for layers with few row tiles
                           // (down: 32 tiles of 128 rows x 3 of 128 tokens fill 96 of 132 SMs)
                           Gemm24<T, 128, 192, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 128, 160, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 64, 160, 128, 1, 1, Ping>,
                           // 12, 13: small token tiles with the stream-K scheduler, for layers of
                           // few row tiles at M = 300-700 (qkv 6144 x 4096 at M = 300: the
                           // 128 x 64 tiles make 240 tiles, 1.8 waves of 132 SMs, 0.92x dense)
                           Gemm24<T, 128, 64, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 128, 96, 128, 1, 1, Coop, StreamK>,
                           // 14-19: fewer reads of x through L2 for layers of few row tiles at
                           // M = 300-1400 (qkv, and Qwen's 3584-wide o and down), where every
                           // configuration above ran at 0.83-0.97x dense on the H100. Each row tile
                           // reads all of x's K: 256-row tiles read it half as often, and a 2 x 1
                           // cluster multicasts one x tile to both of its row tiles.
                           Gemm24<T, 128, 128, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 128, 192, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 128, 256, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 256, 64, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 256, 96, 128, 1, 1, Coop, StreamK>,
                           Gemm24<T, 256, 128, 128, 1, 1, Coop, StreamK>,
                           // 20, 21: tile K = 64, for full token tiles at large M. A stage then
                           // holds half the x tile, so the 128 x 256 tile gets 5 pipeline stages
                           // instead of 2 (CUTLASS's StageCountAutoCarveout), as cuBLAS's own
                           // 128 x 256 x 64 kernel has 4. With every configuration at K = 64
                           // (H100, benchmarks/NOTES.md) the prefill tiles ran 1.37-1.43x dense at
                           // M = 2048-4096 but lost at M = 300-1337 and at decode sizes, hence
                           // only these two; beside the twenty they are 0-3% faster than the best
                           // of them at M = 2048 and 2-8% at 4096. They read the metadata in the K = 64
                           // order, which sparseflow/kernels/cutlass.py permutes from the resident
                           // (K = 128) form into a temporary on each call (1/16 of the dense bytes).
                           Gemm24<T, 128, 256, 64, 2, 1, Coop>,
                           Gemm24<T, 128, 256, 64, 2, 1, Coop, StreamK>,
                           // 22-25: still fewer reads of x through L2 for the narrow layers at
                           // M = 256-1400 (Qwen qkv 4608 and o 3584 rows), where the best of the
                           // twenty ran 0.90-0.96x dense on the H100: 256-row tiles in 2 x 1
                           // clusters (each x tile read once per 512 rows) and 128-row tiles in
                           // 4 x 1 clusters (once per 512 rows, with twice the CTAs of the former).
                           Gemm24<T, 256, 64, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 256, 128, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 128, 64, 128, 4, 1, Coop, StreamK>,
                           Gemm24<T, 128, 128, 128, 4, 1, Coop, StreamK>,
                           // 26-28: wider token tiles on 256-row tiles, for prompt lengths between
                           // the multiples of 128 (H100: gate/up at M = 300 ran 1.12x dense on
                           // 256 x 128 tiles padded to 384 rows, against 1.44x at M = 256). 160
                           // tokens fit M = 300 in 320 rows and 192 fit 1337 in 1344; per K step a
                           // 256 x 192 tile reads 17% fewer bytes per multiply than 256 x 128.
                           Gemm24<T, 256, 160, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 256, 192, 128, 2, 1, Coop, StreamK>,
                           Gemm24<T, 256, 192, 128, 1, 1, Coop, StreamK>>;

template <class T, int I>
using Cfg = std::tuple_element_t<I, Configs<T>>;

// Runs a CUTLASS device operator once (the compressor, once per weight): can_implement,
// initialize, launch. "" or which step failed, with CUTLASS's status.
template <class Op>
std::string launch(typename Op::Arguments args, void* ws, cudaStream_t stream) {
  Op op;
  auto can = op.can_implement(args);
  if (can != cutlass::Status::kSuccess) return std::string("can_implement: ") + cutlassGetStatusString(can);
  auto init = op.initialize(args, ws, stream);
  if (init != cutlass::Status::kSuccess) return std::string("initialize: ") + cutlassGetStatusString(init);
  auto st = op.run(stream);
  return st == cutlass::Status::kSuccess ? "" : std::string("run: ") + cutlassGetStatusString(st);
}

// Once per (kernel, device): raise the kernel's dynamic shared-memory limit (a property of the
// context, which GemmUniversalAdapter::initialize would set again on every call), then ask how
// many clusters fit on the GPU at once with that shared memory: the persistent tile scheduler
// sizes the grid of a cluster configuration by it (without it CUTLASS estimates from GH100's GPC
// layout). Sets `clusters` to that count (0 for 1x1 clusters or where unknown); returns the
// shared-memory attribute's error (cleared from CUDA's error state), cudaSuccess otherwise.
template <class Kernel>
cudaError_t setup_kernel(int& clusters) {
  constexpr int smem = Kernel::SharedStorageSize;
  auto kernel = cutlass::device_kernel<Kernel>;
  clusters = 0;
  if (smem >= (48 << 10)) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return err;
    }
  }
  using CS = typename Kernel::ClusterShape;
  constexpr unsigned cx = size<0>(CS{}), cy = size<1>(CS{});
  if (cx * cy == 1) return cudaSuccess;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cx;
  attr.val.clusterDim.y = cy;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(cx, cy, 1);
  cfg.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;  // CUTLASS's estimate then
  }
  return cudaSuccess;
}

// Configuration I's per-device setup (setup_kernel), done once: sets `c` to the clusters that fit
// at once. Shared by run and workspace because a stream-K schedule's workspace depends on that
// count: sized with CUTLASS's own estimate instead, a 4 x 1 cluster configuration asked for more
// workspace at run time than the query had reported (H100). "" or the setup's error.
template <class T, int I>
std::string prepare(int device, int& c) {
  using Kernel = typename Cfg<T, I>::Op::GemmKernel;
  static std::atomic<int> clusters[kMaxDevices];  // setup_kernel's count + 1; 0: not set up yet
  if (device < 0 || device >= kMaxDevices) return "device index out of range";
  c = clusters[device].load(std::memory_order_acquire) - 1;
  if (c < 0) {
    cudaError_t err = setup_kernel<Kernel>(c);
    if (err != cudaSuccess) return std::string("cudaFuncSetAttribute (shared memory): ") + cudaGetErrorString(err);
    clusters[device].store(c + 1, std::memory_order_release);
  }
  return "";
}

// One GEMM with configuration I; compiled once per (T, I) by SF_CUTLASS_INSTANCE. The steps of
// GemmUniversalAdapter::initialize + run, with the per-context setup done once per device
// (prepare), the arguments built once, and the workspace checked against what the caller holds.
template <class T, int I>
std::string run(const void* a, const void* e, const void* x, void* y, int n, int m, int k, void* ws,
                int64_t ws_bytes, int device, cudaStream_t stream) {
  using G = Cfg<T, I>;
  using Op = typename G::Op;
  using Kernel = typename Op::GemmKernel;
  int c = 0;
  std::string err = prepare<T, I>(device, c);
  if (!err.empty()) return err;
  auto args = G::args(a, e, x, y, n, m, k, device, c);
  if (int64_t(Op::get_workspace_size(args)) > ws_bytes) return "workspace too small";
  auto can = Op::can_implement(args);
  if (can != cutlass::Status::kSuccess) return std::string("can_implement: ") + cutlassGetStatusString(can);
  auto st = Kernel::initialize_workspace(args, ws, stream);
  if (st != cutlass::Status::kSuccess) return std::string("initialize_workspace: ") + cutlassGetStatusString(st);
  typename Op::Params params = Kernel::to_underlying_arguments(args, ws);
  st = Op::run(params, stream);
  return st == cutlass::Status::kSuccess ? "" : std::string("run: ") + cutlassGetStatusString(st);
}

// The workspace run needs for this problem (with the cluster count run uses; where the setup
// fails, CUTLASS's estimate, and run then reports the setup's error).
template <class T, int I>
int64_t workspace(int n, int m, int k, int device) {
  using G = Cfg<T, I>;
  int c = 0;
  if (!prepare<T, I>(device, c).empty()) c = 0;
  return int64_t(G::Op::get_workspace_size(G::args(nullptr, nullptr, nullptr, nullptr, n, m, k, device, c)));
}

template <class T>
struct Compress {
  using Sparse = typename Cfg<T, 0>::Op::CollectiveMainloop::SparseConfig;  // the resident form (tile K 128)
  using ElementE = typename Cfg<T, 0>::Op::CollectiveMainloop::ElementE;
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  using Util = cutlass::transform::kernel::StructuredSparseCompressorUtility<Problem, T, cutlass::layout::RowMajor,
                                                                             Sparse>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<Problem, T, cutlass::layout::RowMajor,
                                                                         Sparse, cutlass::arch::Sm90>;
  using Op = cutlass::transform::device::TransformUniversalAdapter<Kernel>;

  static StrideA stride(int n, int k) { return cutlass::make_cute_packed_stride(StrideA{}, make_shape(n, k, 1)); }

  static typename Op::Arguments args(const void* dense, void* a, void* e, int n, int k, int device) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count(device);
    return {Problem{n, 1, k, 1},
            {static_cast<const T*>(dense), stride(n, k), static_cast<T*>(a),
             static_cast<ElementE*>(e)},
            {hw}};
  }
};

}  // namespace detail

template <bool BF16>
using Element = std::conditional_t<BF16, cutlass::bfloat16_t, cutlass::half_t>;

}  // namespace sparseflow::cutlass24

#define SF_CUTLASS_DECLARE(PREFIX, T, I)                                                                     \
  PREFIX template std::string sparseflow::cutlass24::detail::run<T, I>(                                      \
      const void*, const void*, const void*, void*, int, int, int, void*, int64_t, int, cudaStream_t);       \
  PREFIX template int64_t sparseflow::cutlass24::detail::workspace<T, I>(int, int, int, int);
// In a csrc/cutlass/inst/ file: compile configuration I for element type T there.
#define SF_CUTLASS_INSTANCE(T, I) SF_CUTLASS_DECLARE(, T, I)
// In cutlass_gemm_ops.cu: configuration I is compiled elsewhere.
#define SF_CUTLASS_EXTERN(T, I) SF_CUTLASS_DECLARE(extern, T, I)
