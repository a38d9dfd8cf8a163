// KNOWN's forward pass over one tile of rows, shared by the inference kernel
// (nowcast_kernel.cpp) and its vector-Jacobian product (vjp_kernel.cpp).  Sharing it is what
// makes the step a VJP differentiates bit-identical to nowcast's on the same instruction set.
// Per-ISA, like simd.h: only sources compiled with -DKNOW_ISA include it.
//
// Rows sit in SIMD lanes.  A tile holds R = TV * VW rows, and each value of the network for
// the tile (one snapshot, one hidden unit, ...) is a "line" of R floats in a per-thread
// scratch tile that stays in L1.  Each small matrix product of the folded head
// (packing.py) is computed JB output columns at a time for the whole tile: JB * TV
// accumulators live in registers, and each step over the input dimension loads TV input
// vectors and broadcasts JB weights, so every broadcast feeds TV FMAs and every load JB.
// The elementwise work (relu, the learned exp, LeakyReLU, the head product) is applied to
// the accumulators as each column block finishes, so nothing but the tile's lines is ever
// written before the prediction itself.
//
// Per stream (inp = x with n = S, or inp = d with n = S - 1):
//   Z = relu(inp @ g + gb)                                  8 lines
//   P = inp @ w1 + b1                                       64 lines (h)
//   P = (Z @ wb + bb) * exp((Z @ wc + bc) * P)              in place (as exp2, see kLog2e)
//   O += leaky_relu([P; Z] @ [w2; a2] + b2) @ wo_stream     P and Z are adjacent lines
// then pred = de-normalised(x_{S-1} + tanh(O + bo)).
#pragma once

#include <cstdint>

#include "cpu/nowcast_kernel.h"
#include "cpu/simd.h"
#include "cpu/vmath.h"
#include "packed_layout.h"

