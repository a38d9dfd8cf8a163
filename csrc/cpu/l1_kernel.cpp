// The fused L1 training step of KNOWN.  Compiled once per instruction set, like
// nowcast_kernel.cpp, with whose forward (tile_forward.h) it shares every instruction.
//
// Per tile of R rows (lanes), with every line in the thread's scratch tile:
//   forward   both streams, keeping h, c, e, v and [p; z] of each (cheaper to keep, in L1
//             and L2, than to recompute: the 128 exponentials cost about a fifth of the
//             forward);
//   loss      e = pred - target (or / scale), |e| summed, dO = sign(e) de/dO (1 - y^2);
//   backward  per stream, from the head down:
//               dv = dO wo leaky'(v)                          32 lines
//               [dp; dz] = [w2; a2] dv                        72 lines, as a product
//               db = dp e,  dc = dp p h,  dh = dp p c ln 2     (c is c' = c log2 e)
//               dz += [wb wc] [db; dc],  dzpre = dz relu'(z)
//             and the weight gradients  d[w2; a2] = [p; z] dv^T,  d[wb; wc] = z [db; dc]^T,
//             d[w1 | g] = inp [dh | dzpre]^T, with the biases as the douts' row sums.
//
// A weight gradient sums over rows, which are the lanes.  Rather than keep a vector of
// lane-partial sums for every weight (about 120 KB per stream with AVX2, far beyond L1,
// and each loaded and stored for every TV FMAs), the inputs of each product are
// transposed once per tile (rows x features, features in lanes) and the gradient block
// G[j][k-vector] stays in registers while the loop runs over the tile's R rows, each step
// one vector load of the input and one broadcast of dout[j][r]: every accumulator is
// loaded and stored once per tile.  Biases and wo, one dout line each, keep lane-partial
// sums instead.
//
// Threads take blocks of kL1BlockTiles tiles; a block's gradient is summed in float32 in the
// thread's own buffer, then added in block order (omp ordered) to one float64 total.
//
// Sub-gradients follow torch autograd: sign(0) = sign(NaN) = 0, relu'(z) = 0 where z <= 0,
// leaky_relu'(v) = slope where v <= 0 (v > 0 ? 1 : slope).
#include <omp.h>

#include <cstring>

#include "cpu/l1_kernel.h"
#include "cpu/tile_forward.h"

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
static_assert(kHidden % VW == 0, "z's columns of [p; z]^T must start on a vector");

struct StreamBackPanels {
  const float* down;  // K = 32 (dv), 72 columns: [dp; dz] = [w2; a2] dv
  const float* dz;    // K = 128 ([db; dc]), 8 columns: [wb wc] [db; dc]
  const float* wo;
};

int64_t back_panel_floats() {
  return round_up(2 * (panel_floats(kOutHidden, kPZ) + panel_floats(kBC, kBottleneck)), 16);
}

void build_back(const float* packed, const PackedHead& layout, float* dst,
                StreamBackPanels (&back)[2]) {
  const auto zero = [](int) { return 0.0f; };
  for (int s = 0; s < 2; ++s) {
    const PackedStream& ps = layout.stream[s];
    const float *w2 = packed + ps.w2, *wb = packed + ps.wb, *wc = packed + ps.wc;
    back[s].down = dst;
    dst = build_panels(dst, kOutHidden, kPZ, zero,
                       [&](int c, int j) { return w2[c * kOutHidden + j]; });
    back[s].dz = dst;
    dst = build_panels(dst, kBC, kBottleneck, zero, [&](int m, int k) {
      return k < kHidden ? wb[m * kHidden + k] : wc[m * kHidden + k - kHidden];
    });
    back[s].wo = packed + layout.wo + s * kOutHidden;
  }
}

// The thread's scratch tile: lines of R floats, then the transposed inputs.
struct Tile {
  float *win, *xs, *ds, *scale, *shift, *o, *target, *live, *dO;
  float* pz[2];     // [p; z] of each stream (72 lines)
  float* saved[2];  // kSavedLines each
  float *dv, *dbc, *dhz, *dza;
  float *pzT, *inT;  // R x kLdPZ, R x ld_in(S)
};

