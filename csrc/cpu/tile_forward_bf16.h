// KNOWN's forward pass over one tile with bfloat16 products (precision="bf16"): the
// operands of every learned matrix product -- the stream inputs x and d, z, p = b e, and
// the folded weights w1, g, wb, wc, w2, a2 -- rounded to bfloat16 (nearest even), the
// products exact and accumulated in float32 by VDPBF16PS; biases, the exp activation,
// LeakyReLU, the head's 64 -> 1 product (float32 FMAs), tanh, normalisation and the window
// slide in float32.  The same rounding as the Triton kernel's "bf16" mode
// (triton_common.mm); know_kernels/kernels/reference_bf16.py is it in float64.
//
// Per-ISA like tile_forward.h, whose tile (R = TV * VW rows, 48 here), normalisation and
// loads it shares; compiled only into the copy built with -mavx512bf16 (CMakeLists.txt).
//
// VDPBF16PS adds to each float32 lane the products of a PAIR of bfloat16 values, so the
// bfloat16 operands are stored as pair-lines: R 32-bit words, word r holding row r's
// values of two consecutive inputs k (low half) and k + 1 (high half).  A weight panel
// holds, per column block, JB float32 biases and then per input pair JB such words; the
// micro-kernel broadcasts one word per column and issues JB * TV VDPBF16PS per pair, half
// the instructions of the float32 FMA loop.  An odd input width is padded with a zero
// input (and zero weights).
//
// Per stream, with the scratch of bf16_stream_lines(S) lines:
//   pairs(inp)                                    ceil(n / 2) pair-lines
//   Z = relu(inp @ g + gb)      -> pairs           after P's pairs: [P; Z] is one operand
//   H = (inp @ w1 + b1) log2 e                    64 float32 lines
//   P = (Z @ wb + bb) * 2^((Z @ wc + bc) H)       32 pair-lines (64 values)
//   O += leaky_relu([P; Z] @ [w2; a2] + b2) @ wo_stream
#pragma once

#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "tile_forward_bf16.h needs -mavx512bf16 -mavx512f (CMakeLists.txt)"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/tile_forward.h"

namespace know {
namespace KNOW_ISA {

static_assert(VW == 16, "a pair-line vector is 16 rows of two bfloat16 values");

inline int pairs_of(int K) { return (K + 1) / 2; }

// Floats of a bf16 panel of K inputs and C columns: per block JB biases and pairs_of(K)
// rows of JB words.
inline int64_t panel16_floats(int K, int C) { return int64_t(pairs_of(K) + 1) * C; }

inline int64_t bf16_head_panel_floats(int S) {
  return head_panel_floats_with(S, panel16_floats);
}

// Scratch lines of one stream: H, [P; Z] pairs, the input's pairs.
inline int64_t bf16_stream_lines(int S) {
  return kHidden + (kHidden + kBottleneck) / 2 + pairs_of(S);
}

inline uint32_t bf16_pair(float lo, float hi) {
  return uint32_t(f32_to_bf16(lo)) | uint32_t(f32_to_bf16(hi)) << 16;
}

// As build_panels, with the weights of inputs 2i and 2i + 1 of a column in one word.
template <class Bias, class Weight>
float* build_panels16(float* dst, int K, int C, Bias bias, Weight weight) {
  const int pairs = pairs_of(K);
  for (int c0 = 0; c0 < C; c0 += JB) {
    for (int j = 0; j < JB; ++j) {
      dst[j] = bias(c0 + j);
      for (int i = 0; i < pairs; ++i) {
        const float hi = 2 * i + 1 < K ? weight(c0 + j, 2 * i + 1) : 0.0f;
        const uint32_t word = bf16_pair(weight(c0 + j, 2 * i), hi);
        std::memcpy(dst + JB + i * JB + j, &word, 4);
      }
    }
    dst += int64_t(pairs + 1) * JB;
  }
  return dst;
}

// The packed float32 head as bf16 panels (in tile_forward.h's StreamPanels, whose panel
// pointers then point at build_panels16's layout).  Unlike the float32 kernel, log2(e) is
// not folded into wc and bc (that would round other operands than the reference does): it
// scales H, in float32.
inline HeadPanels build_bf16_head(const float* packed, int S, float* dst) {
  return build_head_with(
      packed, S, dst,
      [](float* d, int K, int C, auto bias, auto weight) {
        return build_panels16(d, K, C, bias, weight);
      },
      1.0);
}

// One vector of a pair-line from the float32 values of inputs k (lo) and k + 1 (hi):
// VCVTNE2PS2BF16 puts lo's 16 values in the low half, hi's in the high half, and VPERMW
// interleaves them row by row.
inline __m512i pack_pairs(V lo, V hi) {
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

inline void store_pairs(float* line, V lo, V hi) {
  _mm512_store_si512(reinterpret_cast<void*>(line), pack_pairs(lo, hi));
}

// acc[j][t] = bias_j + sum over input pairs of VDPBF16PS, for one column block.
template <int J>
inline void micro_kernel16(const float* in, int pairs, const float* panel, V (&acc)[J][TV]) {
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 4
    for (int t = 0; t < TV; ++t) acc[j][t] = bcast(panel[j]);
  }
  const int32_t* w = reinterpret_cast<const int32_t*>(panel + J);
  for (int i = 0; i < pairs; ++i, in += R, w += J) {
    __m512bh x[TV];
#pragma GCC unroll 4
    for (int t = 0; t < TV; ++t)
      x[t] = (__m512bh)_mm512_load_si512(reinterpret_cast<const void*>(in + t * VW));
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const __m512bh wj = (__m512bh)_mm512_set1_epi32(w[j]);
#pragma GCC unroll 4
      for (int t = 0; t < TV; ++t) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], x[t], wj);
    }
  }
}

