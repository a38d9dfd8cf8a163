// KNOWN inference on the tensor cores: one fused, persistent kernel.
//
// Work split.  A block stages the packed head (packing.pack) into shared memory once, in
// the order the m16n8k8 B fragments are read, so each lane fetches its two values of a
// fragment with one 8-byte load.  Each warp then loops over tiles of kTileRows rows
// (grid = SMs x resident blocks; tiles strided over all warps).  The four lanes of an MMA
// quad own the same two rows of every 16-row slab, each keeping a private copy of both
// windows (S values each), so normalisation, the window slide and the stores need no
// communication beyond one quad reduction of the head's dot product.
//
// Per stream and 16 rows, in MMA fragments (all float32 accumulation):
//   z = relu(inp @ g + gb)                        1 product
//   v = z @ a2 + b2                               4
//   for each 8 hidden units j:                    8 x (1 + 2 + 4)
//     h = inp @ w1_j + b1_j,  b = z @ wb_j + bb_j,  c = z @ wc_j + bc_j   (c times log2 e)
//     v += (b * exp2(c * h)) @ w2_j
//   head += leaky_relu(v) . wo
// Interleaving the 64 hidden units with the accumulation into v keeps only one 8-unit
// slice of h, b, c alive, which is what lets kTileRows rows share each B fragment.
//
// C fragments become A fragments without shuffles: an accumulator holds columns (2t, 2t+1)
// where an A operand wants k = (t, t+4), so the k index is permuted instead, and the
// weight rows the product meets are staged in the same permuted order (perm_k below).
//
// Precision: "precise" splits both operands into TF32 big + small parts and sums three
// products (3xTF32), which keeps the kernel within 1e-5 of float64; "fast" uses one TF32
// product.  All other arithmetic is float32; the exps run on the special-function units
// (ex2.approx; a polynomial on the FMA pipes, alone or for half of them, was slower on an
// H200 in both precisions: bench/RESULTS.md).  wc and bc are staged times log2(e), so that
// c h arrives in base 2 and exp(c h) is one ex2 with no multiplication before it.
//
// Variants.  kWindow = 5 is a copy for the paper's window (S known at compile time: no
// per-element tests of S, fewer registers); kWindow = 0 reads S at run time.  kBlocks is
// the number of resident blocks per SM the registers are budgeted for: 1 leaves the
// compiler up to 255 registers per thread (8 warps per SM), 2 caps them at 128 (16 warps
// per SM, more latency hidden, a few spills outside the hidden-unit loop).  Which one is
// faster depends on the card; the Python wrapper times both once (nowcast_cuda.py).
#include <algorithm>

#include "device.cuh"
#include "folded.cuh"
#include "nowcast.cuh"

