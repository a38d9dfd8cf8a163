// Micro-benchmark of the exp flavours (ExpMode): how fast can an SM evaluate exp on the
// special-function units, on the FMA pipes, or on both at once?  bench/bench_nowcast_gpu.py
// times it; the answer says whether the SFU exps of the nowcast kernel (128 per row) could
// bound it on a given card, and what moving some onto the FMA pipes would buy.
#include <algorithm>

#include "device.cuh"
#include "nowcast.cuh"

namespace know::cuda {
namespace {

// e^x on the special-function unit, as the nowcast kernel computes it (there the log2(e)
// factor is folded into staged weights).
__device__ __forceinline__ float exp_sfu(float x) { return exp2_sfu(x * kLog2e); }

// exp on the FMA pipes: 2^y = 2^n * 2^f with n = rint(y), |f| <= 1/2, and 2^f from a
// degree-6 polynomial (relative error below 1e-7 on [-1/2, 1/2], fitted for float32
// evaluation).  y is clamped so that 2^n stays representable; the last doubling lets
// results up to FLT_MAX through and turns larger ones into +inf, as expf does.  Results
// below 2^-126 flush to zero, as ex2.approx.ftz does.
__device__ __forceinline__ float exp_poly(float x) {
  const float y = fminf(fmaxf(x * kLog2e, -126.0f), 128.0f);
  const float n = rintf(y);
  const float f = y - n;
  float p = 1.5345806605182588e-4f;
  p = fmaf(p, f, 1.3399932067841291e-3f);
  p = fmaf(p, f, 9.618489071726799e-3f);
  p = fmaf(p, f, 5.550328642129898e-2f);
  p = fmaf(p, f, 2.4022646248340607e-1f);
  p = fmaf(p, f, 6.931471824645996e-1f);
  p = fmaf(p, f, 1.0f);
  const float scale = __int_as_float((static_cast<int>(n) + 126) << 23);  // 2^(n-1)
  return (p * scale) * 2.0f;
}

// exp in one of the ExpMode flavours (nowcast.cuh); kExpMixed sends odd-numbered work
// items to the polynomial and even ones to the SFU.
template <int kExp>
__device__ __forceinline__ float exp_by_mode(float x, int odd) {
  if (kExp == kExpSfu) return exp_sfu(x);
  if (kExp == kExpPoly) return exp_poly(x);
  return odd ? exp_poly(x) : exp_sfu(x);
}

constexpr int kChains = 8;  // independent dependency chains per thread, for ILP

template <int kExp>
__global__ void exp_kernel(float* out, std::int64_t threads, int iters) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= threads) return;
  float x[kChains];
#pragma unroll
  for (int k = 0; k < kChains; ++k) x[k] = 0.5f + 0.01f * k + 1e-6f * static_cast<float>(i & 1023);
  // x <- exp(-x) converges (to 0.567...), so the chains stay finite however long they run.
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int k = 0; k < kChains; ++k) x[k] = exp_by_mode<kExp>(-x[k], k & 1);
  }
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kChains; ++k) sum += x[k];
  out[i] = sum;
}

}  // namespace

std::string exp_throughput(int exp_mode, std::uintptr_t out, std::int64_t threads, int iters,
                           std::uintptr_t stream, int device) {
  if (threads < 1 || iters < 1) return "threads and iters must be >= 1";
  if (!out) return "null device pointer";
  if (exp_mode != kExpSfu && exp_mode != kExpPoly && exp_mode != kExpMixed) {
    return "unknown exp_mode " + std::to_string(exp_mode);
  }
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return std::string("cudaSetDevice: ") + cudaGetErrorString(err);
  void (*kernel)(float*, std::int64_t, int) = exp_mode == kExpSfu    ? exp_kernel<kExpSfu>
                                              : exp_mode == kExpPoly ? exp_kernel<kExpPoly>
                                                                     : exp_kernel<kExpMixed>;
  constexpr int kBlock = 256;
  const auto blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  launch_kernel(kernel, dim3(blocks), dim3(kBlock), 0, reinterpret_cast<cudaStream_t>(stream),
                reinterpret_cast<float*>(out), threads, iters);
  err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("kernel launch: ") + cudaGetErrorString(err);
}

}  // namespace know::cuda
