// Micro-benchmark of the exp flavours (ExpMode): how fast can an SM evaluate exp on the
// special-function units, on the FMA pipes, or on both at once?  bench/bench_nowcast_gpu.py
// times it; the answer says which kExp suits the nowcast kernel on a given card.
#include <algorithm>

#include "device.cuh"
#include "nowcast.cuh"

namespace know::cuda {
namespace {

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
