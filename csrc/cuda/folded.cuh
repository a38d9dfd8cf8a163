// What every KNOWN kernel of this directory shares: the layout of the folded, packed head
// (../packed_layout.h, shared with the CPU kernels), the model's constants, reading a
// snapshot of any input dtype, and 3xTF32 tensor-core products (each float32 operand split
// into a TF32 "big" part and a TF32 "small" remainder; big*big + big*small + small*big
// keeps float32-level accuracy).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../packed_layout.h"
#include "device.cuh"

namespace know::cuda {

constexpr float kLeakySlope = 0.3f;
constexpr float kWnnEps = 1e-8f + 1e-5f;

// The kernels index the packed head in int (it has a few thousand floats).
using StreamLayout = PackedStreamT<int>;
using HeadLayout = PackedHeadT<int>;

// The windows of rows row[0 .. kRows-1] of an (n, S) array of snapshots of dtype kDtype,
// as float32, 0 past S and for rows past n.  Every load is issued before any value is
// converted: a conversion right after its own load would wait one memory round trip per
// value instead of one for them all.
template <int kDtype, int kRows>
__device__ __forceinline__ void load_windows_as(const void* rows,
                                                const std::int64_t (&row)[kRows],
                                                std::int64_t n, int S,
                                                float (&w)[kRows][kMaxWindow]) {
  using Raw = std::conditional_t<kDtype == kFloat32, float, std::uint16_t>;
  const Raw* src = static_cast<const Raw*>(rows);
  Raw raw[kRows][kMaxWindow];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int j = 0; j < kMaxWindow; ++j) {
      raw[r][j] = (row[r] < n && j < S) ? __ldg(src + row[r] * S + j) : Raw(0);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int j = 0; j < kMaxWindow; ++j) {
      if constexpr (kDtype == kBFloat16) w[r][j] = bfloat16_to_float(raw[r][j]);
      else if constexpr (kDtype == kFloat16) w[r][j] = half_to_float(raw[r][j]);
      else w[r][j] = raw[r][j];
    }
  }
}

// load_windows_as for a dtype known at run time (one branch for all the rows).
template <int kRows>
__device__ __forceinline__ void load_windows(const void* rows, int dtype,
                                             const std::int64_t (&row)[kRows], std::int64_t n,
                                             int S, float (&w)[kRows][kMaxWindow]) {
  if (dtype == kBFloat16) load_windows_as<kBFloat16>(rows, row, n, S, w);
  else if (dtype == kFloat16) load_windows_as<kFloat16>(rows, row, n, S, w);
  else load_windows_as<kFloat32>(rows, row, n, S, w);
}

// m16n8k8 operands (fragment layout: emulate.cuh), each as TF32 big and small parts.
struct AFrag {
  std::uint32_t big[4];
  std::uint32_t small[4];
};
struct BFrag {
  std::uint32_t big[2];
  std::uint32_t small[2];
};

template <bool kPrecise, int kCount>
__device__ __forceinline__ void split_tf32(const float (&v)[kCount], std::uint32_t (&big)[kCount],
                                           std::uint32_t (&small)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    big[i] = to_tf32(v[i]);
    if (kPrecise) small[i] = to_tf32(v[i] - as_float(big[i]));
  }
}

template <bool kPrecise>
__device__ __forceinline__ AFrag split(float a0, float a1, float a2, float a3) {
  AFrag f;
  split_tf32<kPrecise, 4>({a0, a1, a2, a3}, f.big, f.small);
  return f;
}

template <bool kPrecise>
__device__ __forceinline__ BFrag split_b(float b0, float b1) {
  BFrag f;
  split_tf32<kPrecise, 2>({b0, b1}, f.big, f.small);
  return f;
}

// d += a * b; the small cross terms go first so they are not lost behind the big one.
template <bool kPrecise>
__device__ __forceinline__ void mma(float (&d)[4], const AFrag& a, const BFrag& b) {
  if (kPrecise) {
    mma_tf32(d, a.small, b.big);
    mma_tf32(d, a.big, b.small);
  }
  mma_tf32(d, a.big, b.big);
}

}  // namespace know::cuda