namespace know::cuda {
namespace {

constexpr int kWarps = 8;                  // warps per block
constexpr int kSlabs = 2;                  // 16-row slabs per warp tile
constexpr int kTileRows = 16 * kSlabs;
constexpr int kFrag = 64;                  // floats per B fragment: 32 lanes x 2

// B fragments of one stream, in staging order.
constexpr int kFragG = 0;                  // g   (n x 8):   1 fragment
constexpr int kFragW1 = 1;                 // w1  (n x 64):  8, one per hidden slice j
constexpr int kFragWb = 9;                 // wb  (8 x 64):  8
constexpr int kFragWc = 17;                // wc  (8 x 64):  8
constexpr int kFragW2 = 25;                // w2  (64 x 32): 8 k-steps x 4 column tiles
constexpr int kFragA2 = 57;                // a2  (8 x 32):  4
constexpr int kFragsPerStream = 61;
constexpr int kStreamFragFloats = kFragsPerStream * kFrag;

// Per-stream vectors kept as plain float32 in shared memory.
constexpr int kVecB1 = 0, kVecGb = 64, kVecBb = 72, kVecBc = 136, kVecB2 = 200, kVecWo = 232;
constexpr int kStreamVecFloats = 264;

constexpr int smem_floats(bool precise) {
  return (precise ? 4 : 2) * kStreamFragFloats + 2 * kStreamVecFloats + 4;
}

struct Params {
  const void* rows;
  int rows_dtype;
  const float* packed;
  void* out;
  int out_dtype;
  std::int64_t n;
  int S;
  bool wnn;
  int steps;
  bool all_steps;
};

// Row of the weight matrix that k index kk of an A fragment built from an accumulator
// meets: k = t holds accumulator column 2t, k = t + 4 holds column 2t + 1.
__device__ __forceinline__ int perm_k(int kk) { return kk < 4 ? 2 * kk : 2 * (kk - 4) + 1; }

// Element (lane, half) of B fragment `frag` of a stream: B[k][col] with k = t + 4 * half,
// col = groupID, read from the packed head (zero past the n input rows).
__device__ float fragment_value(const float* packed, const StreamLayout& s, int n, int frag,
                                int lane, int half) {
  const int col = lane >> 2;
  const int kk = (lane & 3) + 4 * half;
  if (frag < kFragW1) return kk < n ? packed[s.g + kk * kBottleneck + col] : 0.0f;
  if (frag < kFragWb) {
    const int c = 8 * (frag - kFragW1) + col;
    return kk < n ? packed[s.w1 + kk * kHidden + c] : 0.0f;
  }
  if (frag < kFragWc) return packed[s.wb + perm_k(kk) * kHidden + 8 * (frag - kFragWb) + col];
  if (frag < kFragW2) return packed[s.wc + perm_k(kk) * kHidden + 8 * (frag - kFragWc) + col];
  if (frag < kFragA2) {
    const int j = (frag - kFragW2) / 4, tile = (frag - kFragW2) % 4;
    return packed[s.w2 + (8 * j + perm_k(kk)) * kOutHidden + 8 * tile + col];
  }
  return packed[s.a2 + perm_k(kk) * kOutHidden + 8 * (frag - kFragA2) + col];
}

template <bool kPrecise>
__device__ void stage_weights(float* smem, const float* packed, int S) {
  const HeadLayout head = packed_head<int>(S);
  const StreamLayout* layout = head.stream;
  float* big = smem;
  float* small = smem + 2 * kStreamFragFloats;
  for (int i = threadIdx.x; i < 2 * kStreamFragFloats; i += blockDim.x) {
    const int stream = i / kStreamFragFloats, r = i % kStreamFragFloats;
    const int e = r % kFrag;
    const int frag = r / kFrag;
    const float v = fragment_value(packed, layout[stream], S - stream, frag, e >> 1, e & 1)
                    * (frag >= kFragWc && frag < kFragW2 ? kLog2e : 1.0f);
    const std::uint32_t hi = to_tf32(v);
    big[i] = as_float(hi);
    if (kPrecise) small[i] = as_float(to_tf32(v - as_float(hi)));
  }
  float* vec = smem + (kPrecise ? 4 : 2) * kStreamFragFloats;
  const int wo = head.wo;
  for (int i = threadIdx.x; i < 2 * kStreamVecFloats; i += blockDim.x) {
    const int stream = i / kStreamVecFloats, r = i % kStreamVecFloats;
    const StreamLayout& s = layout[stream];
    float v;
    if (r < kVecGb) v = packed[s.b1 + r];
    else if (r < kVecBb) v = packed[s.gb + r - kVecGb];
    else if (r < kVecBc) v = packed[s.bb + r - kVecBb];
    else if (r < kVecB2) v = packed[s.bc + r - kVecBc] * kLog2e;
    else if (r < kVecWo) v = packed[s.b2 + r - kVecB2];
    else v = packed[wo + kOutHidden * stream + r - kVecWo];
    vec[i] = v;
  }
  if (threadIdx.x == 0) vec[2 * kStreamVecFloats] = packed[wo + 2 * kOutHidden];
  __syncthreads();
}

template <bool kPrecise>
__device__ __forceinline__ BFrag load_b(const float* big, const float* small, int frag,
                                        int lane) {
  BFrag b;
  const float2 hi = reinterpret_cast<const float2*>(big + frag * kFrag)[lane];
  b.big[0] = __float_as_uint(hi.x);
  b.big[1] = __float_as_uint(hi.y);
  if (kPrecise) {
    const float2 lo = reinterpret_cast<const float2*>(small + frag * kFrag)[lane];
    b.small[0] = __float_as_uint(lo.x);
    b.small[1] = __float_as_uint(lo.y);
  }
  return b;
}

// One stream for the warp's kSlabs slabs of 16 rows; adds each lane's share of the head's
// dot product to head[slab][row half].
template <bool kPrecise>
__device__ __forceinline__ void run_stream(const float* big, const float* small,
                                           const float* vec, const AFrag (&inp)[kSlabs],
                                           float (&head)[kSlabs][2], int lane) {
  const int t = lane & 3;
  AFrag za[kSlabs];
  {
    const BFrag bg = load_b<kPrecise>(big, small, kFragG, lane);
    const float gb0 = vec[kVecGb + 2 * t], gb1 = vec[kVecGb + 2 * t + 1];
#pragma unroll
    for (int m = 0; m < kSlabs; ++m) {
      float z[4] = {gb0, gb1, gb0, gb1};
      mma<kPrecise>(z, inp[m], bg);
#pragma unroll
      for (int i = 0; i < 4; ++i) z[i] = fmaxf(z[i], 0.0f);
      za[m] = split<kPrecise>(z[0], z[2], z[1], z[3]);
    }
  }
  float v[kSlabs][4][4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const BFrag ba = load_b<kPrecise>(big, small, kFragA2 + nt, lane);
    const float b0 = vec[kVecB2 + 8 * nt + 2 * t], b1 = vec[kVecB2 + 8 * nt + 2 * t + 1];
#pragma unroll
    for (int m = 0; m < kSlabs; ++m) {
      v[m][nt][0] = b0;
      v[m][nt][1] = b1;
      v[m][nt][2] = b0;
      v[m][nt][3] = b1;
      mma<kPrecise>(v[m][nt], za[m], ba);
    }
  }
  // Hidden slices in pairs: the pair loop stays rolled (registers), the pair is unrolled
  // (two independent slices in flight).
#pragma unroll 1
  for (int jj = 0; jj < 8; jj += 2) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int j = jj + k;
      const BFrag bw1 = load_b<kPrecise>(big, small, kFragW1 + j, lane);
      const BFrag bwb = load_b<kPrecise>(big, small, kFragWb + j, lane);
      const BFrag bwc = load_b<kPrecise>(big, small, kFragWc + j, lane);
      const int col = 8 * j + 2 * t;
      const float h0 = vec[kVecB1 + col], h1 = vec[kVecB1 + col + 1];
      const float bb0 = vec[kVecBb + col], bb1 = vec[kVecBb + col + 1];
      const float bc0 = vec[kVecBc + col], bc1 = vec[kVecBc + col + 1];
#pragma unroll
      for (int m = 0; m < kSlabs; ++m) {
        float h[4] = {h0, h1, h0, h1};
        float b[4] = {bb0, bb1, bb0, bb1};
        float c[4] = {bc0, bc1, bc0, bc1};
        mma<kPrecise>(h, inp[m], bw1);
        mma<kPrecise>(b, za[m], bwb);
        mma<kPrecise>(c, za[m], bwc);
        float prod[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) prod[i] = b[i] * exp2_sfu(c[i] * h[i]);
        const AFrag pa = split<kPrecise>(prod[0], prod[2], prod[1], prod[3]);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma<kPrecise>(v[m][nt], pa, load_b<kPrecise>(big, small, kFragW2 + 4 * j + nt, lane));
        }
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const float wo0 = vec[kVecWo + 8 * nt + 2 * t], wo1 = vec[kVecWo + 8 * nt + 2 * t + 1];
#pragma unroll
    for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = v[m][nt][i];
        const float u = fmaxf(x, kLeakySlope * x);  // LeakyReLU, slope < 1: two instructions
        head[m][i >> 1] = fmaf(u, (i & 1) ? wo1 : wo0, head[m][i >> 1]);
      }
    }
  }
}

