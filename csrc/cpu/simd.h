// Vector and scalar primitives for ONE instruction set: the one the including translation
// unit is compiled for (-mavx512f..., -mavx2 -mfma -mf16c, or no flags at all).
//
// Only per-ISA sources include this header, and each passes -DKNOW_ISA=<namespace>.
// Everything here lives in know::KNOW_ISA so that the copies compiled with different flags
// never share a symbol: were an inline function compiled with -mavx512f merged by the
// linker with its portable twin, the portable path could end up executing AVX-512.  For
// the same reason per-ISA sources use no standard-library templates.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef KNOW_ISA
#error "per-ISA sources must be compiled with -DKNOW_ISA=<namespace>"
#endif

namespace know {
namespace KNOW_ISA {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX2__)
constexpr int VW = 8;
#else
constexpr int VW = 4;  // SSE2 on x86-64, NEON on AArch64: both are part of the base ISA
#endif

// GCC/Clang vector extensions: arithmetic operators work lane-wise and the types convert
// freely to the intrinsic types (__m256 is the same kind of vector).
typedef float V __attribute__((vector_size(VW * 4)));
typedef int32_t VI __attribute__((vector_size(VW * 4)));

// Not V{} + x: adding +0.0 is not an identity (-0.0 + 0.0 = +0.0), so the compiler
// would emit that addition before every broadcast.
inline V bcast(float x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#elif defined(__AVX2__)
  return _mm256_set1_ps(x);
#else
  V v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
#endif
}
inline VI bcast_i(int32_t x) { return VI{} + x; }
inline V as_float(VI x) { return (V)x; }
inline VI as_int(V x) { return (VI)x; }

// Aligned: the kernel's scratch lines are VW-float aligned.
inline V load(const float* p) { return *reinterpret_cast<const V*>(p); }
inline void store(float* p, V v) { *reinterpret_cast<V*>(p) = v; }

inline V loadu(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, V v) { std::memcpy(p, &v, sizeof v); }

inline V fma(V a, V b, V c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;  // contracted to one instruction where the base ISA has FMA (AArch64)
#endif
}

// x86 MINPS/MAXPS semantics on every target: when either operand is NaN the result is the
// SECOND operand.  Callers put the value that must propagate NaN second.
inline V vmin(V a, V b) {
#if defined(__AVX512F__)
  return _mm512_min_ps(a, b);
#elif defined(__AVX2__)
  return _mm256_min_ps(a, b);
#else
  return a < b ? a : b;
#endif
}
inline V vmax(V a, V b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, b);
#elif defined(__AVX2__)
  return _mm256_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}

// ---- scalar storage conversions (run once per row value, not in the hot loops) ----

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN becomes the canonical quiet NaN 0x7FC0 (as torch does).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24 is exact in float
    const float mag = float(mantissa) * 0x1p-24f;
    return bits_to_f32(f32_to_bits(mag) | sign);
  }
  if (exponent == 31) return bits_to_f32(sign | 0x7F800000u | (mantissa << 13));
  return bits_to_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
}

// Round to nearest even, overflow to infinity, NaN stays NaN (quiet).
inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((u >> 13) & 0x3FFu));
  if (u >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to infinity
  if (u < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 puts the half's mantissa in the low
    // bits of the float's and lets the FPU do the round-to-nearest-even.
    const float shifted = bits_to_f32(u) + 0.5f;
    return uint16_t(sign | (f32_to_bits(shifted) - 0x3F000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + odd;  // rebias the exponent (127 -> 15) and round half to even
  return uint16_t(sign | (u >> 13));
#endif
}

}  // namespace KNOW_ISA
}  // namespace know
