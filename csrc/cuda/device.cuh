// Device-side building blocks shared by the kernels: TF32 tensor-core products, the two
// ways of computing exp, half-precision conversions, and kernel launch.  Each primitive
// that needs PTX has an emulated twin (emulate.cuh) used when compiled for the CPU.
#pragma once

#include <cstdint>
#include <utility>

#include "nowcast.cuh"

#ifdef KNOW_CUDA_EMULATE
#include "emulate.cuh"
#define KNOW_DYNAMIC_SHARED(name) float* name = emu::dynamic_shared()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define KNOW_DYNAMIC_SHARED(name) extern __shared__ __align__(16) float name[]
#endif

namespace know::cuda {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float as_float(std::uint32_t u) { return __uint_as_float(u); }

// Round to TF32 (10 explicit mantissa bits), nearest with ties away from zero.
__device__ __forceinline__ std::uint32_t to_tf32(float x) {
#ifdef KNOW_CUDA_EMULATE
  return emu::cvt_rna_tf32(x);
#else
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

// d += a * b on the tensor cores: one warp-wide m16n8k8 product with TF32 operands.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                                         const std::uint32_t (&b)[2]) {
#ifdef KNOW_CUDA_EMULATE
  emu::mma_m16n8k8_tf32(d, a, b);
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// 2^x on the special-function unit: ex2.approx (max relative error about 2^-22).
__device__ __forceinline__ float exp2_sfu(float x) {
#ifdef KNOW_CUDA_EMULATE
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

__device__ __forceinline__ float bfloat16_to_float(std::uint16_t b) {
  return __uint_as_float(static_cast<std::uint32_t>(b) << 16);
}

__device__ __forceinline__ float half_to_float(std::uint16_t h) {
#ifdef KNOW_CUDA_EMULATE
  return emu::half_to_float(h);
#else
  return __half2float(__ushort_as_half(h));
#endif
}

__device__ __forceinline__ std::uint16_t float_to_bfloat16(float f) {
#ifdef KNOW_CUDA_EMULATE
  return emu::float_to_bfloat16(f);
#else
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#endif
}

__device__ __forceinline__ std::uint16_t float_to_half(float f) {
#ifdef KNOW_CUDA_EMULATE
  return emu::float_to_half(f);
#else
  return __half_as_ushort(__float2half_rn(f));
#endif
}

template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                          std::size_t smem_bytes, cudaStream_t stream, Args&&... args) {
#ifdef KNOW_CUDA_EMULATE
  (void)stream;
  emu::launch(kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace know::cuda
