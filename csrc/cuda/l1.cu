// The fused L1 training step of KNOWN: forward through both streams and the head, the L1
// loss, and the backward pass to every folded parameter, in one kernel.
//
// Work split.  A block stages the packed head in shared memory once and keeps its own
// gradient there (packed layout, plus the loss), zeroed at the start.  It then walks tiles
// of kTile rows (tile blockIdx.x, + gridDim.x, ...).  For a tile, every matrix product runs
// on the tensor cores in 3xTF32 from shared-memory buffers of the tile's activations:
// products over the hidden units (row-major operands) and the weight-gradient products over
// the tile's rows (transposed operands: only the strides change).  Elementwise steps (exp,
// the products of the chain rule, relu') run between them, one barrier apart.
//
// Per tile:
//   load and normalise the rows;
//   forward x, then forward d: z = relu(in g + gb), h, b, c, e = exp(c h), p = b e,
//     v = z a2 + p w2 + b2 (z and v kept per stream; h, c, e, p only for the last stream);
//   head, per row: y = bo + leaky(v) . wo, tanh, prediction, e, |e|, dy = dL/dy;
//   backward d with its h, c, e, p still there, then recompute x's and backward x.
// Each weight gradient of a tile is one product over the tile's rows added to the block's
// copy; at the end each block writes that copy to its row of a (blocks, P + 1) workspace and
// a second kernel sums the rows in a fixed order, so the result does not depend on timing.
//
// Accuracy: 3xTF32 products (float32-level) and float32 elsewhere, with expf and IEEE
// division; the tanh and its derivative come from exp(-2|y|) so neither overflows nor
// cancels near saturation.  Sub-gradients follow torch: sign(0) = 0, relu'(0) = 0,
// leaky_relu'(0) = slope.
#include <algorithm>

#include "device.cuh"
#include "folded.cuh"
#include "l1.cuh"

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
enum RowValue { kScale, kShift, kLast, kTarget, kDy, kRowLoss, kRowValues };

__host__ __device__ constexpr int round4(int x) { return (x + 3) & ~3; }

constexpr int kTileFloats = 2 * kTile * kLd8      // in: x and d
                            + 2 * kTile * kLd8    // z per stream
                            + 2 * kTile * kLd32   // v per stream, then dL/dv
                            + 5 * kTile * kLd64   // h, c, e, p, dp of one stream
                            + kTile * kLd8        // dz
                            + kRowValues * kTile;

__host__ __device__ inline int smem_floats(int S) {
  const int floats = packed_head<int>(S).size;
  return round4(floats) + round4(floats + 1) + kTileFloats;
}

struct Smem {
  float* w;     // the packed head
  float* grad;  // the block's gradient (packed layout), then its loss
  float* in[2];
  float* z[2];
  float* v[2];
  float *h, *c, *e, *p, *dp;
  float* dz;
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
  m.grad = take(round4(P + 1));
  for (int s = 0; s < 2; ++s) m.in[s] = take(kTile * kLd8);
  for (int s = 0; s < 2; ++s) m.z[s] = take(kTile * kLd8);
  for (int s = 0; s < 2; ++s) m.v[s] = take(kTile * kLd32);
  m.h = take(kTile * kLd64);
  m.c = take(kTile * kLd64);
  m.e = take(kTile * kLd64);
  m.p = take(kTile * kLd64);
  m.dp = take(kTile * kLd64);
  m.dz = take(kTile * kLd8);
  m.row = take(kRowValues * kTile);
  return m;
}

struct Params {
  const void* rows;
  int rows_dtype;
  const float* target;
  const float* packed;
  float* partial;  // (gridDim.x, P + 1)
  std::int64_t n;
  int S;
  bool wnn;
  bool normalised;
};

// Element (i, k) of a product operand lies at p[i * si + k * sk]: a transpose swaps the
// strides, so the weight-gradient products read the activations as they were stored.
struct Operand {
  const float* p;
  int si, sk;
};

// out(i, j, value) for every i < M, j < N of A (M x K) @ B (K x N), with 3xTF32 m16n8k8
// products; operands read as zero past M and K.  N is a multiple of 8.  Warps take the
// 16 x 8 output tiles in turn, so two calls with the same M and N hand every (i, j) to the
// same lane: a later call may add to what an earlier one wrote without a barrier.
template <typename Out>
__device__ __forceinline__ void gemm(int M, int N, int K, Operand a, Operand b, Out out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles_n = N / 8;
  const int tiles = (M + 15) / 16 * tiles_n;
  for (int tile = threadIdx.x >> 5; tile < tiles; tile += kWarps) {
    const int i0 = tile / tiles_n * 16, j0 = tile % tiles_n * 8;
    const auto av = [&](int i, int k) { return i < M && k < K ? a.p[i * a.si + k * a.sk] : 0.0f; };
    const auto bv = [&](int k) { return k < K ? b.p[k * b.si + (j0 + g) * b.sk] : 0.0f; };
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 8) {
      mma<true>(d, split<true>(av(i0 + g, k0 + t), av(i0 + g + 8, k0 + t),
                               av(i0 + g, k0 + t + 4), av(i0 + g + 8, k0 + t + 4)),
                split_b<true>(bv(k0 + t), bv(k0 + t + 4)));
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + g + 8 * (q >> 1);
      if (i < M) out(i, j0 + 2 * t + (q & 1), d[q]);
    }
  }
}

