// The fused vector-Jacobian product of one KNOWN prediction step.  Compiled once per
// instruction set, like nowcast_kernel.cpp, with whose forward (tile_forward.h) it shares
// every instruction, so the step it differentiates is bit-identical to nowcast's.
//
// Per tile of R rows (lanes), with every line in the thread's scratch tile:
//   forward   both streams, keeping h, c, e, v and [p; z] of each (cheaper to keep, in L1
//             and L2, than to recompute: the 128 exponentials cost about a fifth of the
//             forward);
//   seed      pred = (x_{S-1} + y) s + m0 with y = tanh(O) (s = 1, m0 = 0 for raw), so
//             dO = u s (1 - y^2) for the row's upstream u = dL/dpred;
//   backward  per stream, from the head down:
//               dv = dO wo leaky'(v)                          32 lines
//               [dp; dz] = [w2; a2] dv                        72 lines, as a product
//               db = dp e,  dc = dp p h,  dh = dp p c ln 2     (c is c' = c log2 e)
//               dz += [wb wc] [db; dc],  dzpre = dz relu'(z)
//             and the weight gradients  d[w2; a2] = [p; z] dv^T,  d[wb; wc] = z [db; dc]^T,
//             d[w1 | g] = inp [dh | dzpre]^T (wgrad.h), with the biases as the douts'
//             row sums;
//   rows      (only when asked) d inp = [w1 | g] [dh; dzpre], as a product: the folded g
//             = w1 wd is the only path from inp to z, and h's only use is the exponential.
//             The d stream's input gradient goes to x through d_k = x_{k+1} - x_k, and
//             x = (w - m0) / s back to w (row_grads below).
//
// FLOP per row (S = 5): forward 14,736 (the folded form), backward to the head 27,920,
// and the row gradient 2 x 72 x (2S - 1) = 1,296 more plus about 20 S of elementwise work.
//
// Threads take blocks of kVjpBlockTiles tiles; a block's gradient is summed in float32 in
// the thread's own buffer, then added in block order (omp ordered) to one float64 total.
// Row gradients are per row, written by whichever thread has the row's tile.
//
// Sub-gradients follow torch autograd: relu'(z) = 0 where z <= 0, leaky_relu'(v) = slope
// where v <= 0, and amax / amin share their gradient evenly among tied extremes.
#include <omp.h>

#include <cstring>

#include "cpu/tile_forward.h"
#include "cpu/vjp_kernel.h"
#include "cpu/wgrad.h"

