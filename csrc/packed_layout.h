// Where each folded tensor of one KNOWN head lies in the packed float32 vector of
// know_kernels/kernels/packing.py: one definition for every kernel.
//
// Per-ISA sources include this header too.  Its functions have internal linkage (static),
// so that no copy compiled with one instruction set's flags can stand in for another's at
// link time (see cpu/simd.h).
#pragma once

#include <cstdint>

namespace know {

// The CUDA kernels (csrc/cuda/folded.cuh) compute the layout on the device, in int.
#if defined(__CUDACC__)
#define KNOW_LAYOUT_FN __host__ __device__ constexpr
#else
#define KNOW_LAYOUT_FN constexpr
#endif

constexpr int kHidden = 64;
constexpr int kBottleneck = 8;
constexpr int kOutHidden = 32;

// Offsets, in floats from the start of the packed vector, of one stream's tensors.
template <typename Index>
struct PackedStreamT {
  int n;  // the stream's input width: S for x, S - 1 for d
  Index w1, b1, g, gb, wb, bb, wc, bc;
  Index w2;  // a2 follows w2 directly: [w2; a2] is one 72 x 32 matrix
  Index a2, b2;
};

template <typename Index>
struct PackedHeadT {
  PackedStreamT<Index> stream[2];  // x, then d
  Index wo, bo, size;              // wo: 2 x 32 (stream x's half first); bo ends the vector
};

using PackedStream = PackedStreamT<int64_t>;
using PackedHead = PackedHeadT<int64_t>;

template <typename Index = int64_t>
static KNOW_LAYOUT_FN PackedHeadT<Index> packed_head(int S) {
  PackedHeadT<Index> head{};
  Index at = 0;
  for (int s = 0; s < 2; ++s) {
    PackedStreamT<Index>& p = head.stream[s];
    p.n = S - s;
    p.w1 = at;
    p.b1 = p.w1 + p.n * kHidden;
    p.g = p.b1 + kHidden;
    p.gb = p.g + p.n * kBottleneck;
    p.wb = p.gb + kBottleneck;
    p.bb = p.wb + kBottleneck * kHidden;
    p.wc = p.bb + kHidden;
    p.bc = p.wc + kBottleneck * kHidden;
    p.w2 = p.bc + kHidden;
    p.a2 = p.w2 + kHidden * kOutHidden;
    p.b2 = p.a2 + kBottleneck * kOutHidden;
    at = p.b2 + kOutHidden;
  }
  head.wo = at;
  head.bo = at + 2 * kOutHidden;
  head.size = head.bo + 1;
  return head;
}

#undef KNOW_LAYOUT_FN

static_assert(packed_head(5).size == 7833, "packing.packed_size(5)");

}  // namespace know
