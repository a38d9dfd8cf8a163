// The fused CPU vector-Jacobian product of one KNOWN prediction step: forward, then
// backward to the packed head and, optionally, to the rows, in one pass over the rows
// (see vjp_kernel.cpp; the contract: know_kernels/kernels/ops/vjp_cpu.py).
//
// Compiled per instruction set like nowcast_kernel.cpp; nowcast_dispatch.cpp guards the
// arguments and calls the copy that was asked for.  Per-ISA sources include this header,
// so it uses no standard-library templates.
#pragma once

#include <cstdint>

#include "cpu/nowcast_kernel.h"

namespace know {

struct VjpArgs {
  const void* rows = nullptr;       // (n_rows, S) contiguous, rows_dtype, oldest value first
  DType rows_dtype = kFloat32;
  int64_t n_rows = 0;
  int S = 0;
  const float* upstream = nullptr;  // (n_rows,): dL/d(pred_i), pred in original units
  const float* packed = nullptr;    // packing.pack(params, S)
  bool wnn = true;                  // else "raw"
  float* grad_packed = nullptr;     // packing.packed_size(S) floats, overwritten with
                                    // sum_i upstream_i d pred_i / d packed
  float* grad_rows = nullptr;       // null, or (n_rows, S) floats overwritten with
                                    // upstream_i d pred_i / d rows_i
  int threads = 1;
};

// Rows are taken in blocks of this many tiles.  Each block's gradient is summed on its own
// and the block sums are added in block order, so the result does not depend on the
// number of threads or on which thread took which block.
constexpr int kVjpBlockTiles = 32;

#define KNOW_DECLARE_VJP_ISA(ns)                                                 \
  namespace ns {                                                                 \
  /* floats of 64-byte aligned workspace vjp() needs for S and threads */        \
  int64_t vjp_workspace_floats(int S, int threads);                              \
  /* writes args.grad_packed and, if not null, args.grad_rows */                 \
  void vjp(const VjpArgs& args, float* workspace);                               \
  }

KNOW_DECLARE_VJP_ISA(portable)
#if defined(KNOW_X86_ISAS)
KNOW_DECLARE_VJP_ISA(avx2)
KNOW_DECLARE_VJP_ISA(avx512)
#endif
#undef KNOW_DECLARE_VJP_ISA

}  // namespace know
