// The weight-gradient products of the VJP kernel (vjp_kernel.cpp): per-ISA, like
// tile_forward.h, which it builds on.
//
// A weight gradient sums over rows, which are the lanes.  Rather than keep a vector of
// lane-partial sums for every weight (about 120 KB per stream with AVX2, far beyond L1,
// and each loaded and stored for every TV FMAs), the inputs of each product are
// transposed once per tile (rows x features, features in lanes) and the gradient block
// G[j][k-vector] stays in registers while the loop runs over the tile's R rows, each step
// one vector load of the input and one broadcast of dout[j][r]: every accumulator is
// loaded and stored once per tile.  Biases, one dout line each, keep lane-partial sums
// instead.
#pragma once

#include "cpu/tile_forward.h"

namespace know {
namespace KNOW_ISA {

// K lines -> R x ld (row r: the K values of row r of the tile).
inline void transpose(const float* lines, int K, float* T, int ld) {
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
inline void wgrad(const float* dout, int J, const float* inT, int ld_in, int Kv, float* G,
                  int ld_g, float* bias) {
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

}  // namespace KNOW_ISA
}  // namespace know
