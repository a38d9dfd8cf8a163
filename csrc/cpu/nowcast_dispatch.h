// Argument checking and instruction-set dispatch for the fused CPU kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/l1_kernel.h"
#include "cpu/nowcast_kernel.h"

namespace know {

// Instruction sets compiled into this build, best first, and the subset this processor
// can execute.
std::vector<std::string> compiled_isas();
std::vector<std::string> runnable_isas();

// Storage dtype and normalisation by name; the error names the argument.
DType parse_dtype(const std::string& name, const char* arg);
Norm parse_norm(const std::string& name);
// "normalised" -> true, "original" -> false.
bool parse_loss_space(const std::string& name);

// Rows per tile of one instruction set's kernel.  Throws like nowcast() for a bad isa.
int nowcast_tile_rows(const std::string& isa);

// Checks every argument (std::invalid_argument naming it), checks that isa is compiled in
// and runnable here (std::runtime_error otherwise), then computes.
void nowcast(const NowcastArgs& args, const std::string& isa);

// The fused L1 training step: checks like nowcast(), writes args.grad (every element) and
// returns sum |e|.  n_rows = 0 gives 0 and a zero gradient.
double l1(const L1Args& args, const std::string& isa);

// exp, exp2 or tanh of n floats with the kernel's own vector math (for accuracy checks).
void vec_math(const std::string& fn, const float* x, float* y, int64_t n,
              const std::string& isa);

}  // namespace know