namespace know {
namespace KNOW_ISA {

constexpr float kLeakySlope = 0.3f;
constexpr float kWnnEps = float(1e-8 + 1e-5);  // reference.WNN_EPS as the float32 path sees it
// e^(c h) = 2^(c' h) with c' = c log2(e): folding the constant into wc and bc (rounded
// once, from double) saves the exp its range reduction's multiplications.
constexpr double kLog2e = 1.4426950408889634;

#if defined(__AVX512F__)
constexpr int TV = 3;  // 48 rows: 8 x 3 accumulators, 3 inputs, of 32 registers
constexpr int JB = 8;
#else
constexpr int TV = 3;  // AVX2: 4 x 3 accumulators + 3 inputs + 1 broadcast = 16 registers
constexpr int JB = 4;
#endif
constexpr int R = TV * VW;
static_assert(kBottleneck % JB == 0 && JB % 2 == 0, "column blocks must tile every product");

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A panel is what one column block reads, contiguous in the order the micro-kernel walks
// it: JB biases, then K rows of JB weights.
inline int64_t panel_floats(int K, int C) { return int64_t(K + 1) * C; }

// Floats of a head's panels, each of floats(K, C) (panel_floats here).
template <class Floats>
inline int64_t head_panel_floats_with(int S, Floats floats) {
  int64_t total = 0;
  for (int n = S; n >= S - 1; --n)
    total += floats(n, kBottleneck) + floats(n, kHidden) + floats(kBottleneck, 2 * kHidden) +
             floats(kHidden + kBottleneck, kOutHidden);
  return round_up(total, 16);  // keeps what follows 64-byte aligned
}

inline int64_t head_panel_floats(int S) { return head_panel_floats_with(S, panel_floats); }

// C columns as panels: column c's bias is bias(c), its weight for input k is weight(c, k).
template <class Bias, class Weight>
float* build_panels(float* dst, int K, int C, Bias bias, Weight weight) {
  for (int c0 = 0; c0 < C; c0 += JB) {
    for (int j = 0; j < JB; ++j) {
      dst[j] = bias(c0 + j);
      for (int k = 0; k < K; ++k) dst[JB + k * JB + j] = weight(c0 + j, k);
    }
    dst += int64_t(K + 1) * JB;
  }
  return dst;
}

struct StreamPanels {
  int n;
  const float* z;   // K = n, 8 columns
  const float* h;   // K = n, 64 columns
  const float* cb;  // K = 8, 128 columns: per block JB/2 of c, then the same JB/2 of b
  const float* u;   // K = 72 (w2 rows, then a2 rows), 32 columns
  const float* wo;  // this stream's 32 entries of the head
};

struct HeadPanels {
  StreamPanels stream[2];
  float bo;
};

// Reads the packed vector once per call into panels, each built by
// panels(dst, K, C, bias, weight) (build_panels here; tile_forward_bf16.h has its own);
// c_scale multiplies wc and bc (log2 e here: see kLog2e).
template <class Panels>
inline HeadPanels build_head_with(const float* packed, int S, float* dst, Panels panels,
                                  double c_scale) {
  const PackedHead layout = packed_head(S);
  HeadPanels head;
  for (int s = 0; s < 2; ++s) {
    const PackedStream& ps = layout.stream[s];
    const float *w1 = packed + ps.w1, *b1 = packed + ps.b1, *g = packed + ps.g,
                *gb = packed + ps.gb, *wb = packed + ps.wb, *bb = packed + ps.bb,
                *wc = packed + ps.wc, *bc = packed + ps.bc, *w2 = packed + ps.w2,
                *b2 = packed + ps.b2;
    StreamPanels& sp = head.stream[s];
    sp.n = ps.n;
    sp.z = dst;
    dst = panels(dst, ps.n, kBottleneck, [&](int c) { return gb[c]; },
                 [&](int c, int k) { return g[k * kBottleneck + c]; });
    sp.h = dst;
    dst = panels(dst, ps.n, kHidden, [&](int c) { return b1[c]; },
                 [&](int c, int k) { return w1[k * kHidden + c]; });
    sp.cb = dst;
    // Within a block, columns j < JB/2 are c (scaled by c_scale), the rest b, of one unit.
    const auto unit = [](int c) { return (c / JB) * (JB / 2) + c % (JB / 2); };
    const auto is_c = [](int c) { return c % JB < JB / 2; };
    dst = panels(
        dst, kBottleneck, 2 * kHidden,
        [&](int c) { return is_c(c) ? float(bc[unit(c)] * c_scale) : bb[unit(c)]; },
        [&](int c, int k) {
          return is_c(c) ? float(wc[k * kHidden + unit(c)] * c_scale) : wb[k * kHidden + unit(c)];
        });
    sp.u = dst;
    dst = panels(dst, kHidden + kBottleneck, kOutHidden, [&](int c) { return b2[c]; },
                 [&](int c, int k) { return w2[k * kOutHidden + c]; });
    sp.wo = packed + layout.wo + s * kOutHidden;
  }
  head.bo = packed[layout.bo];
  return head;
}

inline HeadPanels build_head(const float* packed, int S, float* dst) {
  return build_head_with(
      packed, S, dst,
      [](float* d, int K, int C, auto bias, auto weight) { return build_panels(d, K, C, bias, weight); },
      kLog2e);
}

// acc[j][t] = bias_j + sum_k in[k][t] * w[k][j] for one column block and the whole tile.
template <int J>
inline void micro_kernel(const float* in, int K, const float* panel, V (&acc)[J][TV]) {
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 4
    for (int t = 0; t < TV; ++t) acc[j][t] = bcast(panel[j]);
  }
  const float* w = panel + J;
  for (int k = 0; k < K; ++k, in += R, w += J) {
    V x[TV];
#pragma GCC unroll 4
    for (int t = 0; t < TV; ++t) x[t] = load(in + t * VW);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      const V wj = bcast(w[j]);
#pragma GCC unroll 4
      for (int t = 0; t < TV; ++t) acc[j][t] = fma(x[t], wj, acc[j][t]);
    }
  }
}

// One product over C columns, handing each finished block to epilogue(c0, acc).
template <class Epilogue>
inline void product(const float* in, int K, const float* panels, int C, Epilogue epilogue) {
  for (int c0 = 0; c0 < C; c0 += JB, panels += int64_t(K + 1) * JB) {
    V acc[JB][TV];
    micro_kernel<JB>(in, K, panels, acc);
    epilogue(c0, acc);
  }
}

// What a training forward keeps of one stream for its backward pass, beside P and Z:
// h, c (= c' = c log2 e as computed), e = 2^(c' h) and v, the LeakyReLU's input.
constexpr int kSavedH = 0, kSavedC = kHidden, kSavedE = 2 * kHidden, kSavedV = 3 * kHidden;
constexpr int kSavedLines = 3 * kHidden + kOutHidden;

