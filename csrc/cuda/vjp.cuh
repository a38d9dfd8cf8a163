// Host-side interface of the fused VJP of one nowcast step (vjp.cu).  Plain C++, like
// nowcast.cuh: device memory and streams travel as integers handed over by the Python
// wrapper.
#pragma once

#include <cstdint>
#include <string>

#include "nowcast.cuh"

namespace know::cuda {

// Most groups of consecutive row tiles whose gradients the kernel sums separately (one
// workspace row each): 1024 x P floats is 32 MB at S = 5.
constexpr int kVjpGroups = 1024;

// module.cpp fills this by aggregate initialisation: keep the binding in step with the
// order of the fields.
struct VjpArgs {
  std::uintptr_t rows = 0;         // (n, S) row-major, rows_dtype
  int rows_dtype = kFloat32;
  std::uintptr_t packed = 0;       // float32, packing.pack layout
  std::uintptr_t upstream = 0;     // (n,) float32: dL/d(pred) of each row's one-step prediction
  std::uintptr_t grad_packed = 0;  // float32, packed size: overwritten with sum u d pred/d packed
  std::uintptr_t grad_rows = 0;    // (n, S) float32 overwritten with u d pred / d rows; 0: skip
  std::uintptr_t workspace = 0;    // float32 scratch, vjp_workspace_floats() of them
  std::int64_t workspace_floats = 0;
  std::int64_t n = 0;
  int S = 5;
  bool wnn = true;                 // else "raw"
  // Most groups (0: kVjpGroups), which fix the order of the sums, and most blocks (0: as
  // many as are resident at once), which does not change the result.
  int groups = 0;
  int max_blocks = 0;
  std::uintptr_t stream = 0;       // cudaStream_t of the caller
  int device = 0;
};

// How many floats of workspace vjp needs for n rows and at most `groups` groups (0:
// kVjpGroups); returns "" or an error.
std::string vjp_workspace_floats(std::int64_t n, int S, int groups, std::int64_t* floats);

// Queues the VJP (the fused kernel, then a reduction over its groups in a fixed order) on
// args.stream; returns "" or why it could not.  n = 0 writes zeros.
std::string vjp(const VjpArgs& args);

}  // namespace know::cuda