// Output writers for gemm: C = A B, C = A B + bias, C = relu(A B + bias), C += A B.
__device__ __forceinline__ auto put(float* c, int ld) {
  return [=](int i, int j, float v) { c[i * ld + j] = v; };
}
__device__ __forceinline__ auto store(float* c, int ld, const float* bias) {
  return [=](int i, int j, float v) { c[i * ld + j] = v + bias[j]; };
}
__device__ __forceinline__ auto store_relu(float* c, int ld, const float* bias) {
  return [=](int i, int j, float v) { c[i * ld + j] = fmaxf(v + bias[j], 0.0f); };
}
__device__ __forceinline__ auto add(float* c, int ld) {
  return [=](int i, int j, float v) { c[i * ld + j] += v; };
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
// Rows past n become zero rows with target 0; their dy is set to 0 by the head, which
// zeroes every gradient they could contribute.
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
    m.row[kTarget * kTile + r] = ok ? __ldg(p.target + row[0]) : 0.0f;
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

// The head for each row of the tile: prediction, loss and dy = dL/dy; then the gradients of
// wo, bo and the loss sum, and v of both streams turned into dL/dv.
__device__ void head(const Smem& m, const Params& p, int wo, std::int64_t row0) {
  const int r = threadIdx.x / kHeadLanes, part = threadIdx.x % kHeadLanes;
  float y = 0.0f;
  for (int q = 0; q < 8; ++q) {
    const int j = 8 * part + q;  // j < 32: stream x, else stream d
    const float v = m.v[j / kOutHidden][r * kLd32 + j % kOutHidden];
    y = fmaf(v >= 0.0f ? v : kLeakySlope * v, m.w[wo + j], y);
  }
  for (int lanes = 1; lanes < kHeadLanes; lanes *= 2) y += __shfl_xor_sync(0xffffffffu, y, lanes);
  if (part == 0) {
    const bool ok = row0 + r < p.n;
    y += m.w[wo + 2 * kOutHidden];
    const float t = expf(-2.0f * fabsf(y));
    const float tanh_abs = (1.0f - t) / (1.0f + t);
    const float out = y < 0.0f ? -tanh_abs : tanh_abs;
    const float dout = 4.0f * t / ((1.0f + t) * (1.0f + t));
    const float scale = m.row[kScale * kTile + r];
    // "raw" rows have scale 1 and shift 0, which leave the prediction's bits alone.
    const float diff = (m.row[kLast * kTile + r] + out) * scale + m.row[kShift * kTile + r] -
                       m.row[kTarget * kTile + r];
    const float sign = diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f);
    // e = diff (original units) or diff / scale; d pred / d out = scale.
    m.row[kRowLoss * kTile + r] = ok ? (p.normalised ? fabsf(diff) / scale : fabsf(diff)) : 0.0f;
    m.row[kDy * kTile + r] = ok ? (p.normalised ? sign * dout : sign * dout * scale) : 0.0f;
  }
  __syncthreads();
  const int j = threadIdx.x;
  const int P = packed_head<int>(p.S).size;
  if (j < 2 * kOutHidden) {
    float s = 0.0f;
    for (int i = 0; i < kTile; ++i) {
      const float v = m.v[j / kOutHidden][i * kLd32 + j % kOutHidden];
      s = fmaf(m.row[kDy * kTile + i], v >= 0.0f ? v : kLeakySlope * v, s);
    }
    m.grad[wo + j] += s;
  } else if (j == 2 * kOutHidden || j == 2 * kOutHidden + 1) {
    const float* values = m.row + (j == 2 * kOutHidden ? kDy : kRowLoss) * kTile;
    float s = 0.0f;
    for (int i = 0; i < kTile; ++i) s += values[i];
    m.grad[j == 2 * kOutHidden ? wo + 2 * kOutHidden : P] += s;
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
// stream's h, c, e, p in the hidden buffers.
__device__ void backward(const Smem& m, const StreamLayout& L, int n, int s) {
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
  add_column_sums(grad + L.gb, m.dz, kLd8, kBottleneck);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1) l1_kernel(Params p) {
  KNOW_DYNAMIC_SHARED(smem);
  const int S = p.S;
  const HeadLayout layout = packed_head<int>(S);
  const int P = layout.size;
  const Smem m = carve(smem, P);
  const StreamLayout* L = layout.stream;
  for (int i = threadIdx.x; i < P; i += kThreads) {
    m.w[i] = __ldg(p.packed + i);
    m.grad[i] = 0.0f;
  }
  if (threadIdx.x == 0) m.grad[P] = 0.0f;
  __syncthreads();
  const std::int64_t tiles = (p.n + kTile - 1) / kTile;
  for (std::int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const std::int64_t row0 = tile * kTile;
    load_tile(m, p, row0);
    forward(m, L[0], S, 0);
    forward(m, L[1], S - 1, 1);
    head(m, p, layout.wo, row0);
    backward(m, L[1], S - 1, 1);
    hidden(m, L[0], S, 0);
    backward(m, L[0], S, 0);
  }
  __syncthreads();
  float* out = p.partial + static_cast<std::int64_t>(blockIdx.x) * (P + 1);
  for (int i = threadIdx.x; i <= P; i += kThreads) out[i] = m.grad[i];
}

// grad[j] = sum over blocks of partial[b][j] for j < width - 1, and *loss the last column.
__global__ void reduce_kernel(const float* partial, int blocks, int width, float* grad,
                              float* loss) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= width) return;
  float s = 0.0f;
  for (int b = 0; b < blocks; ++b) s += partial[static_cast<std::int64_t>(b) * width + j];
  if (j < width - 1) grad[j] = s;
  else *loss = s;
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorString(err);
}

