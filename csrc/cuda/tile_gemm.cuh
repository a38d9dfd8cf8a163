// Matrix products between buffers in shared memory for a block of warps, on the tensor
// cores in 3xTF32 (folded.cuh), with the writers that store or add their outputs.  Used by
// the VJP kernel (vjp.cu), whose products run over a tile's rows as often as over the
// hidden units, so its operands carry strides (a transpose is a swap of strides).
#pragma once

#include "folded.cuh"

namespace know::cuda {

// Element (i, k) of a product operand lies at p[i * si + k * sk]: a transpose swaps the
// strides, so the weight-gradient products read the activations as they were stored.
struct Operand {
  const float* p;
  int si, sk;
};

// out(i, j, value) for every i < M, j < N of A (M x K) @ B (K x N), with 3xTF32 m16n8k8
// products by a block of kWarps warps; operands read as zero past M and K.  N is a multiple of 8.  Warps take the
// 16 x 8 output tiles in turn, so two calls with the same M and N hand every (i, j) to the
// same lane: a later call may add to what an earlier one wrote without a barrier.
template <int kWarps, typename Out>
__device__ __forceinline__ void tile_gemm(int M, int N, int K, Operand a, Operand b, Out out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles_n = N / 8;
  const int tiles = (M + 15) / 16 * tiles_n;
  for (int tile = threadIdx.x >> 5; tile < tiles; tile += kWarps) {
    const int i0 = tile / tiles_n * 16, j0 = tile % tiles_n * 8;
    const auto av = [&](int i, int k) { return i < M && k < K ? a.p[i * a.si + k * a.sk] : 0.0f; };
    const auto bv = [&](int k) { return k < K ? b.p[k * b.si + (j0 + g) * b.sk] : 0.0f; };
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 8) {
      mma<true>(d, split<true>(av(i0 + g, k0 + t), av(i0 + g + 8, k0 + t),
                               av(i0 + g, k0 + t + 4), av(i0 + g + 8, k0 + t + 4)),
                split_b<true>(bv(k0 + t), bv(k0 + t + 4)));
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + g + 8 * (q >> 1);
      if (i < M) out(i, j0 + 2 * t + (q & 1), d[q]);
    }
  }
}

// Output writers for gemm: C = A B, C = A B + bias, C = relu(A B + bias), C += A B.
__device__ __forceinline__ auto put(float* c, int ld) {
  return [=](int i, int j, float v) { c[i * ld + j] = v; };
}
__device__ __forceinline__ auto store(float* c, int ld, const float* bias) {
  return [=](int i, int j, float v) { c[i * ld + j] = v + bias[j]; };
}
__device__ __forceinline__ auto store_relu(float* c, int ld, const float* bias) {
  return [=](int i, int j, float v) { c[i * ld + j] = fmaxf(v + bias[j], 0.0f); };
}
__device__ __forceinline__ auto add(float* c, int ld) {
  return [=](int i, int j, float v) { c[i * ld + j] += v; };
}
// C = A B and C += A B for the columns j < n only (a stream's n inputs of kMaxWindow).
__device__ __forceinline__ auto put_cols(float* c, int ld, int n) {
  return [=](int i, int j, float v) { if (j < n) c[i * ld + j] = v; };
}
__device__ __forceinline__ auto add_cols(float* c, int ld, int n) {
  return [=](int i, int j, float v) { if (j < n) c[i * ld + j] += v; };
}

}  // namespace know::cuda