__device__ __forceinline__ void store_value(void* out, int dtype, std::int64_t i, float v) {
  if (dtype == kBFloat16) static_cast<std::uint16_t*>(out)[i] = float_to_bfloat16(v);
  else if (dtype == kFloat16) static_cast<std::uint16_t*>(out)[i] = float_to_half(v);
  else static_cast<float*>(out)[i] = v;
}

// w[idx] with a run-time index, without sending the window to local memory.
__device__ __forceinline__ float pick(const float (&w)[kMaxWindow], int idx) {
  float r = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxWindow; ++j) r = (j == idx) ? w[j] : r;
  return r;
}

template <bool kPrecise, int kWindow, int kBlocks>
__global__ void __launch_bounds__(kWarps * 32, kBlocks) nowcast_kernel(Params p) {
  KNOW_DYNAMIC_SHARED(smem);
  stage_weights<kPrecise>(smem, p.packed, p.S);
  const float* big = smem;
  const float* small = smem + 2 * kStreamFragFloats;
  const float* vec = smem + (kPrecise ? 4 : 2) * kStreamFragFloats;
  const float bo = vec[2 * kStreamVecFloats];

  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int S = kWindow ? kWindow : p.S;
  const std::int64_t tiles = (p.n + kTileRows - 1) / kTileRows;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kWarps;
  for (std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
       tile < tiles; tile += stride) {
    // Rows g and g + 8 of each slab (index 2 m + hh), and their windows.
    std::int64_t row[2 * kSlabs];
    float w[2 * kSlabs][kMaxWindow];
#pragma unroll
    for (int r = 0; r < 2 * kSlabs; ++r) row[r] = tile * kTileRows + 8 * r + g;
    load_windows(p.rows, p.rows_dtype, row, p.n, S, w);
    for (int step = 0; step < p.steps; ++step) {
      float scale[kSlabs][2], shift[kSlabs][2], last[kSlabs][2];
      AFrag ax[kSlabs], ad[kSlabs];
#pragma unroll
      for (int m = 0; m < kSlabs; ++m) {
        float xv[2][4], dv[2][4];  // per row half: x at k = t, t + 4 and d at k = t, t + 4
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float(&wr)[kMaxWindow] = w[2 * m + hh];
          float lo = 0.0f, hi = 0.0f;
          if (p.wnn) {
            shift[m][hh] = wr[0];
#pragma unroll
            for (int j = 1; j < kMaxWindow; ++j) {
              if (j < S) {
                lo = fminf(lo, wr[j] - wr[0]);
                hi = fmaxf(hi, wr[j] - wr[0]);
              }
            }
            scale[m][hh] = 2.0f * ((hi - lo) + kWnnEps);
          } else {
            shift[m][hh] = 0.0f;
            scale[m][hh] = 1.0f;
          }
          // One division per row, then products: within an ulp of dividing each value.
          const float sh = shift[m][hh], inv = 1.0f / scale[m][hh];
          // x_j for j = t, t+1, t+4, t+5 (0 past the window), from which d_t and d_{t+4}.
          const auto x = [&](int j) { return j < S ? (pick(wr, j) - sh) * inv : 0.0f; };
          const float x0 = x(t), x1 = x(t + 1), x4 = x(t + 4), x5 = x(t + 5);
          xv[hh][0] = x0;
          xv[hh][1] = x4;
          dv[hh][0] = t < S - 1 ? x1 - x0 : 0.0f;
          dv[hh][1] = t + 4 < S - 1 ? x5 - x4 : 0.0f;
          last[m][hh] = x(S - 1);
        }
        ax[m] = split<kPrecise>(xv[0][0], xv[1][0], xv[0][1], xv[1][1]);
        ad[m] = split<kPrecise>(dv[0][0], dv[1][0], dv[0][1], dv[1][1]);
      }

      float head[kSlabs][2] = {};
      run_stream<kPrecise>(big, small, vec, ax, head, lane);
      run_stream<kPrecise>(big + kStreamFragFloats, small + kStreamFragFloats,
                           vec + kStreamVecFloats, ad, head, lane);

      const bool store = p.all_steps || step == p.steps - 1;
#pragma unroll
      for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // Every lane of the quad gets the same sum (float addition is commutative), so
          // the four private copies of the window stay identical.
          float y = head[m][hh];
          y += __shfl_xor_sync(0xffffffffu, y, 1);
          y += __shfl_xor_sync(0xffffffffu, y, 2);
          const float pred = (last[m][hh] + tanhf(y + bo)) * scale[m][hh] + shift[m][hh];
          const std::int64_t r = row[2 * m + hh];
          if (store && t == hh && r < p.n) {
            store_value(p.out, p.out_dtype, p.all_steps ? r * p.steps + step : r, pred);
          }
          float(&wr)[kMaxWindow] = w[2 * m + hh];
#pragma unroll
          for (int j = 0; j < kMaxWindow; ++j) {
            wr[j] = j < S - 1 ? (j + 1 < kMaxWindow ? wr[j + 1] : 0.0f) : (j == S - 1 ? pred : 0.0f);
          }
        }
      }
    }
  }
}

