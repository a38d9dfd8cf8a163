// Host-side interface of the fused L1 training step (l1.cu).  Plain C++, like nowcast.cuh:
// device memory and streams travel as integers handed over by the Python wrapper.
#pragma once

#include <cstdint>
#include <string>

#include "nowcast.cuh"

namespace know::cuda {

// module.cpp fills this by aggregate initialisation: keep the binding in step with the
// order of the fields.
struct L1Args {
  std::uintptr_t rows = 0;       // (n, S) row-major, rows_dtype
  int rows_dtype = kFloat32;
  std::uintptr_t target = 0;     // (n,) float32: the true next value of each row
  std::uintptr_t packed = 0;     // float32, packing.pack layout
  std::uintptr_t grad = 0;       // float32, packed size: overwritten with d(sum |e|)/d(packed)
  std::uintptr_t loss = 0;       // one float32: overwritten with sum |e|
  std::uintptr_t workspace = 0;  // float32 scratch, l1_workspace_floats() of them
  std::int64_t workspace_floats = 0;
  std::int64_t n = 0;
  int S = 5;
  bool wnn = true;               // else "raw"
  bool normalised = false;       // loss in normalised units (e / scale), else original units
  std::uintptr_t stream = 0;     // cudaStream_t of the caller
  int device = 0;
};

// How many floats of workspace l1_loss needs for n rows on `device`; returns "" or an error.
std::string l1_workspace_floats(std::int64_t n, int S, int device, std::int64_t* floats);

// Queues the training step (the fused kernel, then a deterministic reduction over its
// blocks) on args.stream; returns "" or why it could not.  n = 0 writes zeros.
std::string l1_loss(const L1Args& args);

}  // namespace know::cuda
