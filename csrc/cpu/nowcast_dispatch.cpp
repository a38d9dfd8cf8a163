// Guards and instruction-set dispatch for the fused CPU kernels.  Compiled with the build's
// baseline flags only: it must run on any processor, to say which kernel can.
//
// The Python wrappers (know_kernels/kernels/ops/) hand over arguments the public entry points
// validated, so the guards here only keep a wrong call from reading or writing out of
// bounds; their messages name the broken invariant, not what a user should do.
#include "cpu/nowcast_dispatch.h"

#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/vjp_kernel.h"

namespace know {
namespace {

struct IsaKernel {
  const char* name;
  bool (*runnable)();
  int (*tile_rows)();
  int64_t (*workspace_floats)(int, int);
  void (*nowcast)(const NowcastArgs&, float*);
  void (*vec_exp)(const float*, float*, int64_t);
  void (*vec_exp2)(const float*, float*, int64_t);
  void (*vec_tanh)(const float*, float*, int64_t);
  int64_t (*vjp_workspace_floats)(int, int);
  void (*vjp)(const VjpArgs&, float*);
};

#define KNOW_ISA_KERNEL(ns, runnable)                                                      \
  IsaKernel {                                                                              \
    #ns, runnable, &ns::tile_rows, &ns::workspace_floats, &ns::nowcast, &ns::vec_exp,      \
        &ns::vec_exp2, &ns::vec_tanh, &ns::vjp_workspace_floats, &ns::vjp                  \
  }

// Best first.  The features each copy needs match the flags CMakeLists.txt compiles it with.
const IsaKernel kKernels[] = {
#if defined(KNOW_X86_ISAS)
    KNOW_ISA_KERNEL(avx512,
                    [] {
                      const CpuFeatures& f = cpu_features();
                      return f.avx512f && f.avx512bw && f.avx512vl && f.fma && f.f16c;
                    }),
    KNOW_ISA_KERNEL(avx2,
                    [] {
                      const CpuFeatures& f = cpu_features();
                      return f.avx2 && f.fma && f.f16c;
                    }),
#endif
    KNOW_ISA_KERNEL(portable, [] { return true; }),
};

// Copies with bfloat16 products (precision="bf16"), inference only; nowcast() takes their
// names as its isa.  They are not in compiled_isas(), whose every copy computes in float32.
struct Bf16Kernel {
  const char* name;
  bool (*runnable)();
  int (*tile_rows)();
  int64_t (*workspace_floats)(int, int);
  void (*nowcast)(const NowcastArgs&, float*);
};

const std::vector<Bf16Kernel>& bf16_kernels() {
  static const std::vector<Bf16Kernel> kernels = {
#if defined(KNOW_AVX512_BF16)
      {"avx512_bf16",
       [] {
         const CpuFeatures& f = cpu_features();
         return f.avx512f && f.avx512bw && f.avx512vl && f.fma && f.f16c && f.avx512_bf16;
       },
       &avx512_bf16::tile_rows, &avx512_bf16::workspace_floats, &avx512_bf16::nowcast},
#endif
  };
  return kernels;
}

[[noreturn]] void refuse(const std::string& broken) {
  throw std::invalid_argument("know_kernels._C refuses the call: " + broken);
}

void guard(bool ok, const char* broken) {
  if (!ok) refuse(broken);
}

// Running a copy of the kernel compiled for instructions this processor lacks would crash.
const IsaKernel& kernel_for(const std::string& isa) {
  for (const IsaKernel& k : kKernels)
    if (isa == k.name && k.runnable()) return k;
  refuse("isa '" + isa + "' is not compiled in or not runnable here");
}

// The bf16 copy named isa (refused where this processor cannot run it), or null.
const Bf16Kernel* bf16_kernel_for(const std::string& isa) {
  for (const Bf16Kernel& k : bf16_kernels()) {
    if (isa != k.name) continue;
    if (!k.runnable()) refuse("bf16 kernel '" + isa + "' is not runnable here");
    return &k;
  }
  return nullptr;
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// What nowcast() and vjp() both index by; widest is the most values per row either indexes.
void guard_common(int64_t n_rows, int S, int threads, const float* packed, int64_t widest) {
  guard(n_rows >= 0 && n_rows <= std::numeric_limits<int64_t>::max() / widest,
        "n out of range");
  guard(S >= 2, "S < 2");
  guard(threads >= 1, "threads < 1");
  guard(packed != nullptr, "packed is a null pointer");
}

std::unique_ptr<float, FreeDeleter> workspace(int64_t floats) {
  const int64_t bytes = floats * int64_t(sizeof(float));
  std::unique_ptr<float, FreeDeleter> ws(
      static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
  if (!ws) throw std::bad_alloc();
  return ws;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const IsaKernel& k : kKernels) names.emplace_back(k.name);
  return names;
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  for (const IsaKernel& k : kKernels)
    if (k.runnable()) names.emplace_back(k.name);
  return names;
}

std::vector<std::string> compiled_bf16_kernels() {
  std::vector<std::string> names;
  for (const Bf16Kernel& k : bf16_kernels()) names.emplace_back(k.name);
  return names;
}

std::vector<std::string> runnable_bf16_kernels() {
  std::vector<std::string> names;
  for (const Bf16Kernel& k : bf16_kernels())
    if (k.runnable()) names.emplace_back(k.name);
  return names;
}

int nowcast_tile_rows(const std::string& isa) {
  const Bf16Kernel* bf16 = bf16_kernel_for(isa);
  return bf16 ? bf16->tile_rows() : kernel_for(isa).tile_rows();
}

DType dtype_from_code(int code) {
  if (!is_dtype(code)) refuse("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

namespace {

template <class Kernel>
void run_nowcast(const NowcastArgs& args, const Kernel& kernel) {
  guard_common(args.n_rows, args.S, args.threads, args.packed,
               args.S > args.steps ? args.S : args.steps);
  guard(0 <= args.row_begin && args.row_begin <= args.row_end && args.row_end <= args.n_rows,
        "row range outside [0, n]");
  if (args.row_begin == args.row_end) return;
  guard(args.rows != nullptr && args.out != nullptr, "rows or out is a null pointer");

  NowcastArgs a = args;
  const int64_t tiles = (a.row_end - a.row_begin + kernel.tile_rows() - 1) / kernel.tile_rows();
  if (a.threads > tiles) a.threads = int(tiles);  // idle threads would only cost scratch
  kernel.nowcast(a, workspace(kernel.workspace_floats(a.S, a.threads)).get());
}

}  // namespace

void nowcast(const NowcastArgs& args, const std::string& isa) {
  if (const Bf16Kernel* bf16 = bf16_kernel_for(isa))
    run_nowcast(args, *bf16);
  else
    run_nowcast(args, kernel_for(isa));
}

void vjp(const VjpArgs& args, const std::string& isa) {
  const IsaKernel& kernel = kernel_for(isa);
  guard_common(args.n_rows, args.S, args.threads, args.packed, args.S);
  guard(args.grad_packed != nullptr, "grad_packed is a null pointer");
  guard(args.n_rows == 0 || (args.rows != nullptr && args.upstream != nullptr),
        "rows or upstream is a null pointer");
  VjpArgs a = args;
  const int64_t block_rows = int64_t(kernel.tile_rows()) * kVjpBlockTiles;
  const int64_t blocks = (a.n_rows + block_rows - 1) / block_rows;
  if (a.threads > blocks) a.threads = blocks > 0 ? int(blocks) : 1;
  kernel.vjp(a, workspace(kernel.vjp_workspace_floats(a.S, a.threads)).get());
}

void vec_math(const std::string& fn, const float* x, float* y, int64_t n,
              const std::string& isa) {
  const IsaKernel& kernel = kernel_for(isa);
  guard(n >= 0, "n < 0");
  if (fn == "exp")
    kernel.vec_exp(x, y, n);
  else if (fn == "exp2")
    kernel.vec_exp2(x, y, n);
  else if (fn == "tanh")
    kernel.vec_tanh(x, y, n);
  else
    throw std::invalid_argument("fn must be 'exp', 'exp2' or 'tanh'; got '" + fn + "'");
}

}  // namespace know