using Kernel = void (*)(Params);

template <bool kPrecise, int kBlocks>
Kernel pick_window(int S) {
  return S == 5 ? nowcast_kernel<kPrecise, 5, kBlocks> : nowcast_kernel<kPrecise, 0, kBlocks>;
}

Kernel pick_kernel(bool precise, int blocks_per_sm, int S) {
  if (precise) return blocks_per_sm == 2 ? pick_window<true, 2>(S) : pick_window<true, 1>(S);
  return blocks_per_sm == 2 ? pick_window<false, 2>(S) : pick_window<false, 1>(S);
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace

std::string nowcast(const NowcastArgs& a) {
  if (a.S < 2 || a.S > kMaxWindow) {
    return "S must be in [2, " + std::to_string(kMaxWindow) + "], got " + std::to_string(a.S);
  }
  if (a.n < 0) return "n must be >= 0, got " + std::to_string(a.n);
  for (int dt : {a.rows_dtype, a.out_dtype}) {
    if (!is_dtype(dt)) return "unknown dtype code " + std::to_string(dt);
  }
  if (a.blocks_per_sm != 1 && a.blocks_per_sm != 2) {
    return "blocks_per_sm must be 1 or 2, got " + std::to_string(a.blocks_per_sm);
  }
  if (a.n == 0) return "";
  if (!a.rows || !a.packed || !a.out) return "null device pointer";

  cudaError_t err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  const Kernel kernel = pick_kernel(a.precise, a.blocks_per_sm, a.S);
  const std::size_t smem = sizeof(float) * smem_floats(a.precise);
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
  if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute", err);
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device);
  if (err != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem);
  if (err != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  if (per_sm < 1) return "the kernel does not fit on this device (shared memory or registers)";
  const std::int64_t tiles = (a.n + kTileRows - 1) / kTileRows;
  const std::int64_t wanted = (tiles + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::min<std::int64_t>(wanted, std::int64_t{sms} * per_sm));

  const Params p{reinterpret_cast<const void*>(a.rows), a.rows_dtype,
                 reinterpret_cast<const float*>(a.packed), reinterpret_cast<void*>(a.out),
                 a.out_dtype, a.n, a.S, a.wnn, a.steps, a.all_steps};
  launch_kernel(kernel, dim3(blocks), dim3(kWarps * 32), smem,
                reinterpret_cast<cudaStream_t>(a.stream), p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error("kernel launch", err);
  return "";
}

}  // namespace know::cuda
