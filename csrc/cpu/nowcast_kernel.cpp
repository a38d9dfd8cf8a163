// The fused KNOWN kernel.  This one source is compiled once per instruction set, with
// -DKNOW_ISA=<namespace> and that set's flags (see simd.h and CMakeLists.txt).
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
// then pred = de-normalised(x_{S-1} + tanh(O + bo)); for more steps the window slides
// (still float32, like the reference) and the tile is predicted again.
#include <omp.h>

#include "cpu/nowcast_kernel.h"
#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace know {
namespace KNOW_ISA {
namespace {

constexpr int kHidden = 64;
constexpr int kBottleneck = 8;
constexpr int kOutHidden = 32;
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

// Lines of the per-thread scratch tile: the raw window (S), its normalised form (S), the
// differences (S - 1), P and Z (64 + 8, adjacent), scale, shift and the head's sum (3);
// rounded to whole cache lines so that threads never share one.
int64_t scratch_floats(int S) {
  return (int64_t(3 * S - 1 + kHidden + kBottleneck + 3) * R + 15) / 16 * 16;
}

// A panel is what one column block reads, contiguous in the order the micro-kernel walks
// it: JB biases, then K rows of JB weights.
int64_t panel_floats(int K, int C) { return int64_t(K + 1) * C; }

int64_t head_panel_floats(int S) {
  int64_t total = 0;
  for (int n = S; n >= S - 1; --n)
    total += panel_floats(n, kBottleneck) + panel_floats(n, kHidden) +
             panel_floats(kBottleneck, 2 * kHidden) +
             panel_floats(kHidden + kBottleneck, kOutHidden);
  return (total + 15) / 16 * 16;  // keeps the scratch tiles 64-byte aligned
}

struct Column {
  const float* w;  // weight k of this column is w[k * ld]
  int ld;
  float bias;
  double scale = 1.0;  // applied to weights and bias before rounding to float
};

template <class ColumnOf>
float* build_panels(float* dst, int K, int C, ColumnOf column_of) {
  for (int c0 = 0; c0 < C; c0 += JB) {
    for (int j = 0; j < JB; ++j) {
      const Column col = column_of(c0 + j);
      dst[j] = float(col.bias * col.scale);
      for (int k = 0; k < K; ++k)
        dst[JB + k * JB + j] = float(col.w[int64_t(k) * col.ld] * col.scale);
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

// Reads the packed vector (layout in packing.py) once per call into panels.
HeadPanels build_head(const float* packed, int S, float* dst) {
  HeadPanels head;
  const float* p = packed;
  for (int s = 0; s < 2; ++s) {
    const int n = S - s;
    const float* w1 = p;
    const float* b1 = w1 + n * kHidden;
    const float* g = b1 + kHidden;
    const float* gb = g + n * kBottleneck;
    const float* wb = gb + kBottleneck;
    const float* bb = wb + kBottleneck * kHidden;
    const float* wc = bb + kHidden;
    const float* bc = wc + kBottleneck * kHidden;
    const float* w2 = bc + kHidden;  // a2 follows w2 directly: [w2; a2] is one 72 x 32 matrix
    const float* b2 = w2 + (kHidden + kBottleneck) * kOutHidden;
    p = b2 + kOutHidden;

    StreamPanels& sp = head.stream[s];
    sp.n = n;
    sp.z = dst;
    dst = build_panels(dst, n, kBottleneck,
                       [&](int c) { return Column{g + c, kBottleneck, gb[c]}; });
    sp.h = dst;
    dst = build_panels(dst, n, kHidden, [&](int c) { return Column{w1 + c, kHidden, b1[c]}; });
    sp.cb = dst;
    dst = build_panels(dst, kBottleneck, 2 * kHidden, [&](int c) {
      const int half = JB / 2, block = c / JB, j = c % JB;
      const int unit = block * half + j % half;
      return j < half ? Column{wc + unit, kHidden, bc[unit], kLog2e}
                      : Column{wb + unit, kHidden, bb[unit]};
    });
    sp.u = dst;
    dst = build_panels(dst, kHidden + kBottleneck, kOutHidden,
                       [&](int c) { return Column{w2 + c, kOutHidden, b2[c]}; });
  }
  head.stream[0].wo = p;
  head.stream[1].wo = p + kOutHidden;
  head.bo = p[2 * kOutHidden];
  return head;
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

// o (one line) accumulates the head's pre-activation; it lives in the scratch tile rather
// than in registers, which the micro-kernel needs all of.
void stream(const float* inp, const StreamPanels& sp, float* pz, float* o) {
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
    float* h = pz + (c0 / 2) * R;  // the block's `half` lines of h, overwritten by p
    V e[half * TV];
    for (int j = 0; j < half; ++j)
      for (int t = 0; t < TV; ++t) e[j * TV + t] = acc[j][t] * load(h + j * R + t * VW);
    vexp2(e);
    for (int j = 0; j < half; ++j)
      for (int t = 0; t < TV; ++t) store(h + j * R + t * VW, acc[half + j][t] * e[j * TV + t]);
  });
  product(pz, kHidden + kBottleneck, sp.u, kOutHidden, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j) {
      const V wo = bcast(sp.wo[c0 + j]);
      for (int t = 0; t < TV; ++t) {
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
  // Padding lanes compute a harmless constant row; their results are never written.
  for (int64_t r = valid; r < R; ++r)
    for (int k = 0; k < S; ++k) win[k * R + r] = 0.0f;
}

template <class T, class FromFloat>
void scatter(void* out, int64_t stride, int64_t col, int64_t row0, int64_t valid,
             const float* pred, FromFloat from_float) {
  T* dst = static_cast<T*>(out) + row0 * stride + col;
  for (int64_t r = 0; r < valid; ++r) dst[r * stride] = from_float(pred[r]);
}

void load_tile(const NowcastArgs& a, int64_t row0, int64_t valid, float* win) {
  switch (a.in_dtype) {
    case DType::kFloat32:
      gather<float>(a.rows, a.S, row0, valid, win, [](float v) { return v; });
      break;
    case DType::kBFloat16:
      gather<uint16_t>(a.rows, a.S, row0, valid, win, [](uint16_t v) { return bf16_to_f32(v); });
      break;
    case DType::kFloat16:
      gather<uint16_t>(a.rows, a.S, row0, valid, win, [](uint16_t v) { return f16_to_f32(v); });
      break;
  }
}

void store_step(const NowcastArgs& a, int step, int64_t row0, int64_t valid, const float* pred) {
  const int64_t stride = a.all_steps ? a.steps : 1;
  const int64_t col = a.all_steps ? step : 0;
  switch (a.out_dtype) {
    case DType::kFloat32:
      scatter<float>(a.out, stride, col, row0, valid, pred, [](float v) { return v; });
      break;
    case DType::kBFloat16:
      scatter<uint16_t>(a.out, stride, col, row0, valid, pred,
                        [](float v) { return f32_to_bf16(v); });
      break;
    case DType::kFloat16:
      scatter<uint16_t>(a.out, stride, col, row0, valid, pred,
                        [](float v) { return f32_to_f16(v); });
      break;
  }
}

// win (S lines) -> x (S lines), d (S - 1 lines), and the de-normalisation scale/shift.
// Returns the lines that hold x (the raw window itself for norm = raw).
const float* normalise(const float* win, int S, Norm norm, float* x, float* d, float* scale,
                       float* shift) {
  if (norm == Norm::kWnn) {
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

void process_tile(const NowcastArgs& a, const HeadPanels& head, float* scratch, int64_t row0) {
  const int S = a.S;
  float* win = scratch;
  float* xs = win + S * R;
  float* ds = xs + S * R;
  float* pz = ds + (S - 1) * R;
  float* scale = pz + (kHidden + kBottleneck) * R;
  float* shift = scale + R;
  float* o = shift + R;
  const int64_t valid = a.row_end - row0 < R ? a.row_end - row0 : R;
  load_tile(a, row0, valid, win);

  for (int step = 0; step < a.steps; ++step) {
    const float* x = normalise(win, S, a.norm, xs, ds, scale, shift);
    for (int t = 0; t < R; t += VW) store(o + t, bcast(head.bo));
    stream(x, head.stream[0], pz, o);
    stream(ds, head.stream[1], pz, o);
    // The prediction goes into scale's line: it is the last use of the scale.
    for (int t = 0; t < TV; ++t) {
      const int at = t * VW;
      V pred = load(x + (S - 1) * R + at) + vtanh(load(o + at));
      if (a.norm == Norm::kWnn) pred = pred * load(scale + at) + load(shift + at);
      store(scale + at, pred);
    }
    if (a.all_steps || step + 1 == a.steps) store_step(a, step, row0, valid, scale);
    if (step + 1 < a.steps) {
      for (int k = 0; k + 1 < S; ++k)
        for (int t = 0; t < R; t += VW) store(win + k * R + t, load(win + (k + 1) * R + t));
      for (int t = 0; t < R; t += VW) store(win + (S - 1) * R + t, load(scale + t));
    }
  }
}

template <class F>
void apply(const float* x, float* y, int64_t n, F f) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) storeu(y + i, f(loadu(x + i)));
  if (i < n) {
    float buf[VW] = {};
    std::memcpy(buf, x + i, sizeof(float) * (n - i));
    storeu(buf, f(loadu(buf)));
    std::memcpy(y + i, buf, sizeof(float) * (n - i));
  }
}

}  // namespace

int tile_rows() { return R; }

int64_t workspace_floats(int S, int threads) {
  return head_panel_floats(S) + int64_t(threads) * scratch_floats(S);
}

void nowcast(const NowcastArgs& a, float* workspace) {
  const HeadPanels head = build_head(a.packed, a.S, workspace);
  float* scratch0 = workspace + head_panel_floats(a.S);
  const int64_t per_thread = scratch_floats(a.S);
  const int64_t tiles = (a.row_end - a.row_begin + R - 1) / R;
#pragma omp parallel num_threads(a.threads)
  {
    float* scratch = scratch0 + omp_get_thread_num() * per_thread;
    // Dynamic: the cores are often shared, and a tile costs the same everywhere.
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < tiles; ++i) process_tile(a, head, scratch, a.row_begin + i * R);
  }
}

void vec_exp(const float* x, float* y, int64_t n) {
  apply(x, y, n, [](V v) { return vexp(v); });
}

void vec_exp2(const float* x, float* y, int64_t n) {
  apply(x, y, n, [](V v) {
    V a[1] = {v};
    vexp2(a);
    return a[0];
  });
}

void vec_tanh(const float* x, float* y, int64_t n) {
  apply(x, y, n, [](V v) { return vtanh(v); });
}

}  // namespace KNOW_ISA
}  // namespace know