int64_t tile_lines(int S) {
  return 3 * S - 1 + 6 + 2 * (kPZ + kSavedLines) + kOutHidden + kBC + kPZ + kBottleneck;
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
  t.target = take(1);
  t.live = take(1);
  t.dO = take(1);
  for (int s = 0; s < 2; ++s) {
    t.pz[s] = take(kPZ);
    t.saved[s] = take(kSavedLines);
  }
  t.dv = take(kOutHidden);
  t.dbc = take(kBC);
  t.dhz = take(kPZ);
  t.dza = take(kBottleneck);
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
  float* bo;    // VW lane partials
  float* loss;  // VW lane partials of sum |e|
};

int64_t grads_floats(int S) {
  const int64_t per_stream = kOutHidden * kLdPZ + kBC * kLdZ + kPZ * ld_in(S) +
                             (kOutHidden + kBC + kPZ + kOutHidden) * VW;
  return round_up(2 * per_stream + 2 * VW, 16);
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
  g.loss = take(VW);
  return g;
}

// K lines -> R x ld (row r: the K values of row r of the tile).
void transpose(const float* lines, int K, float* T, int ld) {
  for (int k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) T[r * ld + k] = lines[k * R + r];
}

// Columns of dout per register block: KV * JW accumulators, KV inputs and one broadcast
// fit in 16 registers (AVX2, SSE2/NEON) or 32 (AVX-512).
template <int KV>
constexpr int wgrad_cols() {
  return VW == 16 || KV == 1 ? 8 : 4;
}

// G[j][k] += sum over the tile's rows r of dout[j][r] * inT[r][k], for JW lines of dout
// and KV vectors of k.
template <int KV, int JW>
inline void wgrad_block(const float* dout, const float* inT, int ld_in, float* G, int ld_g) {
  V acc[JW][KV];
#pragma GCC unroll 8
  for (int j = 0; j < JW; ++j) {
#pragma GCC unroll 3
    for (int kv = 0; kv < KV; ++kv) acc[j][kv] = load(G + j * ld_g + kv * VW);
  }
  for (int r = 0; r < R; ++r) {
    V x[KV];
#pragma GCC unroll 3
    for (int kv = 0; kv < KV; ++kv) x[kv] = load(inT + r * ld_in + kv * VW);
#pragma GCC unroll 8
    for (int j = 0; j < JW; ++j) {
      const V w = bcast(dout[j * R + r]);
#pragma GCC unroll 3
      for (int kv = 0; kv < KV; ++kv) acc[j][kv] = fma(x[kv], w, acc[j][kv]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < JW; ++j) {
#pragma GCC unroll 3
    for (int kv = 0; kv < KV; ++kv) store(G + j * ld_g + kv * VW, acc[j][kv]);
  }
}

template <int KV>
void wgrad_columns(const float* dout, int J, const float* inT, int ld_in, float* G, int ld_g) {
  constexpr int JW = wgrad_cols<KV>();
  for (int j0 = 0; j0 < J; j0 += JW)
    wgrad_block<KV, JW>(dout + j0 * R, inT, ld_in, G + j0 * ld_g, ld_g);
}

// The weight gradient of one product: G (J x ld_g) += dout (J lines) inT (R x Kv vectors),
// and bias (J lane partials) += the row sums of dout.  J is a multiple of 8.
void wgrad(const float* dout, int J, const float* inT, int ld_in, int Kv, float* G, int ld_g,
           float* bias) {
  for (int kv = 0; kv < Kv;) {
    const float* in = inT + kv * VW;
    float* g = G + kv * VW;
    if (Kv - kv >= 3) {
      wgrad_columns<3>(dout, J, in, ld_in, g, ld_g);
      kv += 3;
    } else if (Kv - kv == 2) {
      wgrad_columns<2>(dout, J, in, ld_in, g, ld_g);
      kv += 2;
    } else {
      wgrad_columns<1>(dout, J, in, ld_in, g, ld_g);
      kv += 1;
    }
  }
  for (int j = 0; j < J; ++j) {
    V sum = load(bias + j * VW);
    for (int t = 0; t < TV; ++t) sum += load(dout + j * R + t * VW);
    store(bias + j * VW, sum);
  }
}

inline V select_positive(V test, V yes, V no) { return test > bcast(0.0f) ? yes : no; }

// |e| into the loss, and dO = d|e|/dO for every row (0 for padding lanes).
void loss_and_seed(const L1Args& a, const float* x, const Tile& tl, const Grads& g) {
  V loss = load(g.loss), bo = load(g.bo);
  for (int t = 0; t < TV; ++t) {
    const int at = t * VW;
    const V y = vtanh(load(tl.o + at));
    const V pred = prediction(x + (a.S - 1) * R + at, y, tl.scale + at, tl.shift + at, a.wnn);
    V e = pred - load(tl.target + at);
    if (a.wnn && a.normalised) e = e / load(tl.scale + at);
    const V live = load(tl.live + at);
    loss += as_float(as_int(e) & bcast_i(INT32_MAX)) * live;
    // sign(e) * live: NaN compares false both ways, so its sign is 0, as in torch.
    const V one = live, minus_one = -live;
    V dpred = select_positive(e, one, V{}) + select_positive(-e, minus_one, V{});
    if (a.wnn && !a.normalised) dpred = dpred * load(tl.scale + at);  // de/d(x + y)
    const V dO = dpred * (bcast(1.0f) - y * y);
    store(tl.dO + at, dO);
    bo += dO;
  }
  store(g.loss, loss);
  store(g.bo, bo);
}

void backward_stream(const float* inp, int n, int ld, const StreamBackPanels& bp, const float* pz,
                     const float* saved, const Tile& tl, const StreamGrads& g) {
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
}

void train_tile(const L1Args& a, const HeadPanels& head, const StreamBackPanels (&back)[2],
                const Tile& tl, const Grads& g, int64_t row0) {
  const int S = a.S;
  const int64_t valid = a.n_rows - row0 < R ? a.n_rows - row0 : R;
  load_tile(a.rows, a.rows_dtype, S, row0, valid, tl.win);
  for (int64_t r = 0; r < R; ++r) {
    tl.target[r] = r < valid ? a.target[row0 + r] : 0.0f;
    tl.live[r] = r < valid ? 1.0f : 0.0f;
  }
  const float* x = normalise(tl.win, S, a.wnn, tl.xs, tl.ds, tl.scale, tl.shift);
  for (int t = 0; t < R; t += VW) store(tl.o + t, bcast(head.bo));
  stream<true>(x, head.stream[0], tl.pz[0], tl.o, tl.saved[0]);
  stream<true>(tl.ds, head.stream[1], tl.pz[1], tl.o, tl.saved[1]);
  loss_and_seed(a, x, tl, g);
  const float* inputs[2] = {x, tl.ds};
  for (int s = 0; s < 2; ++s)
    backward_stream(inputs[s], S - s, ld_in(S), back[s], tl.pz[s], tl.saved[s], tl, g.stream[s]);
}

double hsum(const float* v) {
  double sum = 0.0;
  for (int i = 0; i < VW; ++i) sum += v[i];
  return sum;
}

// total (packed layout, then the loss) += one block's gradient.
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
  total[layout.size] += hsum(g.loss);
}

int64_t totals_floats(int S) { return round_up(2 * (packed_head(S).size + 1), 16); }

}  // namespace

