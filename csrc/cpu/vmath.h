// Vectorised exp2, exp and tanh for one instruction set (see simd.h for why it is per-ISA).
//
// vexp2 (what the kernel's 128 exponentials per row use, log2(e) being folded into the
// weights): 2^y = 2^n 2^r with n = round(y), r = y - n exact, 2^r by a degree-6
// polynomial.  vexp: n = round(x log2 e), r = x - n ln 2 by Cody-Waite (ln 2 split in two),
// then the same polynomial on r log2 e.
//
// Max relative error over EVERY finite float input whose result is a normal float,
// against float64, measured exhaustively by `bench/bench_nowcast_cpu.py --exp-accuracy`
// (bench/RESULTS.md): avx2 build (FMA) vexp2 8.0e-8 (1.34 x 2^-24), vexp 1.07e-7 (1.79 x
// 2^-24), vtanh 1.51e-7 (2.54 x 2^-24); portable x86-64 build (SSE2, no FMA) 1.03e-7,
// 1.27e-7, 1.48e-7.  Every other input gives the float32 rounding of the true result
// (to within one unit for subnormal results): exp overflows to +inf, underflows through the
// subnormals to +0, exp(+-inf) = +inf / +0, tanh(+-inf) = +-1, and NaN stays NaN.
//
// vtanh: odd polynomial below |x| = 0.625 (no cancellation near 0), 1 - 2/(e^{2|x|} + 1)
// above.
#pragma once

#include "cpu/simd.h"

namespace know {
namespace KNOW_ISA {

// 2^r for |r| <= 1/2: near-minimax fit for relative error (2e-9 before the coefficients
// were rounded to float, 1.6e-8 after), constant term pinned to 1.  Horner: the last step
// is one correctly rounded fma(.., r, 1).
template <int M>
inline void exp2_poly(const V (&r)[M], V (&p)[M]) {
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) p[m] = fma(bcast(0x1.41fb2cp-13f), r[m], bcast(0x1.5f3f32p-10f));
  const float coefficients[] = {0x1.3b2d5p-7f, 0x1.c6aee6p-5f, 0x1.ebfbdcp-3f, 0x1.62e43p-1f,
                                1.0f};
#pragma GCC unroll 8
  for (float c : coefficients) {
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) p[m] = fma(p[m], r[m], bcast(c));
  }
}

// p * 2^n, where the bits of t are B + n with n in [-151, 128] and B = bits(1.5 * 2^23)
// (what adding that shifter leaves).  2^n is applied as 2^floor(n/2) 2^ceil(n/2), each
// a normal float, so subnormal and overflowing results are rounded once, correctly, by
// the last product.  B is even and shifting left by 23 drops everything above the
// exponent field, so with u = bits(t) + 2 * 127:
//   (u >> 1) << 23 = (floor(n/2) + 127) << 23,   (u - (u >> 1)) << 23 = (ceil(n/2) + 127) << 23.
inline V scale_pow2(V p, VI t_bits) {
  const VI u = t_bits + 2 * 127;
  const VI half = u >> 1;
  return p * as_float(half << 23) * as_float((u - half) << 23);
}

constexpr float kShifter = 0x1.8p23f;  // x + 1.5 * 2^23 rounds x to an integer, kept in the
                                       // low mantissa bits

// 2^y of M independent vectors, each step applied to all of them before the next: one
// chain is ~15 dependent operations, and interleaving several is what keeps the FMA pipes
// busy (out-of-order windows are too small to find that parallelism on their own).
// Rounding, reduction and the upper clamp use additions and integer operations only,
// which run beside the FMAs instead of competing with them.
template <int M>
inline void vexp2(V (&y)[M]) {
  V r[M], p[M];
  VI t[M];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    // Below -151 every result is 0; NaN goes second so that it passes through.
    y[m] = vmax(bcast(-151.0f), y[m]);
    t[m] = as_int(y[m] + bcast(kShifter));
    // n is capped at 128: a larger y, +inf included, leaves r > 1/2 and p(r) > 1, so the
    // result still overflows to +inf; a NaN y keeps r = NaN whatever n is.
    const VI top = bcast_i(int32_t(0x4B400000 + 128));  // 0x4B400000 = bits(kShifter)
    t[m] = t[m] < top ? t[m] : top;
    r[m] = y[m] - (as_float(t[m]) - bcast(kShifter));  // exact
  }
  exp2_poly(r, p);
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) y[m] = scale_pow2(p[m], t[m]);
}

// e^x with Cody-Waite reduction: n = round(x log2 e), r = x - n ln 2 with ln 2 split in
// two so that n ln2_hi is exact, then 2^(r log2 e) by the same polynomial.
inline V vexp(V x) {
  // Clamping keeps n in [-150, 128]; results there already overflow to inf or underflow
  // to 0, so the clamp changes no value.  x goes second: NaN passes through.
  x = vmax(bcast(-104.0f), vmin(bcast(89.0f), x));
  const V t = fma(x, bcast(0x1.715476p+0f), bcast(kShifter));
  const V n = t - bcast(kShifter);
  V r = fma(n, bcast(-0x1.63p-1f), x);     // ln2_hi = 0.693359375 has 9 bits
  r = fma(n, bcast(0x1.bd0106p-13f), r);  // -ln2_lo
  const V r2[1] = {r * bcast(0x1.715476p+0f)};
  V p[1];
  exp2_poly(r2, p);
  return scale_pow2(p[0], as_int(t));
}

inline V vtanh(V x) {
  // Both branches work on |x| and the sign goes back on last, so tanh(-0) = -0.
  const VI sign = as_int(x) & bcast_i(INT32_MIN);
  const V a = as_float(as_int(x) ^ sign);
  // Cephes tanhf coefficients for |x| < 0.625.
  const V z = a * a;
  V q = bcast(-5.70498872745e-3f);
  q = fma(q, z, bcast(2.06390887954e-2f));
  q = fma(q, z, bcast(-5.37397155531e-2f));
  q = fma(q, z, bcast(1.33314422036e-1f));
  q = fma(q, z, bcast(-3.33332819422e-1f));
  const V small = fma(q * z, a, a);
  const V e = vexp(a + a);
  const V large = bcast(1.0f) - bcast(2.0f) / (e + bcast(1.0f));
  return as_float(as_int(a < bcast(0.625f) ? small : large) | sign);
}

}  // namespace KNOW_ISA
}  // namespace know
