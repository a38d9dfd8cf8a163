// The fused CPU kernel for KNOWN inference (see nowcast_kernel.cpp for how it computes).
//
// nowcast_kernel.cpp is compiled once per instruction set, each copy in its own namespace
// (know::avx512, know::avx2, know::portable); nowcast_dispatch.cpp guards the arguments
// and calls the copy that was asked for, after checking that this processor can run it.
// Per-ISA sources include this header, so it uses no standard-library templates.
#pragma once

#include <cstdint>

#include "kernel_abi.h"

namespace know {

struct NowcastArgs {
  const void* rows = nullptr;   // (n_rows, S) contiguous, rows_dtype, oldest value first
  DType rows_dtype = kFloat32;
  int64_t n_rows = 0;
  int S = 0;
  const float* packed = nullptr;  // packing.pack(params, S)
  bool wnn = true;                // else "raw"
  int steps = 1;
  bool all_steps = false;         // out is (n_rows, steps), else (n_rows,) = last step
  void* out = nullptr;
  DType out_dtype = kFloat32;
  int threads = 1;
  int64_t row_begin = 0;          // only rows [row_begin, row_end) are computed
  int64_t row_end = 0;
};

// The entry points each instruction-set copy of nowcast_kernel.cpp defines.
#define KNOW_DECLARE_NOWCAST_ISA(ns)                                             \
  namespace ns {                                                                 \
  int tile_rows();                                                               \
  /* floats of 64-byte aligned workspace nowcast() needs for S and threads */    \
  int64_t workspace_floats(int S, int threads);                                  \
  void nowcast(const NowcastArgs& args, float* workspace);                      \
  void vec_exp(const float* x, float* y, int64_t n);                             \
  void vec_exp2(const float* x, float* y, int64_t n);                            \
  void vec_tanh(const float* x, float* y, int64_t n);                            \
  }

KNOW_DECLARE_NOWCAST_ISA(portable)
#if defined(KNOW_X86_ISAS)
KNOW_DECLARE_NOWCAST_ISA(avx2)
KNOW_DECLARE_NOWCAST_ISA(avx512)
#endif
#if defined(KNOW_AVX512_BF16)
KNOW_DECLARE_NOWCAST_ISA(avx512_bf16)  // the avx512 copy with bfloat16 products (VDPBF16PS)
#endif
#undef KNOW_DECLARE_NOWCAST_ISA

}  // namespace know
