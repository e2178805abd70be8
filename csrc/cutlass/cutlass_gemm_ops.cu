// Ops<BF16> (cutlass_gemm.cuh): configuration names, the compressor, and the switch from a
// configuration index to its GEMM, which is compiled in csrc/cutlass/inst/.
#include "cutlass_gemm_impl.cuh"

#define SF_EXTERN_ALL(T) \
  SF_CUTLASS_EXTERN(T, 0) \
  SF_CUTLASS_EXTERN(T, 1) \
  SF_CUTLASS_EXTERN(T, 2) \
  SF_CUTLASS_EXTERN(T, 3) \
  SF_CUTLASS_EXTERN(T, 4) \
  SF_CUTLASS_EXTERN(T, 5) \
  SF_CUTLASS_EXTERN(T, 6) \
  SF_CUTLASS_EXTERN(T, 7) \
  SF_CUTLASS_EXTERN(T, 8) \
  SF_CUTLASS_EXTERN(T, 9) \
  SF_CUTLASS_EXTERN(T, 10) \
  SF_CUTLASS_EXTERN(T, 11) \
  SF_CUTLASS_EXTERN(T, 12) \
  SF_CUTLASS_EXTERN(T, 13) \
  SF_CUTLASS_EXTERN(T, 14) \
  SF_CUTLASS_EXTERN(T, 15) \
  SF_CUTLASS_EXTERN(T, 16) \
  SF_CUTLASS_EXTERN(T, 17) \
  SF_CUTLASS_EXTERN(T, 18) \
  SF_CUTLASS_EXTERN(T, 19) \
  SF_CUTLASS_EXTERN(T, 20) \
  SF_CUTLASS_EXTERN(T, 21) \
  SF_CUTLASS_EXTERN(T, 22) \
  SF_CUTLASS_EXTERN(T, 23) \
  SF_CUTLASS_EXTERN(T, 24) \
  SF_CUTLASS_EXTERN(T, 25) \
  SF_CUTLASS_EXTERN(T, 26) \
  SF_CUTLASS_EXTERN(T, 27) \
  SF_CUTLASS_EXTERN(T, 28)
SF_EXTERN_ALL(cutlass::half_t)
SF_EXTERN_ALL(cutlass::bfloat16_t)

// CUTLASS encodes its TMA descriptors with cuTensorMapEncodeTiled, a driver function. Left to
// itself it looks the function up (cudaGetDriverEntryPointByVersion) for every descriptor, i.e.
// several lookups on every GEMM call; built with CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL (setup.py)
// it calls the symbol, defined here as a forwarder to the entry point looked up once. (Linking
// libcuda instead would make the module unimportable where no driver is installed, as in CI.)
extern "C" CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                                                   void* addr, const cuuint64_t* dims, const cuuint64_t* strides,
                                                   const cuuint32_t* box, const cuuint32_t* elem_strides,
                                                   CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                                   CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
  using Fn = CUresult(CUDAAPI*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Fn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
                  cudaSuccess &&
              found == cudaDriverEntryPointSuccess;
    return ok ? reinterpret_cast<Fn>(p) : nullptr;
  }();
  if (fn == nullptr) return CUDA_ERROR_NOT_FOUND;
  return fn(map, type, rank, addr, dims, strides, box, elem_strides, interleave, swizzle, l2, oob);
}

namespace sparseflow::cutlass24 {

static_assert(std::tuple_size_v<detail::Configs<cutlass::half_t>> == kConfigs,
              "kConfigs (and the files in csrc/cutlass/inst/, and SF_EXTERN_ALL) must match Configs");

namespace {
template <class T, size_t... I>
std::string gemm_at(int cfg, const void* a, const void* e, const void* x, void* y, int n, int m, int k, void* ws,
                    int64_t ws_bytes, int device, cudaStream_t stream, std::index_sequence<I...>) {
  std::string err = "no such configuration";
  ((cfg == int(I) ? (err = detail::run<T, int(I)>(a, e, x, y, n, m, k, ws, ws_bytes, device, stream), 0) : 0), ...);
  return err;
}

template <class T, size_t... I>
int64_t workspace_at(int cfg, int n, int m, int k, int device, std::index_sequence<I...>) {
  int64_t out = 0;
  ((cfg == int(I) ? (out = detail::workspace<T, int(I)>(n, m, k, device), 0) : 0), ...);
  return out;
}
}  // namespace

template <bool BF16>
std::vector<std::string> Ops<BF16>::names() {
  std::vector<std::string> out;
  std::apply([&](auto... c) { (out.push_back(decltype(c)::name()), ...); }, detail::Configs<Element<BF16>>{});
  return out;
}

template <bool BF16>
Sizes Ops<BF16>::sizes(int n, int k) {
  using C = detail::Compress<Element<BF16>>;
  typename C::Util u(detail::Problem{n, 1, k, 1}, C::stride(n, k));
  auto args = C::args(nullptr, nullptr, nullptr, n, k, -1);
  return {int64_t(u.get_tensorA_m_physical()) * u.get_tensorA_k_physical(), int64_t(u.get_tensor_E_bytes()),
          int64_t(C::Op::get_workspace_size(args))};
}

template <bool BF16>
std::string Ops<BF16>::compress(const void* dense, void* a, void* e, void* ws, int n, int k, int device,
                                cudaStream_t stream) {
  using C = detail::Compress<Element<BF16>>;
  return detail::launch<typename C::Op>(C::args(dense, a, e, n, k, device), ws, stream);
}

template <bool BF16>
int64_t Ops<BF16>::workspace(int cfg, int n, int m, int k, int device) {
  return workspace_at<Element<BF16>>(cfg, n, m, k, device, std::make_index_sequence<kConfigs>{});
}

template <bool BF16>
std::string Ops<BF16>::gemm(int cfg, const void* a, const void* e, const void* x, void* y, int n, int m, int k,
                            void* ws, int64_t ws_bytes, int device, cudaStream_t stream) {
  return gemm_at<Element<BF16>>(cfg, a, e, x, y, n, m, k, ws, ws_bytes, device, stream,
                                std::make_index_sequence<kConfigs>{});
}

template struct Ops<false>;
template struct Ops<true>;

}  // namespace sparseflow::cutlass24
