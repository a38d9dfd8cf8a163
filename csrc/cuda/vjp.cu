// The fused VJP of one nowcast step of KNOWN: forward through both streams and the head,
// then, given the upstream gradient u of each row's prediction, the backward pass to every
// folded parameter and optionally to the rows, in one kernel.
//
// Work split.  The row tiles (kTile rows each) are cut into at most `groups` groups of
// consecutive tiles.  A block stages the packed head in shared memory once, then walks
// groups (group blockIdx.x, + gridDim.x, ...), keeping the group's gradient in shared
// memory (packed layout), zeroed at the group's start.  For a tile, every matrix product runs
// on the tensor cores in 3xTF32 from shared-memory buffers of the tile's activations:
// products over the hidden units (row-major operands) and the weight-gradient products over
// the tile's rows (transposed operands: only the strides change).  Elementwise steps (exp,
// the products of the chain rule, relu') run between them, one barrier apart.
//
// Per tile:
//   load and normalise the rows;
//   forward x, then forward d: z = relu(in g + gb), h, b, c, e = exp(c h), p = b e,
//     v = z a2 + p w2 + b2 (z and v kept per stream; h, c, e, p only for the last stream);
//   head, per row: y = bo + leaky(v) . wo, tanh, dy = dL/dy = u s tanh'(y);
//   backward d with its h, c, e, p still there, then recompute x's and backward x, each
//     also giving dL/d(its input) when the rows' gradient is asked for;
//   the rows' gradient, per row: through the differences of the d stream, x_last, and the
//     normalisation, whose max and min share their gradient evenly among tied values.
// Each weight gradient of a tile is one product over the tile's rows added to the group's
// copy; at the end of a group the block writes that copy to the group's row of a
// (groups, P) workspace and a second kernel sums the rows in a fixed order, so the result
// depends neither on timing nor on the number of blocks.
//
// Accuracy: 3xTF32 products (float32-level) and float32 elsewhere, with expf and IEEE
// division; the tanh and its derivative come from exp(-2|y|) so neither overflows nor
// cancels near saturation.  Sub-gradients follow torch: relu'(0) = 0, leaky_relu'(0) =
// slope, amax / amin split evenly among ties.
#include <algorithm>

#include "device.cuh"
#include "folded.cuh"
#include "tile_gemm.cuh"
#include "vjp.cuh"

namespace know::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 32;                  // rows per tile
constexpr int kHeadLanes = kThreads / kTile;  // threads that share one row's head
static_assert(kHeadLanes == 8 && 2 * kOutHidden == 8 * kHeadLanes,
              "the head's 64 terms are split 8 per thread over 8 threads per row");
// Leading dimensions of the tile buffers, padded so that a fragment load (8 rows x 4
// columns) falls on distinct shared-memory banks.
constexpr int kLd8 = 12, kLd32 = 36, kLd64 = 68;
// Per-row values of the tile, one array of kTile each.
enum RowValue { kScale, kShift, kLast, kUpstream, kOut, kDy, kRowValues };

__host__ __device__ constexpr int round4(int x) { return (x + 3) & ~3; }

constexpr int kTileFloats = 2 * kTile * kLd8      // in: x and d
                            + 2 * kTile * kLd8    // z per stream
                            + 2 * kTile * kLd32   // v per stream, then dL/dv
                            + 5 * kTile * kLd64   // h, c, e, p, dp of one stream
                            + kTile * kLd8        // dz
                            + 2 * kTile * kLd8    // dL/d(input) per stream
                            + kRowValues * kTile;

__host__ __device__ inline int smem_floats(int S) {
  const int floats = packed_head<int>(S).size;
  return 2 * round4(floats) + kTileFloats;
}

struct Smem {
  float* w;     // the packed head
  float* grad;  // the group's gradient (packed layout)
  float* in[2];
  float* z[2];
  float* v[2];
  float *h, *c, *e, *p, *dp;
  float* dz;
  float* din[2];
  float* row;   // row[k * kTile + r]: RowValue k of tile row r
};