template <class Epilogue>
inline void product16(const float* in, int K, const float* panels, int C, Epilogue epilogue) {
  const int pairs = pairs_of(K);
  for (int c0 = 0; c0 < C; c0 += JB, panels += int64_t(pairs + 1) * JB) {
    V acc[JB][TV];
    micro_kernel16<JB>(in, pairs, panels, acc);
    epilogue(c0, acc);
  }
}

// 2^y of M vectors with AVX-512's rounding and scaling instructions: n = round(y) by
// VRNDSCALEPS, r = y - n exactly, 2^r by vmath.h's polynomial, p 2^n by VSCALEFPS, which
// rounds a subnormal result once and overflows to +inf.  Clamping y to [-151, 129] keeps
// r finite for infinite y and changes no result; NaN goes second and passes through.
// Fewer operations than vmath.h's vexp2 (whose shifter-and-integer scaling is for AVX2),
// the same accuracy: over every float32 y, max relative error 8.0e-8 (1.34 x 2^-24) where
// the result is a normal float, and every other input gives the float32 rounding of the
// true result (within one unit for subnormals), checked exhaustively (bench/RESULTS.md).
template <int M>
inline void vexp2_scalef(V (&y)[M]) {
  V r[M], n[M], p[M];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    y[m] = vmin(bcast(129.0f), vmax(bcast(-151.0f), y[m]));
    n[m] = _mm512_roundscale_ps(y[m], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[m] = y[m] - n[m];
  }
  exp2_poly(r, p);
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) y[m] = _mm512_scalef_ps(p[m], n[m]);
}

// One stream: inp is n float32 lines; lines is bf16_stream_lines(S) lines of scratch;
// o (one line) accumulates the head's pre-activation.
inline void bf16_stream(const float* inp, const StreamPanels& sp, float* lines, float* o) {
  float* h = lines;
  float* pz = h + kHidden * R;                         // [P; Z]: 36 pair-lines
  float* z = pz + (kHidden / 2) * R;
  float* ip = pz + ((kHidden + kBottleneck) / 2) * R;  // the input's pairs
  const int n = sp.n;
  for (int i = 0; i < pairs_of(n); ++i)
    for (int t = 0; t < R; t += VW)
      store_pairs(ip + i * R + t, load(inp + 2 * i * R + t),
                  2 * i + 1 < n ? load(inp + (2 * i + 1) * R + t) : V{});
  product16(ip, n, sp.z, kBottleneck, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; j += 2)
      for (int t = 0; t < TV; ++t)
        store_pairs(z + (c0 + j) / 2 * R + t * VW, vmax(V{}, acc[j][t]),
                    vmax(V{}, acc[j + 1][t]));
  });
  product16(ip, n, sp.h, kHidden, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j)
      for (int t = 0; t < TV; ++t)
        store(h + (c0 + j) * R + t * VW, acc[j][t] * bcast(float(kLog2e)));
  });
  product16(z, kBottleneck, sp.cb, 2 * kHidden, [&](int c0, V(&acc)[JB][TV]) {
    constexpr int half = JB / 2;
    const int unit0 = c0 / 2;
    V e[half * TV];
    for (int j = 0; j < half; ++j)
      for (int t = 0; t < TV; ++t)
        e[j * TV + t] = acc[j][t] * load(h + (unit0 + j) * R + t * VW);
    vexp2_scalef(e);
    for (int j = 0; j < half; j += 2)
      for (int t = 0; t < TV; ++t)
        store_pairs(pz + (unit0 + j) / 2 * R + t * VW, acc[half + j][t] * e[j * TV + t],
                    acc[half + j + 1][t] * e[(j + 1) * TV + t]);
  });
  product16(pz, kHidden + kBottleneck, sp.u, kOutHidden, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j) {
      const V wo = bcast(sp.wo[c0 + j]);
      for (int t = 0; t < TV; ++t) {
        const V u = vmax(acc[j][t] * bcast(kLeakySlope), acc[j][t]);
        store(o + t * VW, fma(u, wo, load(o + t * VW)));
      }
    }
  });
}

}  // namespace KNOW_ISA
}  // namespace know