namespace know {
namespace KNOW_ISA {
namespace {

constexpr float kLn2 = 0.693147180559945309f;
constexpr int kPZ = kHidden + kBottleneck;  // [p; z], and [dh; dzpre]
constexpr int kBC = 2 * kHidden;            // [db; dc]

// Row strides of the transposed inputs and of the gradient blocks: whole vectors, the
// padding columns zero.
constexpr int kLdPZ = (kPZ + VW - 1) / VW * VW;
constexpr int kLdZ = (kBottleneck + VW - 1) / VW * VW;
inline int ld_in(int S) { return int(round_up(S, VW)); }
// The input gradient's product has a column per input, padded to whole column blocks.
inline int in_cols(int n) { return int(round_up(n, JB)); }
static_assert(kHidden % VW == 0, "z's columns of [p; z]^T must start on a vector");

struct StreamBackPanels {
  const float* down;  // K = 32 (dv), 72 columns: [dp; dz] = [w2; a2] dv
  const float* dz;    // K = 128 ([db; dc]), 8 columns: [wb wc] [db; dc]
  const float* in;    // K = 72 ([dh; dzpre]), in_cols(n) columns: [w1 | g] [dh; dzpre]
  const float* wo;
};

int64_t back_panel_floats(int S) {
  int64_t total = 0;
  for (int n = S; n >= S - 1; --n)
    total += panel_floats(kOutHidden, kPZ) + panel_floats(kBC, kBottleneck) +
             panel_floats(kPZ, in_cols(n));
  return round_up(total, 16);
}

void build_back(const float* packed, const PackedHead& layout, float* dst,
                StreamBackPanels (&back)[2]) {
  const auto zero = [](int) { return 0.0f; };
  for (int s = 0; s < 2; ++s) {
    const PackedStream& ps = layout.stream[s];
    const float *w1 = packed + ps.w1, *g = packed + ps.g, *w2 = packed + ps.w2,
                *wb = packed + ps.wb, *wc = packed + ps.wc;
    back[s].down = dst;
    dst = build_panels(dst, kOutHidden, kPZ, zero,
                       [&](int c, int j) { return w2[c * kOutHidden + j]; });
    back[s].dz = dst;
    dst = build_panels(dst, kBC, kBottleneck, zero, [&](int m, int k) {
      return k < kHidden ? wb[m * kHidden + k] : wc[m * kHidden + k - kHidden];
    });
    back[s].in = dst;
    dst = build_panels(dst, kPZ, in_cols(ps.n), zero, [&](int c, int k) {
      if (c >= ps.n) return 0.0f;
      return k < kHidden ? w1[c * kHidden + k] : g[c * kBottleneck + k - kHidden];
    });
    back[s].wo = packed + layout.wo + s * kOutHidden;
  }
}

// The thread's scratch tile: lines of R floats, then the transposed inputs.
struct Tile {
  float *win, *xs, *ds, *scale, *shift, *o, *up, *dO, *dsd;
  float* pz[2];     // [p; z] of each stream (72 lines)
  float* saved[2];  // kSavedLines each
  float *dv, *dbc, *dhz, *dza;
  float* dinp[2];    // the streams' input gradients: S lines (x), S - 1 (d)
  float *pzT, *inT;  // R x kLdPZ, R x ld_in(S)
};

int64_t tile_lines(int S) {
  return 3 * S - 1 + 6 + 2 * (kPZ + kSavedLines) + kOutHidden + kBC + kPZ + kBottleneck +
         2 * S - 1;
}

int64_t tile_floats(int S) {
  return round_up(tile_lines(S) * R + R * (kLdPZ + ld_in(S)), 16);
}

Tile tile_at(float* p, int S) {
  Tile t;
  const auto take = [&](int64_t lines) {
    float* q = p;
    p += lines * R;
    return q;
  };
  t.win = take(S);
  t.xs = take(S);
  t.ds = take(S - 1);
  t.scale = take(1);
  t.shift = take(1);
  t.o = take(1);
  t.up = take(1);
  t.dO = take(1);
  t.dsd = take(1);
  for (int s = 0; s < 2; ++s) {
    t.pz[s] = take(kPZ);
    t.saved[s] = take(kSavedLines);
  }
  t.dv = take(kOutHidden);
  t.dbc = take(kBC);
  t.dhz = take(kPZ);
  t.dza = take(kBottleneck);
  t.dinp[0] = take(S);
  t.dinp[1] = take(S - 1);
  t.pzT = p;
  t.inT = p + R * kLdPZ;
  return t;
}

// One block's gradient, in the layouts the backward produces (transposed, lane partials).
struct StreamGrads {
  float* pz;       // 32 x kLdPZ: G[j][k] = d[w2; a2][k][j]
  float* z;        // 128 x kLdZ: G[u][m] = dwb[m][u], G[64 + u][m] = dwc[m][u]
  float* in;       // 72 x ld_in: G[j][k] = dw1[k][j], G[64 + m][k] = dg[k][m]
  float* bias_pz;  // lane partials (VW floats each): 32 of b2
  float* bias_z;   // 128: bb, then bc
  float* bias_in;  // 72: b1, then gb
  float* wo;       // 32
};

struct Grads {
  StreamGrads stream[2];
  float* bo;  // VW lane partials
};

int64_t grads_floats(int S) {
  const int64_t per_stream = kOutHidden * kLdPZ + kBC * kLdZ + kPZ * ld_in(S) +
                             (kOutHidden + kBC + kPZ + kOutHidden) * VW;
  return round_up(2 * per_stream + VW, 16);
}

Grads grads_at(float* p, int S) {
  Grads g;
  const auto take = [&](int64_t floats) {
    float* q = p;
    p += floats;
    return q;
  };
  for (StreamGrads& s : g.stream) {
    s.pz = take(kOutHidden * kLdPZ);
    s.z = take(kBC * kLdZ);
    s.in = take(kPZ * ld_in(S));
    s.bias_pz = take(kOutHidden * VW);
    s.bias_z = take(kBC * VW);
    s.bias_in = take(kPZ * VW);
    s.wo = take(kOutHidden * VW);
  }
  g.bo = take(VW);
  return g;
}

inline V select_positive(V test, V yes, V no) { return test > bcast(0.0f) ? yes : no; }

// dO = u dpred/dO for every row (0 for padding lanes, whose upstream is 0), and with row
// gradients the direct part of dpred/ds, u (x_{S-1} + y).
void seed(const VjpArgs& a, const float* x, const Tile& tl, const Grads& g) {
  V bo = load(g.bo);
  for (int t = 0; t < TV; ++t) {
    const int at = t * VW;
    const V y = vtanh(load(tl.o + at));
    const V u = load(tl.up + at);
    const V du = a.wnn ? u * load(tl.scale + at) : u;
    const V dO = du * (bcast(1.0f) - y * y);
    store(tl.dO + at, dO);
    bo += dO;
    if (a.wnn && a.grad_rows) store(tl.dsd + at, u * (load(x + (a.S - 1) * R + at) + y));
  }
  store(g.bo, bo);
}

void backward_stream(const float* inp, int n, int ld, const StreamBackPanels& bp, const float* pz,
                     const float* saved, const Tile& tl, const StreamGrads& g, float* dinp) {
  for (int j = 0; j < kOutHidden; ++j) {
    const V wo = bcast(bp.wo[j]);
    V gwo = load(g.wo + j * VW);
    for (int t = 0; t < TV; ++t) {
      const int at = t * VW;
      const V v = load(saved + (kSavedV + j) * R + at);
      const V dO = load(tl.dO + at);
      gwo = fma(vmax(v * bcast(kLeakySlope), v), dO, gwo);
      const V du = dO * wo;
      store(tl.dv + j * R + at, select_positive(v, du, du * bcast(kLeakySlope)));
    }
    store(g.wo + j * VW, gwo);
  }
  transpose(pz, kPZ, tl.pzT, kLdPZ);
  wgrad(tl.dv, kOutHidden, tl.pzT, kLdPZ, kLdPZ / VW, g.pz, kLdPZ, g.bias_pz);

  product(tl.dv, kOutHidden, bp.down, kPZ, [&](int c0, V(&acc)[JB][TV]) {
    if (c0 >= kHidden) {  // z's block (kHidden % JB == 0: no block is on both sides)
      for (int j = 0; j < JB; ++j)
        for (int t = 0; t < TV; ++t) store(tl.dza + (c0 - kHidden + j) * R + t * VW, acc[j][t]);
      return;
    }
    for (int j = 0; j < JB; ++j) {
      const int k = c0 + j;
      for (int t = 0; t < TV; ++t) {
        const int at = t * VW;
        const V dp = acc[j][t];
        const V pd = dp * load(pz + k * R + at);
        store(tl.dbc + k * R + at, dp * load(saved + (kSavedE + k) * R + at));
        store(tl.dbc + (kHidden + k) * R + at, pd * load(saved + (kSavedH + k) * R + at));
        store(tl.dhz + k * R + at, pd * (load(saved + (kSavedC + k) * R + at) * bcast(kLn2)));
      }
    }
  });
  wgrad(tl.dbc, kBC, tl.pzT + kHidden, kLdPZ, kLdZ / VW, g.z, kLdZ, g.bias_z);

  product(tl.dbc, kBC, bp.dz, kBottleneck, [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB; ++j) {
      const int m = c0 + j;
      for (int t = 0; t < TV; ++t) {
        const int at = t * VW;
        const V dz = acc[j][t] + load(tl.dza + m * R + at);
        const V z = load(pz + (kHidden + m) * R + at);
        store(tl.dhz + (kHidden + m) * R + at, z <= bcast(0.0f) ? V{} : dz);
      }
    }
  });
  transpose(inp, n, tl.inT, ld);
  wgrad(tl.dhz, kPZ, tl.inT, ld, ld / VW, g.in, ld, g.bias_in);