__device__ inline Smem carve(float* base, int P) {
  Smem m;
  float* at = base;
  const auto take = [&](int floats) {
    float* r = at;
    at += floats;
    return r;
  };
  m.w = take(round4(P));
  m.grad = take(round4(P));
  for (int s = 0; s < 2; ++s) m.in[s] = take(kTile * kLd8);
  for (int s = 0; s < 2; ++s) m.z[s] = take(kTile * kLd8);
  for (int s = 0; s < 2; ++s) m.v[s] = take(kTile * kLd32);
  m.h = take(kTile * kLd64);
  m.c = take(kTile * kLd64);
  m.e = take(kTile * kLd64);
  m.p = take(kTile * kLd64);
  m.dp = take(kTile * kLd64);
  m.dz = take(kTile * kLd8);
  for (int s = 0; s < 2; ++s) m.din[s] = take(kTile * kLd8);
  m.row = take(kRowValues * kTile);
  return m;
}

struct Params {
  const void* rows;
  int rows_dtype;
  const float* packed;
  const float* upstream;
  float* grad_rows;  // null: no rows' gradient
  float* partial;    // (groups, P)
  std::int64_t n;
  int S;
  bool wnn;
  std::int64_t groups, tiles_per_group;
};

template <typename Out>
__device__ __forceinline__ void gemm(int M, int N, int K, Operand a, Operand b, Out out) {
  tile_gemm<kWarps>(M, N, K, a, b, out);
}

// acc[j] += sum over the tile's rows of m[r * ld + j], for j < N (a bias gradient).
__device__ __forceinline__ void add_column_sums(float* acc, const float* m, int ld, int N) {
  for (int j = threadIdx.x; j < N; j += kThreads) {
    float s = 0.0f;
    for (int r = 0; r < kTile; ++r) s += m[r * ld + j];
    acc[j] += s;
  }
}

// Rows row0 .. row0 + kTile - 1 into in[0] (x) and in[1] (d), and their per-row values.
// Rows past n become zero rows with upstream 0, which zeroes every gradient they could
// contribute.
__device__ void load_tile(const Smem& m, const Params& p, std::int64_t row0) {
  const int r = threadIdx.x;
  if (r < kTile) {
    const std::int64_t row[1] = {row0 + r};
    const bool ok = row[0] < p.n;
    float window[1][kMaxWindow];
    load_windows(p.rows, p.rows_dtype, row, p.n, p.S, window);
    const float(&w)[kMaxWindow] = window[0];
    float shift = 0.0f, scale = 1.0f;
    if (p.wnn) {
      // x_0 = 0, so the range of x is that of the other values and 0.
      float lo = 0.0f, hi = 0.0f;
#pragma unroll
      for (int j = 1; j < kMaxWindow; ++j) {
        if (j < p.S) {
          lo = fminf(lo, w[j] - w[0]);
          hi = fmaxf(hi, w[j] - w[0]);
        }
      }
      shift = w[0];
      scale = 2.0f * ((hi - lo) + kWnnEps);
    }
    float* x = m.in[0] + r * kLd8;
    float* d = m.in[1] + r * kLd8;
    for (int j = 0; j < kMaxWindow; ++j) x[j] = j < p.S ? (p.wnn ? (w[j] - shift) / scale : w[j]) : 0.0f;
    for (int j = 0; j < kMaxWindow; ++j) d[j] = j + 1 < p.S ? x[j + 1] - x[j] : 0.0f;
    m.row[kScale * kTile + r] = scale;
    m.row[kShift * kTile + r] = shift;
    m.row[kLast * kTile + r] = x[p.S - 1];
    m.row[kUpstream * kTile + r] = ok ? __ldg(p.upstream + row[0]) : 0.0f;
  }
  __syncthreads();
}

// h = in w1 + b1, c = z wc + bc, e = exp(c h) and p = (z wb + bb) e of stream s, from its
// input and bottleneck (both in shared memory).
__device__ void hidden(const Smem& m, const StreamLayout& L, int n, int s) {
  const Operand in{m.in[s], kLd8, 1}, z{m.z[s], kLd8, 1};
  gemm(kTile, kHidden, n, in, {m.w + L.w1, kHidden, 1}, store(m.h, kLd64, m.w + L.b1));
  gemm(kTile, kHidden, kBottleneck, z, {m.w + L.wb, kHidden, 1}, store(m.p, kLd64, m.w + L.bb));
  gemm(kTile, kHidden, kBottleneck, z, {m.w + L.wc, kHidden, 1}, store(m.c, kLd64, m.w + L.bc));
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kHidden; i += kThreads) {
    const int at = i / kHidden * kLd64 + i % kHidden;
    const float e = expf(m.c[at] * m.h[at]);
    m.e[at] = e;
    m.p[at] *= e;
  }
  __syncthreads();
}

