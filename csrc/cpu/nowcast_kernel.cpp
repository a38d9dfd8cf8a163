// The fused KNOWN inference kernel.  This one source is compiled once per instruction set,
// with -DKNOW_ISA=<namespace> and that set's flags (see simd.h and CMakeLists.txt), and once
// more with -DKNOW_BF16_PRODUCTS for the bfloat16 products of precision="bf16".
//
// The forward pass over a tile is tile_forward.h (shared with the training kernel), or
// tile_forward_bf16.h; this file runs it over the rows, and for more steps slides the
// window (still float32, like the reference) and predicts the tile again.
#include <omp.h>

#include <cstring>

#include "cpu/nowcast_kernel.h"
#if defined(KNOW_BF16_PRODUCTS)
#include "cpu/tile_forward_bf16.h"
#else
#include "cpu/tile_forward.h"
#endif

namespace know {
namespace KNOW_ISA {
namespace {

// The forward pass's panels and the scratch lines of one stream.
#if defined(KNOW_BF16_PRODUCTS)
struct Forward {
  static int64_t head_floats(int S) { return bf16_head_panel_floats(S); }
  static HeadPanels build(const float* packed, int S, float* dst) {
    return build_bf16_head(packed, S, dst);
  }
  static int64_t stream_lines(int S) { return bf16_stream_lines(S); }
  static void run(const float* inp, const StreamPanels& sp, float* lines, float* o) {
    bf16_stream(inp, sp, lines, o);
  }
};
#else
struct Forward {
  static int64_t head_floats(int S) { return head_panel_floats(S); }
  static HeadPanels build(const float* packed, int S, float* dst) {
    return build_head(packed, S, dst);
  }
  static int64_t stream_lines(int) { return kHidden + kBottleneck; }  // P and Z, adjacent
  static void run(const float* inp, const StreamPanels& sp, float* lines, float* o) {
    stream<false>(inp, sp, lines, o, nullptr);
  }
};
#endif
using Head = decltype(Forward::build(nullptr, 0, nullptr));

// Lines of the per-thread scratch tile: the raw window (S), its normalised form (S), the
// differences (S - 1), a stream's lines, scale, shift and the head's sum (3); rounded to
// whole cache lines so that threads never share one.
int64_t scratch_floats(int S) {
  return round_up((3 * S - 1 + Forward::stream_lines(S) + 3) * R, 16);
}

template <class T, class FromFloat>
void scatter(void* out, int64_t stride, int64_t col, int64_t row0, int64_t valid,
             const float* pred, FromFloat from_float) {
  T* dst = static_cast<T*>(out) + row0 * stride + col;
  for (int64_t r = 0; r < valid; ++r) dst[r * stride] = from_float(pred[r]);
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

void process_tile(const NowcastArgs& a, const Head& head, float* scratch, int64_t row0) {
  const int S = a.S;
  float* win = scratch;
  float* xs = win + S * R;
  float* ds = xs + S * R;
  float* pz = ds + (S - 1) * R;
  float* scale = pz + Forward::stream_lines(S) * R;
  float* shift = scale + R;
  float* o = shift + R;
  const int64_t valid = a.row_end - row0 < R ? a.row_end - row0 : R;
  load_tile(a.rows, a.rows_dtype, S, row0, valid, win);

  for (int step = 0; step < a.steps; ++step) {
    const float* x = normalise(win, S, a.wnn, xs, ds, scale, shift);
    for (int t = 0; t < R; t += VW) store(o + t, bcast(head.bo));
    Forward::run(x, head.stream[0], pz, o);
    Forward::run(ds, head.stream[1], pz, o);
    // The prediction goes into scale's line: it is the last use of the scale.
    for (int t = 0; t < TV; ++t) {
      const int at = t * VW;
      store(scale + at, prediction(x + (S - 1) * R + at, vtanh(load(o + at)), scale + at,
                                   shift + at, a.wnn));
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
  return Forward::head_floats(S) + int64_t(threads) * scratch_floats(S);
}

void nowcast(const NowcastArgs& a, float* workspace) {
  const Head head = Forward::build(a.packed, a.S, workspace);
  float* scratch0 = workspace + Forward::head_floats(a.S);
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
