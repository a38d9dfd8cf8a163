// The fused CPU kernel for meta-training KNOWN with the L1 objective: forward, loss and
// backward to the packed head in one pass over the rows (see l1_kernel.cpp).
//
// Compiled per instruction set like nowcast_kernel.cpp; nowcast_dispatch.cpp guards the
// arguments and calls the copy that was asked for.  Per-ISA sources include this header,
// so it uses no standard-library templates.
#pragma once

#include <cstdint>

#include "cpu/nowcast_kernel.h"

namespace know {

struct L1Args {
  const void* rows = nullptr;     // (n_rows, S) contiguous, rows_dtype, oldest value first
  DType rows_dtype = kFloat32;
  int64_t n_rows = 0;
  int S = 0;
  const float* target = nullptr;  // (n_rows,): the true next values, in original units
  const float* packed = nullptr;  // packing.pack(params, S)
  bool wnn = true;                // else "raw"
  bool normalised = false;        // e = (pred - target) / scale, else pred - target
  float* grad = nullptr;          // packing.packed_size(S) floats, overwritten with
                                  // d(sum |e|)/d(packed)
  int threads = 1;
};

// Rows are taken in blocks of this many tiles.  Each block's gradient is summed on its own
// and the block sums are added in block order, so the result does not depend on the
// number of threads or on which thread took which block.
constexpr int kL1BlockTiles = 32;

#define KNOW_DECLARE_L1_ISA(ns)                                                  \
  namespace ns {                                                                 \
  /* floats of 64-byte aligned workspace l1() needs for S and threads */         \
  int64_t l1_workspace_floats(int S, int threads);                               \
  /* writes args.grad and returns sum |e| */                                     \
  double l1(const L1Args& args, float* workspace);                               \
  }

KNOW_DECLARE_L1_ISA(portable)
#if defined(KNOW_X86_ISAS)
KNOW_DECLARE_L1_ISA(avx2)
KNOW_DECLARE_L1_ISA(avx512)
#endif
#undef KNOW_DECLARE_L1_ISA

}  // namespace know