int64_t l1_workspace_floats(int S, int threads) {
  return head_panel_floats(S) + back_panel_floats() + totals_floats(S) +
         int64_t(threads) * (tile_floats(S) + grads_floats(S));
}

double l1(const L1Args& a, float* workspace) {
  const int S = a.S;
  const PackedHead layout = packed_head(S);
  const HeadPanels head = build_head(a.packed, S, workspace);
  float* next = workspace + head_panel_floats(S);
  StreamBackPanels back[2];
  build_back(a.packed, layout, next, back);
  next += back_panel_floats();
  double* total = reinterpret_cast<double*>(next);
  for (int64_t i = 0; i <= layout.size; ++i) total[i] = 0.0;
  next += totals_floats(S);

  const int64_t per_thread = tile_floats(S) + grads_floats(S);
  const int64_t tiles = (a.n_rows + R - 1) / R;
  const int64_t blocks = (tiles + kL1BlockTiles - 1) / kL1BlockTiles;
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
      const int64_t end = (b + 1) * kL1BlockTiles < tiles ? (b + 1) * kL1BlockTiles : tiles;
      for (int64_t i = b * kL1BlockTiles; i < end; ++i) train_tile(a, head, back, tl, g, i * R);
#pragma omp ordered
      add_block(g, layout, S, total);
    }
  }
  for (int64_t i = 0; i < layout.size; ++i) a.grad[i] = float(total[i]);
  return total[layout.size];
}

}  // namespace KNOW_ISA
}  // namespace know