// o (one line) accumulates the head's pre-activation; it lives in the scratch tile rather
// than in registers, which the micro-kernel needs all of.  With kSave, the lines above
// are written to `saved` as they are computed (nothing else changes).
template <bool kSave>
void stream(const float* inp, const StreamPanels& sp, float* pz, float* o, float* saved) {
  float* z = pz + kHidden * R;
  product(inp, sp.n, sp.z, kBottleneck, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j)
      for (int t = 0; t < TV; ++t) store(z + (c0 + j) * R + t * VW, vmax(V{}, acc[j][t]));
  });
  product(inp, sp.n, sp.h, kHidden, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j)
      for (int t = 0; t < TV; ++t) store(pz + (c0 + j) * R + t * VW, acc[j][t]);
  });
  product(z, kBottleneck, sp.cb, 2 * kHidden, [&](int c0, V(&acc)[JB][TV]) {
    constexpr int half = JB / 2;
    const int unit0 = c0 / 2;
    float* h = pz + unit0 * R;  // the block's `half` lines of h, overwritten by p
    V e[half * TV];
    for (int j = 0; j < half; ++j)
      for (int t = 0; t < TV; ++t) e[j * TV + t] = acc[j][t] * load(h + j * R + t * VW);
    if (kSave) {
      for (int j = 0; j < half; ++j)
        for (int t = 0; t < TV; ++t) {
          store(saved + (kSavedH + unit0 + j) * R + t * VW, load(h + j * R + t * VW));
          store(saved + (kSavedC + unit0 + j) * R + t * VW, acc[j][t]);
        }
    }
    vexp2(e);
    if (kSave) {
      for (int j = 0; j < half; ++j)
        for (int t = 0; t < TV; ++t)
          store(saved + (kSavedE + unit0 + j) * R + t * VW, e[j * TV + t]);
    }
    for (int j = 0; j < half; ++j)
      for (int t = 0; t < TV; ++t) store(h + j * R + t * VW, acc[half + j][t] * e[j * TV + t]);
  });
  product(pz, kHidden + kBottleneck, sp.u, kOutHidden, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j) {
      const V wo = bcast(sp.wo[c0 + j]);
      for (int t = 0; t < TV; ++t) {
        if (kSave) store(saved + (kSavedV + c0 + j) * R + t * VW, acc[j][t]);
        const V u = vmax(acc[j][t] * bcast(kLeakySlope), acc[j][t]);  // slope < 1
        store(o + t * VW, fma(u, wo, load(o + t * VW)));
      }
    }
  });
}

template <class T, class ToFloat>
void gather(const void* rows, int S, int64_t row0, int64_t valid, float* win, ToFloat to_float) {
  const T* src = static_cast<const T*>(rows) + row0 * S;
  for (int64_t r = 0; r < valid; ++r)
    for (int k = 0; k < S; ++k) win[k * R + r] = to_float(src[r * S + k]);
  // Padding lanes compute a harmless constant row; their results are never used.
  for (int64_t r = valid; r < R; ++r)
    for (int k = 0; k < S; ++k) win[k * R + r] = 0.0f;
}

// Rows [row0, row0 + valid) of an (n_rows, S) array as S lines of float32.
inline void load_tile(const void* rows, DType dtype, int S, int64_t row0, int64_t valid,
                      float* win) {
  switch (dtype) {
    case DType::kFloat32:
      gather<float>(rows, S, row0, valid, win, [](float v) { return v; });
      break;
    case DType::kBFloat16:
      gather<uint16_t>(rows, S, row0, valid, win, [](uint16_t v) { return bf16_to_f32(v); });
      break;
    case DType::kFloat16:
      gather<uint16_t>(rows, S, row0, valid, win, [](uint16_t v) { return f16_to_f32(v); });
      break;
  }
}

// win (S lines) -> x (S lines), d (S - 1 lines), and the de-normalisation scale/shift.
// Returns the lines that hold x (the raw window itself for norm = raw).
inline const float* normalise(const float* win, int S, bool wnn, float* x, float* d,
                              float* scale, float* shift) {
  if (wnn) {
    for (int t = 0; t < R; t += VW) {
      const V m0 = load(win + t);
      V hi = load(win + t) - m0;  // 0, or NaN for an infinite first value (as the reference)
      V lo = hi;
      for (int k = 0; k < S; ++k) {
        const V v = load(win + k * R + t) - m0;
        store(x + k * R + t, v);
        hi = vmax(hi, v);
        lo = vmin(lo, v);
      }
      const V s = ((hi - lo) + bcast(kWnnEps)) * bcast(2.0f);
      for (int k = 0; k < S; ++k) store(x + k * R + t, load(x + k * R + t) / s);
      store(scale + t, s);
      store(shift + t, m0);
    }
  } else {
    x = const_cast<float*>(win);
  }
  for (int k = 0; k + 1 < S; ++k)
    for (int t = 0; t < R; t += VW)
      store(d + k * R + t, load(x + (k + 1) * R + t) - load(x + k * R + t));
  return x;
}

// The prediction of one vector of rows from its last normalised value and the head's
// output y = tanh(O); scale and shift are read only for wnn (raw leaves them unwritten).
inline V prediction(const float* x_last, V y, const float* scale, const float* shift,
                    bool wnn) {
  V pred = load(x_last) + y;
  if (wnn) pred = pred * load(scale) + load(shift);
  return pred;
}

}  // namespace KNOW_ISA
}  // namespace know