__device__ void forward(const Smem& m, const StreamLayout& L, int n, int s) {
  const float* w = m.w;
  gemm(kTile, kBottleneck, n, {m.in[s], kLd8, 1}, {w + L.g, kBottleneck, 1},
       store_relu(m.z[s], kLd8, w + L.gb));
  __syncthreads();
  hidden(m, L, n, s);
  const auto v = add(m.v[s], kLd32);
  gemm(kTile, kOutHidden, kBottleneck, {m.z[s], kLd8, 1}, {w + L.a2, kOutHidden, 1},
       store(m.v[s], kLd32, w + L.b2));
  gemm(kTile, kOutHidden, kHidden, {m.p, kLd64, 1}, {w + L.w2, kOutHidden, 1}, v);
  __syncthreads();
}

// The head for each row of the tile: tanh(y) and dy = dL/dy; then the gradients of wo and
// bo, and v of both streams turned into dL/dv.
__device__ void head(const Smem& m, int wo) {
  const int r = threadIdx.x / kHeadLanes, part = threadIdx.x % kHeadLanes;
  float y = 0.0f;
  for (int q = 0; q < 8; ++q) {
    const int j = 8 * part + q;  // j < 32: stream x, else stream d
    const float v = m.v[j / kOutHidden][r * kLd32 + j % kOutHidden];
    y = fmaf(v >= 0.0f ? v : kLeakySlope * v, m.w[wo + j], y);
  }
  for (int lanes = 1; lanes < kHeadLanes; lanes *= 2) y += __shfl_xor_sync(0xffffffffu, y, lanes);
  if (part == 0) {
    y += m.w[wo + 2 * kOutHidden];
    const float t = expf(-2.0f * fabsf(y));
    const float tanh_abs = (1.0f - t) / (1.0f + t);
    m.row[kOut * kTile + r] = y < 0.0f ? -tanh_abs : tanh_abs;
    // pred = (x_last + out) s + shift, so d pred / d out = s ("raw": 1).
    m.row[kDy * kTile + r] = m.row[kUpstream * kTile + r] * m.row[kScale * kTile + r] *
                             (4.0f * t / ((1.0f + t) * (1.0f + t)));
  }
  __syncthreads();
  const int j = threadIdx.x;
  if (j < 2 * kOutHidden) {
    float s = 0.0f;
    for (int i = 0; i < kTile; ++i) {
      const float v = m.v[j / kOutHidden][i * kLd32 + j % kOutHidden];
      s = fmaf(m.row[kDy * kTile + i], v >= 0.0f ? v : kLeakySlope * v, s);
    }
    m.grad[wo + j] += s;
  } else if (j == 2 * kOutHidden) {
    float s = 0.0f;
    for (int i = 0; i < kTile; ++i) s += m.row[kDy * kTile + i];
    m.grad[wo + 2 * kOutHidden] += s;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * kTile * kOutHidden; i += kThreads) {
    const int s = i / (kTile * kOutHidden), r2 = i / kOutHidden % kTile, o = i % kOutHidden;
    float& v = m.v[s][r2 * kLd32 + o];
    // leaky_relu'(0) = slope, as torch (x > 0 ? 1 : slope).
    v = (v > 0.0f ? 1.0f : kLeakySlope) * (m.row[kDy * kTile + r2] * m.w[wo + s * kOutHidden + o]);
  }
  __syncthreads();
}

