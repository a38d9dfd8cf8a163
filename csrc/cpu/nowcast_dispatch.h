// Guards and instruction-set dispatch for the fused CPU kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/nowcast_kernel.h"
#include "cpu/vjp_kernel.h"

namespace know {

// Instruction sets compiled into this build, best first, and the subset this processor
// can execute.
std::vector<std::string> compiled_isas();
std::vector<std::string> runnable_isas();

// The storage dtype of a code of kernel_abi.h.  Like every guard below, throws
// std::invalid_argument for a call the Python wrappers would never make.
DType dtype_from_code(int code);

// The copies with bfloat16 products (precision="bf16") compiled into this build, and the
// subset this processor can execute; nowcast() takes their names as its isa.
std::vector<std::string> compiled_bf16_kernels();
std::vector<std::string> runnable_bf16_kernels();

// Rows per tile of one instruction set's kernel (or bf16 kernel's).
int nowcast_tile_rows(const std::string& isa);

// Refuses a call that would index out of bounds or an isa this processor cannot run,
// then computes.
void nowcast(const NowcastArgs& args, const std::string& isa);

// The fused VJP of one step: guarded like nowcast(), writes args.grad_packed and, unless it
// is null, args.grad_rows (every element of each).  n_rows = 0 gives a zero gradient.
void vjp(const VjpArgs& args, const std::string& isa);

// exp, exp2 or tanh of n floats with the kernel's own vector math (for accuracy checks).
void vec_math(const std::string& fn, const float* x, float* y, int64_t n,
              const std::string& isa);

}  // namespace know