// Blocks of the fused kernel for n rows (at most one per tile), and its shared memory.
std::string plan(std::int64_t n, int S, int device, int* blocks, std::size_t* smem) {
  if (S < 2 || S > kMaxWindow) {
    return "S must be in [2, " + std::to_string(kMaxWindow) + "], got " + std::to_string(S);
  }
  if (n < 0) return "n must be >= 0, got " + std::to_string(n);
  *smem = sizeof(float) * static_cast<std::size_t>(smem_floats(S));
  *blocks = 0;
  if (n == 0) return "";
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  err = cudaFuncSetAttribute(l1_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(*smem));
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute", err);
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, l1_kernel, kThreads, *smem);
  if (err != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  if (per_sm < 1) return "the kernel does not fit on this device (shared memory or registers)";
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  *blocks = static_cast<int>(std::min<std::int64_t>(tiles, std::int64_t{sms} * per_sm));
  return "";
}

}  // namespace

std::string l1_workspace_floats(std::int64_t n, int S, int device, std::int64_t* floats) {
  int blocks = 0;
  std::size_t smem = 0;
  const std::string error = plan(n, S, device, &blocks, &smem);
  *floats = error.empty() ? std::int64_t{blocks} * (packed_head<int>(S).size + 1) : 0;
  return error;
}

std::string l1_loss(const L1Args& a) {
  if (!is_dtype(a.rows_dtype)) return "unknown dtype code " + std::to_string(a.rows_dtype);
  int blocks = 0;
  std::size_t smem = 0;
  std::string error = plan(a.n, a.S, a.device, &blocks, &smem);
  if (!error.empty()) return error;
  if (!a.grad || !a.loss) return "null device pointer (grad or loss)";
  const int width = packed_head<int>(a.S).size + 1;
  if (a.n > 0) {
    if (!a.rows || !a.target || !a.packed || !a.workspace) return "null device pointer";
    if (a.workspace_floats < std::int64_t{blocks} * width) {
      return "workspace holds " + std::to_string(a.workspace_floats) + " floats, needs " +
             std::to_string(std::int64_t{blocks} * width);
    }
  }
  cudaError_t err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  float* partial = reinterpret_cast<float*>(a.workspace);
  if (blocks > 0) {
    const Params p{reinterpret_cast<const void*>(a.rows), a.rows_dtype,
                   reinterpret_cast<const float*>(a.target), reinterpret_cast<const float*>(a.packed),
                   partial, a.n, a.S, a.wnn, a.normalised};
    launch_kernel(l1_kernel, dim3(blocks), dim3(kThreads), smem, stream, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_error("l1 kernel launch", err);
  }
  constexpr int kReduceThreads = 256;
  launch_kernel(reduce_kernel, dim3((width + kReduceThreads - 1) / kReduceThreads),
                dim3(kReduceThreads), 0, stream, static_cast<const float*>(partial), blocks, width,
                reinterpret_cast<float*>(a.grad), reinterpret_cast<float*>(a.loss));
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("reduce kernel launch", err);
  return "";
}

}  // namespace know::cuda