// Adds the tile's gradient of stream s's folded tensors, given dL/dv in v[s] and the
// stream's h, c, e, p in the hidden buffers; with `inputs`, dL/d(input) into din[s].
__device__ void backward(const Smem& m, const StreamLayout& L, int n, int s, bool inputs) {
  const float* w = m.w;
  float* grad = m.grad;
  const Operand in_t{m.in[s], 1, kLd8}, z_t{m.z[s], 1, kLd8}, dv{m.v[s], kLd32, 1};
  gemm(kHidden, kOutHidden, kTile, {m.p, 1, kLd64}, dv, add(grad + L.w2, kOutHidden));
  gemm(kBottleneck, kOutHidden, kTile, z_t, dv, add(grad + L.a2, kOutHidden));
  gemm(kTile, kHidden, kOutHidden, dv, {w + L.w2, 1, kOutHidden}, put(m.dp, kLd64));
  gemm(kTile, kBottleneck, kOutHidden, dv, {w + L.a2, 1, kOutHidden}, put(m.dz, kLd8));
  add_column_sums(grad + L.b2, m.v[s], kLd32, kOutHidden);
  __syncthreads();
  // p = b e with e = exp(c h): db = dp e, d(c h) = dp p, dc = dp p h, dh = dp p c; they
  // replace e, h and c.
  for (int i = threadIdx.x; i < kTile * kHidden; i += kThreads) {
    const int at = i / kHidden * kLd64 + i % kHidden;
    const float dp = m.dp[at], dpp = dp * m.p[at];
    m.e[at] *= dp;
    const float dc = dpp * m.h[at];
    m.h[at] = dc;
    m.c[at] *= dpp;
  }
  __syncthreads();
  const Operand db{m.e, kLd64, 1}, dc{m.h, kLd64, 1}, dh{m.c, kLd64, 1};
  gemm(kBottleneck, kHidden, kTile, z_t, db, add(grad + L.wb, kHidden));
  gemm(kBottleneck, kHidden, kTile, z_t, dc, add(grad + L.wc, kHidden));
  gemm(n, kHidden, kTile, in_t, dh, add(grad + L.w1, kHidden));
  // Both din products share M and N, so each (i, j) stays with one lane: no barrier.
  if (inputs) gemm(kTile, kMaxWindow, kHidden, dh, {w + L.w1, 1, kHidden}, put_cols(m.din[s], kLd8, n));
  const auto dz = add(m.dz, kLd8);
  gemm(kTile, kBottleneck, kHidden, db, {w + L.wb, 1, kHidden}, dz);
  gemm(kTile, kBottleneck, kHidden, dc, {w + L.wc, 1, kHidden}, dz);
  add_column_sums(grad + L.bb, m.e, kLd64, kHidden);
  add_column_sums(grad + L.bc, m.h, kLd64, kHidden);
  add_column_sums(grad + L.b1, m.c, kLd64, kHidden);
  __syncthreads();
  // relu'(0) = 0, as torch: z > 0 exactly where the pre-activation is.
  for (int i = threadIdx.x; i < kTile * kBottleneck; i += kThreads) {
    const int at = i / kBottleneck * kLd8 + i % kBottleneck;
    if (!(m.z[s][at] > 0.0f)) m.dz[at] = 0.0f;
  }
  __syncthreads();
  gemm(n, kBottleneck, kTile, in_t, {m.dz, kLd8, 1}, add(grad + L.g, kBottleneck));
  if (inputs) {
    gemm(kTile, kMaxWindow, kBottleneck, {m.dz, kLd8, 1}, {w + L.g, 1, kBottleneck},
         add_cols(m.din[s], kLd8, n));
  }
  add_column_sums(grad + L.gb, m.dz, kLd8, kBottleneck);
  __syncthreads();
}

