// The host-side interface of the CUDA kernels.  Plain C++ (no CUDA headers), so that the
// pybind11 module and the CPU emulation harness can include it: device memory and
// streams travel as integers handed over by the Python wrapper (torch owns them), the
// other arguments in the forms of ../kernel_abi.h.
#pragma once

#include <cstdint>
#include <string>

#include "../kernel_abi.h"

namespace know::cuda {

// Ways of computing exp (exp_bench.cu), compared by exp_throughput below:
//   kExpSfu:   ex2.approx on the special-function units (16 per SM and clock).
//   kExpPoly:  a degree-6 polynomial on the FMA pipes (about 10 FMA-pipe operations).
//   kExpMixed: half of the work items each way, so both pipes share the load.
enum ExpMode : int { kExpSfu = 0, kExpPoly = 1, kExpMixed = 2 };

// Largest window the kernel keeps in registers; both streams then fit one k = 8 MMA step.
constexpr int kMaxWindow = 8;

struct NowcastArgs {
  std::uintptr_t rows = 0;     // (n, S) row-major, rows_dtype
  int rows_dtype = kFloat32;
  std::uintptr_t packed = 0;   // float32, packing.pack layout
  std::uintptr_t out = 0;      // (n, steps) if all_steps else (n,), out_dtype
  int out_dtype = kFloat32;
  std::int64_t n = 0;
  int S = 5;
  bool wnn = true;             // else "raw"
  int steps = 1;
  bool all_steps = false;
  // true: 3xTF32 products (big*big + big*small + small*big), float32-level accuracy;
  // false: 1xTF32, operands rounded to 10 mantissa bits.
  bool precise = true;
  // Resident blocks per SM the kernel's registers are budgeted for: 1 or 2 (nowcast.cu).
  int blocks_per_sm = 1;
  std::uintptr_t stream = 0;   // cudaStream_t of the caller (0: legacy default stream)
  int device = 0;
};

// Queues the kernel on args.stream; returns "" or why it could not (a CUDA error, or a
// call that would index out of bounds: the wrapper has validated the arguments).
std::string nowcast(const NowcastArgs& args);

// Micro-benchmark: `threads` threads each evaluate 8 x `iters` exponentials with `exp_mode`
// and write one float to out[thread].  Returns "" or an error.
std::string exp_throughput(int exp_mode, std::uintptr_t out, std::int64_t threads, int iters,
                           std::uintptr_t stream, int device);

struct RuntimeStatus {
  int device_count = 0;
  std::string message;  // the runtime's reason when device_count == 0
};
RuntimeStatus runtime_status();

// Compute capability (major * 10 + minor) of `device`, or -1.
int compute_capability(int device);

// CUDA version and architectures this module was built for.
std::string build_info();

}  // namespace know::cuda
