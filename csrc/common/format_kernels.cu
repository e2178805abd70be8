// Layout kernels. decompress_24: portable 2:4 form (values N x K/2, packed 2-bit positions
// N x ceil(K/8)) -> dense N x K; one thread per 8 columns (one metadata byte). transpose_rows:
// the y^T -> y step of cuSPARSELt's transposed-output layouts (csrc/cusparselt/cusparselt_gemm.cpp).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace sparseflow {

template <typename T>
__global__ void decompress_24_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta,
                                     T* __restrict__ out, int64_t n, int64_t k, int64_t meta_cols) {
  const int64_t bytes_per_row = (k + 7) / 8;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * bytes_per_row) return;
  const int64_t row = i / bytes_per_row, byte = i % bytes_per_row;
  const uint8_t m = meta[row * meta_cols + byte];
  for (int half = 0; half < 2; ++half) {
    const int64_t group = byte * 2 + half;
    if (group * 4 >= k) break;
    const int nib = (m >> (4 * half)) & 0xF;
    const int i0 = nib & 3, i1 = (nib >> 2) & 3;
    T g[4] = {T(0.f), T(0.f), T(0.f), T(0.f)};
    const T* v = values + row * (k / 2) + group * 2;
    g[i0] = v[0];
    g[i1] = v[1];
    T* o = out + row * k + group * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = g[j];
  }
}

at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& meta, int64_t k) {
  TORCH_CHECK(values.is_cuda() && meta.is_cuda(), "sparseflow: decompress_24 needs CUDA tensors");
  TORCH_CHECK(values.device() == meta.device(), "sparseflow: values and meta on different devices");
  TORCH_CHECK(values.dim() == 2 && meta.dim() == 2 && values.is_contiguous() && meta.is_contiguous(),
              "sparseflow: decompress_24 needs contiguous 2-D values and meta");
  TORCH_CHECK(meta.scalar_type() == at::kByte, "sparseflow: meta must be uint8");
  TORCH_CHECK(k % 4 == 0 && values.size(1) == k / 2 && meta.size(1) == (k + 7) / 8 && meta.size(0) == values.size(0),
              "sparseflow: decompress_24 shape mismatch");
  c10::cuda::CUDAGuard guard(values.device());
  const int64_t n = values.size(0);
  auto out = at::empty({n, k}, values.options());
  const int64_t work = n * ((k + 7) / 8);
  if (work == 0) return out;
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "decompress_24", [&] {
    decompress_24_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        values.data_ptr<scalar_t>(), meta.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), n, k, meta.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// src: N x ld row-major (2-byte elements), dst: m x N with dst[i][j] = src[j][i], i < m <= ld.
// 32 x 32 tiles through shared memory (padded against bank conflicts): both sides coalesced.
__global__ void transpose_rows_kernel(const uint16_t* __restrict__ src, uint16_t* __restrict__ dst, int64_t n,
                                      int64_t m, int64_t ld) {
  __shared__ uint16_t tile[32][33];
  const int64_t i0 = blockIdx.x * 32LL, j0 = blockIdx.y * 32LL;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {  // src rows j, columns i
    const int64_t j = j0 + r, i = i0 + threadIdx.x;
    if (j < n && i < m) tile[r][threadIdx.x] = src[j * ld + i];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {  // dst rows i, columns j
    const int64_t i = i0 + r, j = j0 + threadIdx.x;
    if (i < m && j < n) dst[i * n + j] = tile[threadIdx.x][r];
  }
}

// The first m columns of src (N x ld) transposed into a new m x N tensor, on the current stream:
// one launch (torch's .t().contiguous() costs several microseconds more host time per call).
at::Tensor transpose_rows(const at::Tensor& src, int64_t m) {
  TORCH_CHECK(src.is_cuda() && src.dim() == 2 && src.is_contiguous() && src.element_size() == 2,
              "sparseflow: transpose_rows needs a contiguous 2-D 16-bit CUDA tensor");
  const int64_t n = src.size(0), ld = src.size(1);
  TORCH_CHECK(m >= 0 && m <= ld && (n + 31) / 32 <= 65535, "sparseflow: transpose_rows: bad sizes");
  auto dst = at::empty({m, n}, src.options());
  if (m == 0 || n == 0) return dst;
  const dim3 grid(static_cast<unsigned>((m + 31) / 32), static_cast<unsigned>((n + 31) / 32)), block(32, 8);
  transpose_rows_kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint16_t*>(src.data_ptr()), static_cast<uint16_t*>(dst.data_ptr()), n, m, ld);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

}  // namespace sparseflow