// u d pred / d rows for each row of the tile (one thread per row), from dL/dx in din[0]
// and dL/dd in din[1]: x_j also reaches d_{j-1} = x_j - x_{j-1} and d_j = x_{j+1} - x_j,
// and x_last the prediction directly.  "wnn": x = (w - w_0) / s, s = 2 (max - min + eps),
// pred = (x_last + out) s + w_0; the max and the min of w - w_0 share their gradient
// evenly among tied values, as torch's amax / amin do (a constant row ties everywhere).
__device__ void row_gradient(const Smem& m, const Params& p, std::int64_t row0) {
  const int r = threadIdx.x;
  if (r < kTile && row0 + r < p.n) {
    const int S = p.S;
    const std::int64_t row[1] = {row0 + r};
    float window[1][kMaxWindow];
    load_windows(p.rows, p.rows_dtype, row, p.n, S, window);
    const float u = m.row[kUpstream * kTile + r], scale = m.row[kScale * kTile + r];
    const float* x = m.in[0] + r * kLd8;
    const float* dx = m.din[0] + r * kLd8;
    const float* dd = m.din[1] + r * kLd8;
    float g[kMaxWindow];
    for (int j = 0; j < S; ++j) {
      g[j] = dx[j] + (j > 0 ? dd[j - 1] : 0.0f) - (j + 1 < S ? dd[j] : 0.0f);
    }
    g[S - 1] += u * scale;
    float* out = p.grad_rows + row[0] * S;
    if (!p.wnn) {
      for (int j = 0; j < S; ++j) out[j] = g[j];
      return;
    }
    const float(&w)[kMaxWindow] = window[0];
    float hi = 0.0f, lo = 0.0f, gx = 0.0f;  // x_0 = 0 is among the values
    for (int j = 0; j < S; ++j) {
      hi = fmaxf(hi, w[j] - w[0]);
      lo = fminf(lo, w[j] - w[0]);
      gx = fmaf(g[j], x[j], gx);
    }
    int at_hi = 0, at_lo = 0;
    for (int j = 0; j < S; ++j) {
      at_hi += w[j] - w[0] == hi;
      at_lo += w[j] - w[0] == lo;
    }
    // dL/ds: directly through pred, and through every x_j = (w_j - w_0) / s.
    const float ds = u * (m.row[kLast * kTile + r] + m.row[kOut * kTile + r]) - gx / scale;
    const float to_hi = 2.0f * ds / at_hi, to_lo = 2.0f * ds / at_lo;
    float sum = 0.0f;
    for (int j = 0; j < S; ++j) {
      const float xs = w[j] - w[0];
      g[j] = g[j] / scale + (xs == hi ? to_hi : 0.0f) - (xs == lo ? to_lo : 0.0f);
      sum += g[j];
    }
    // w_0 is also subtracted from every value, and it is the shift.
    g[0] += u - sum;
    for (int j = 0; j < S; ++j) out[j] = g[j];
  }
}

__global__ void __launch_bounds__(kThreads, 1) vjp_kernel(Params p) {
  KNOW_DYNAMIC_SHARED(smem);
  const int S = p.S;
  const HeadLayout layout = packed_head<int>(S);
  const int P = layout.size;
  const Smem m = carve(smem, P);
  const StreamLayout* L = layout.stream;
  const bool rows_grad = p.grad_rows != nullptr;
  for (int i = threadIdx.x; i < P; i += kThreads) m.w[i] = __ldg(p.packed + i);
  const std::int64_t tiles = (p.n + kTile - 1) / kTile;
  for (std::int64_t group = blockIdx.x; group < p.groups; group += gridDim.x) {
    for (int i = threadIdx.x; i < P; i += kThreads) m.grad[i] = 0.0f;
    __syncthreads();
    const std::int64_t last = (group + 1) * p.tiles_per_group;
    const std::int64_t end = last < tiles ? last : tiles;
    for (std::int64_t tile = group * p.tiles_per_group; tile < end; ++tile) {
      const std::int64_t row0 = tile * kTile;
      load_tile(m, p, row0);
      forward(m, L[0], S, 0);
      forward(m, L[1], S - 1, 1);
      head(m, layout.wo);
      backward(m, L[1], S - 1, 1, rows_grad);
      hidden(m, L[0], S, 0);
      backward(m, L[0], S, 0, rows_grad);
      if (rows_grad) {
        row_gradient(m, p, row0);
        __syncthreads();
      }
    }
    float* out = p.partial + group * P;
    for (int i = threadIdx.x; i < P; i += kThreads) out[i] = m.grad[i];
    __syncthreads();
  }
}

// grad[j] = sum over groups of partial[g][j], in the groups' order.
__global__ void reduce_kernel(const float* partial, std::int64_t groups, int width, float* grad) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= width) return;
  float s = 0.0f;
  for (std::int64_t g = 0; g < groups; ++g) s += partial[g * width + j];
  grad[j] = s;
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorString(err);
}