  if (!dinp) return;
  product(tl.dhz, kPZ, bp.in, in_cols(n), [&](int c0, V(&acc)[JB][TV]) {
    for (int j = 0; j < JB && c0 + j < n; ++j)
      for (int t = 0; t < TV; ++t) store(dinp + (c0 + j) * R + t * VW, acc[j][t]);
  });
}

// The streams' input gradients -> d pred / d rows (times u), in dinp[0]'s lines.
void row_grads(const VjpArgs& a, const float* x, const Tile& tl) {
  const int S = a.S;
  float *dx = tl.dinp[0], *dd = tl.dinp[1];
  for (int t = 0; t < TV; ++t) {
    const int at = t * VW;
    const V u = load(tl.up + at);
    for (int k = 0; k < S; ++k) {
      V g = load(dx + k * R + at);
      if (k > 0) g += load(dd + (k - 1) * R + at);
      if (k + 1 < S) g -= load(dd + k * R + at);
      if (k + 1 == S) g += a.wnn ? u * load(tl.scale + at) : u;  // x_{S-1} in pred
      store(dx + k * R + at, g);
    }
    if (!a.wnn) continue;  // raw: x is the row itself
    // x = v / s with v = w - m0 and s = 2 (max v - min v + eps).  The extremes are found
    // on w, where v's ties are (w - m0 is exact in float64, as torch's reference has it).
    const float* w = tl.win;
    V hi = load(w + at), lo = hi;
    for (int k = 1; k < S; ++k) {
      hi = vmax(hi, load(w + k * R + at));
      lo = vmin(lo, load(w + k * R + at));
    }
    const V one = bcast(1.0f), none = V{};
    V n_hi = none, n_lo = none, dx_x = none;
    for (int k = 0; k < S; ++k) {
      const V wk = load(w + k * R + at);
      n_hi += wk == hi ? one : none;
      n_lo += wk == lo ? one : none;
      dx_x = fma(load(dx + k * R + at), load(x + k * R + at), dx_x);
    }
    const V s = load(tl.scale + at);
    // s enters pred directly and through every x_k; torch's amax / amin backward shares
    // d/d(max) and d/d(min) evenly among the tied extremes.
    const V ds2 = (load(tl.dsd + at) - dx_x / s) * bcast(2.0f);
    const V share_hi = ds2 / n_hi, share_lo = ds2 / n_lo;
    V later = none;  // sum of dv_k for k >= 1: m0 = w_0 is subtracted from every v_k
    for (int k = 0; k < S; ++k) {
      const V wk = load(w + k * R + at);
      V dv = load(dx + k * R + at) / s;
      dv += wk == hi ? share_hi : none;
      dv -= wk == lo ? share_lo : none;
      if (k > 0) later += dv;
      store(dx + k * R + at, dv);
    }
    store(dx + at, u - later);  // m0 is also pred's shift
  }
}

void store_row_grads(const VjpArgs& a, const Tile& tl, int64_t row0, int64_t valid) {
  float* dst = a.grad_rows + row0 * a.S;
  for (int64_t r = 0; r < valid; ++r)
    for (int k = 0; k < a.S; ++k) dst[r * a.S + k] = tl.dinp[0][k * R + r];
}

void vjp_tile(const VjpArgs& a, const HeadPanels& head, const StreamBackPanels (&back)[2],
              const Tile& tl, const Grads& g, int64_t row0) {
  const int S = a.S;
  const int64_t valid = a.n_rows - row0 < R ? a.n_rows - row0 : R;
  load_tile(a.rows, a.rows_dtype, S, row0, valid, tl.win);
  for (int64_t r = 0; r < R; ++r) tl.up[r] = r < valid ? a.upstream[row0 + r] : 0.0f;
  const float* x = normalise(tl.win, S, a.wnn, tl.xs, tl.ds, tl.scale, tl.shift);
  for (int t = 0; t < R; t += VW) store(tl.o + t, bcast(head.bo));
  stream<true>(x, head.stream[0], tl.pz[0], tl.o, tl.saved[0]);
  stream<true>(tl.ds, head.stream[1], tl.pz[1], tl.o, tl.saved[1]);
  seed(a, x, tl, g);
  const float* inputs[2] = {x, tl.ds};
  for (int s = 0; s < 2; ++s)
    backward_stream(inputs[s], S - s, ld_in(S), back[s], tl.pz[s], tl.saved[s], tl,
                    g.stream[s], a.grad_rows ? tl.dinp[s] : nullptr);
  if (!a.grad_rows) return;
  row_grads(a, x, tl);
  store_row_grads(a, tl, row0, valid);
}

double hsum(const float* v) {
  double sum = 0.0;
  for (int i = 0; i < VW; ++i) sum += v[i];
  return sum;
}

// total (packed layout) += one block's gradient.
void add_block(const Grads& g, const PackedHead& layout, int S, double* total) {
  const int ld = ld_in(S);
  for (int s = 0; s < 2; ++s) {
    const PackedStream& ps = layout.stream[s];
    const StreamGrads& sg = g.stream[s];
    for (int j = 0; j < kHidden; ++j) {
      for (int k = 0; k < ps.n; ++k) total[ps.w1 + k * kHidden + j] += sg.in[j * ld + k];
      total[ps.b1 + j] += hsum(sg.bias_in + j * VW);
    }
    for (int m = 0; m < kBottleneck; ++m) {
      for (int k = 0; k < ps.n; ++k)
        total[ps.g + k * kBottleneck + m] += sg.in[(kHidden + m) * ld + k];
      total[ps.gb + m] += hsum(sg.bias_in + (kHidden + m) * VW);
    }
    for (int u = 0; u < kHidden; ++u) {
      for (int m = 0; m < kBottleneck; ++m) {
        total[ps.wb + m * kHidden + u] += sg.z[u * kLdZ + m];
        total[ps.wc + m * kHidden + u] += sg.z[(kHidden + u) * kLdZ + m];
      }
      total[ps.bb + u] += hsum(sg.bias_z + u * VW);
      total[ps.bc + u] += hsum(sg.bias_z + (kHidden + u) * VW);
    }
    for (int j = 0; j < kOutHidden; ++j) {
      for (int k = 0; k < kPZ; ++k) total[ps.w2 + k * kOutHidden + j] += sg.pz[j * kLdPZ + k];
      total[ps.b2 + j] += hsum(sg.bias_pz + j * VW);
      total[layout.wo + s * kOutHidden + j] += hsum(sg.wo + j * VW);
    }
  }
  total[layout.bo] += hsum(g.bo);
}

int64_t totals_floats(int S) { return round_up(2 * packed_head(S).size, 16); }

}  // namespace

int64_t vjp_workspace_floats(int S, int threads) {
  return head_panel_floats(S) + back_panel_floats(S) + totals_floats(S) +
         int64_t(threads) * (tile_floats(S) + grads_floats(S));
}

void vjp(const VjpArgs& a, float* workspace) {
  const int S = a.S;
  const PackedHead layout = packed_head(S);
  const HeadPanels head = build_head(a.packed, S, workspace);
  float* next = workspace + head_panel_floats(S);
  StreamBackPanels back[2];
  build_back(a.packed, layout, next, back);
  next += back_panel_floats(S);
  double* total = reinterpret_cast<double*>(next);
  for (int64_t i = 0; i < layout.size; ++i) total[i] = 0.0;
  next += totals_floats(S);

  const int64_t per_thread = tile_floats(S) + grads_floats(S);
  const int64_t tiles = (a.n_rows + R - 1) / R;
  const int64_t blocks = (tiles + kVjpBlockTiles - 1) / kVjpBlockTiles;
#pragma omp parallel num_threads(a.threads)
  {
    float* mine = next + omp_get_thread_num() * per_thread;
    std::memset(mine, 0, sizeof(float) * tile_floats(S));  // the transposes' padding columns
    const Tile tl = tile_at(mine, S);
    float* block_grads = mine + tile_floats(S);
    const Grads g = grads_at(block_grads, S);
    // Dynamic: the cores are often shared.  Ordered: the blocks' sums go in in block order.
#pragma omp for ordered schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      std::memset(block_grads, 0, sizeof(float) * grads_floats(S));
      const int64_t end = (b + 1) * kVjpBlockTiles < tiles ? (b + 1) * kVjpBlockTiles : tiles;
      for (int64_t i = b * kVjpBlockTiles; i < end; ++i) vjp_tile(a, head, back, tl, g, i * R);
#pragma omp ordered
      add_block(g, layout, S, total);
    }
  }
  for (int64_t i = 0; i < layout.size; ++i) a.grad_packed[i] = float(total[i]);
}

}  // namespace KNOW_ISA
}  // namespace know