struct Plan {
  std::int64_t groups = 0, tiles_per_group = 0;
  int blocks = 0;
  std::size_t smem = 0;
};

// Groups of consecutive tiles for n rows (at most max_groups, all but the last of one size).
std::string plan_groups(std::int64_t n, int S, int max_groups, Plan* plan) {
  if (S < 2 || S > kMaxWindow) {
    return "S must be in [2, " + std::to_string(kMaxWindow) + "], got " + std::to_string(S);
  }
  if (n < 0) return "n must be >= 0, got " + std::to_string(n);
  if (max_groups < 0) return "groups must be >= 0, got " + std::to_string(max_groups);
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > 0) {
    const std::int64_t cap = std::min<std::int64_t>(tiles, max_groups ? max_groups : kVjpGroups);
    plan->tiles_per_group = (tiles + cap - 1) / cap;
    plan->groups = (tiles + plan->tiles_per_group - 1) / plan->tiles_per_group;
  }
  plan->smem = sizeof(float) * static_cast<std::size_t>(smem_floats(S));
  return "";
}

// Blocks of the fused kernel: at most one per group, and as many as are resident at once.
std::string plan_blocks(int device, int max_blocks, Plan* plan) {
  if (max_blocks < 0) return "max_blocks must be >= 0, got " + std::to_string(max_blocks);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  err = cudaFuncSetAttribute(vjp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan->smem));
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute", err);
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, vjp_kernel, kThreads, plan->smem);
  if (err != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  if (per_sm < 1) return "the kernel does not fit on this device (shared memory or registers)";
  std::int64_t blocks = std::min<std::int64_t>(plan->groups, std::int64_t{sms} * per_sm);
  if (max_blocks > 0) blocks = std::min<std::int64_t>(blocks, max_blocks);
  plan->blocks = static_cast<int>(blocks);
  return "";
}

}  // namespace

std::string vjp_workspace_floats(std::int64_t n, int S, int groups, std::int64_t* floats) {
  Plan plan;
  const std::string error = plan_groups(n, S, groups, &plan);
  *floats = error.empty() ? plan.groups * packed_head<int>(S).size : 0;
  return error;
}

std::string vjp(const VjpArgs& a) {
  if (!is_dtype(a.rows_dtype)) return "unknown dtype code " + std::to_string(a.rows_dtype);
  Plan plan;
  std::string error = plan_groups(a.n, a.S, a.groups, &plan);
  if (!error.empty()) return error;
  if (!a.grad_packed) return "null device pointer (grad_packed)";
  const int width = packed_head<int>(a.S).size;
  if (a.n > 0) {
    if (!a.rows || !a.upstream || !a.packed || !a.workspace) return "null device pointer";
    if (a.workspace_floats < plan.groups * width) {
      return "workspace holds " + std::to_string(a.workspace_floats) + " floats, needs " +
             std::to_string(plan.groups * width);
    }
    error = plan_blocks(a.device, a.max_blocks, &plan);
    if (!error.empty()) return error;
  }
  cudaError_t err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  float* partial = reinterpret_cast<float*>(a.workspace);
  if (plan.blocks > 0) {
    const Params p{reinterpret_cast<const void*>(a.rows), a.rows_dtype,
                   reinterpret_cast<const float*>(a.packed),
                   reinterpret_cast<const float*>(a.upstream),
                   reinterpret_cast<float*>(a.grad_rows), partial, a.n, a.S, a.wnn,
                   plan.groups, plan.tiles_per_group};
    launch_kernel(vjp_kernel, dim3(plan.blocks), dim3(kThreads), plan.smem, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_error("vjp kernel launch", err);
  }
  // With no rows there are no groups: the reduction writes zeros.
  constexpr int kReduceThreads = 256;
  launch_kernel(reduce_kernel, dim3((width + kReduceThreads - 1) / kReduceThreads),
                dim3(kReduceThreads), 0, stream, static_cast<const float*>(partial),
                plan.groups, width, reinterpret_cast<float*>(a.grad_packed));
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("reduce kernel launch", err);
  return "";
}

}  // namespace know::cuda
