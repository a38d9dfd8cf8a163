// Argument checking and instruction-set dispatch for the fused CPU kernels.  Compiled with
// the build's baseline flags only: it must run on any processor, to say which kernel can.
#include "cpu/nowcast_dispatch.h"

#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/l1_kernel.h"
#include "packed_layout.h"

namespace know {
namespace {

struct IsaKernel {
  const char* name;
  const char* needs;  // for the error when the processor lacks it
  bool (*runnable)();
  int (*tile_rows)();
  int64_t (*workspace_floats)(int, int);
  void (*nowcast)(const NowcastArgs&, float*);
  void (*vec_exp)(const float*, float*, int64_t);
  void (*vec_exp2)(const float*, float*, int64_t);
  void (*vec_tanh)(const float*, float*, int64_t);
  int64_t (*l1_workspace_floats)(int, int);
  double (*l1)(const L1Args&, float*);
};

#define KNOW_ISA_KERNEL(ns, needs, runnable)                                          \
  IsaKernel {                                                                         \
    #ns, needs, runnable, &ns::tile_rows, &ns::workspace_floats, &ns::nowcast,        \
        &ns::vec_exp, &ns::vec_exp2, &ns::vec_tanh, &ns::l1_workspace_floats, &ns::l1 \
  }

// Best first.  The feature lists match the flags CMakeLists.txt compiles each copy with.
const IsaKernel kKernels[] = {
#if defined(KNOW_X86_ISAS)
    KNOW_ISA_KERNEL(avx512, "AVX-512 F/BW/VL, FMA and F16C",
                    [] {
                      const CpuFeatures& f = cpu_features();
                      return f.avx512f && f.avx512bw && f.avx512vl && f.fma && f.f16c;
                    }),
    KNOW_ISA_KERNEL(avx2, "AVX2, FMA and F16C",
                    [] {
                      const CpuFeatures& f = cpu_features();
                      return f.avx2 && f.fma && f.f16c;
                    }),
#endif
    KNOW_ISA_KERNEL(portable, "nothing beyond the base instruction set", [] { return true; }),
};

const char* const kKnownIsas[] = {"avx512", "avx2", "portable"};

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

const IsaKernel& kernel_for(const std::string& isa) {
  for (const IsaKernel& k : kKernels) {
    if (isa != k.name) continue;
    if (!k.runnable())
      throw std::runtime_error("isa '" + isa + "' needs " + k.needs +
                               ", which this processor lacks; it can run: " +
                               join(runnable_isas()));
    return k;
  }
  for (const char* known : kKnownIsas)
    if (isa == known)
      throw std::runtime_error("isa '" + isa + "' is not compiled into this build (it has: " +
                               join(compiled_isas()) + ")");
  throw std::invalid_argument("isa must be one of avx512, avx2, portable; got '" + isa + "'");
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// The checks nowcast() and l1() share; widest is the most values per row either indexes.
void check_common(int64_t n_rows, int S, int threads, const float* packed, int64_t size,
                  int64_t widest) {
  require(n_rows >= 0, "n_rows must be >= 0, got " + std::to_string(n_rows));
  require(S >= 2, "S must be >= 2 (the d stream needs a difference), got " + std::to_string(S));
  require(threads >= 1, "threads must be >= 1, got " + std::to_string(threads));
  require(packed != nullptr, "packed is a null pointer");
  const int64_t expected = packed_head(S).size;
  require(size == expected, "packed has " + std::to_string(size) + " floats, expected " +
                                std::to_string(expected) + " for S=" + std::to_string(S));
  require(n_rows <= std::numeric_limits<int64_t>::max() / widest,
          "n_rows is too large to index (" + std::to_string(n_rows) + ")");
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

int nowcast_tile_rows(const std::string& isa) { return kernel_for(isa).tile_rows(); }

DType parse_dtype(const std::string& name, const char* arg) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  throw std::invalid_argument(std::string(arg) + " must be float32, bfloat16 or float16; got '" +
                              name + "'");
}

Norm parse_norm(const std::string& name) {
  if (name == "wnn") return Norm::kWnn;
  if (name == "raw") return Norm::kRaw;
  throw std::invalid_argument("norm must be 'wnn' or 'raw'; got '" + name + "'");
}

bool parse_loss_space(const std::string& name) {
  if (name == "normalised") return true;
  if (name == "original") return false;
  throw std::invalid_argument("loss_space must be 'original' or 'normalised'; got '" + name +
                              "'");
}

void nowcast(const NowcastArgs& args, const std::string& isa) {
  const IsaKernel& kernel = kernel_for(isa);
  require(args.steps >= 1, "steps must be >= 1, got " + std::to_string(args.steps));
  check_common(args.n_rows, args.S, args.threads, args.packed, args.packed_size,
               args.S > args.steps ? args.S : args.steps);
  require(0 <= args.row_begin && args.row_begin <= args.row_end && args.row_end <= args.n_rows,
          "row range [" + std::to_string(args.row_begin) + ", " + std::to_string(args.row_end) +
              ") is not inside [0, n_rows=" + std::to_string(args.n_rows) + "]");
  if (args.row_begin == args.row_end) return;
  require(args.rows != nullptr, "rows is a null pointer");
  require(args.out != nullptr, "out is a null pointer");

  NowcastArgs a = args;
  const int64_t tiles = (a.row_end - a.row_begin + kernel.tile_rows() - 1) / kernel.tile_rows();
  if (a.threads > tiles) a.threads = int(tiles);  // idle threads would only cost scratch
  kernel.nowcast(a, workspace(kernel.workspace_floats(a.S, a.threads)).get());
}

double l1(const L1Args& args, const std::string& isa) {
  const IsaKernel& kernel = kernel_for(isa);
  check_common(args.n_rows, args.S, args.threads, args.packed, args.packed_size, args.S);
  require(args.grad != nullptr, "grad is a null pointer");
  if (args.n_rows > 0) {
    require(args.rows != nullptr, "rows is a null pointer");
    require(args.target != nullptr, "target is a null pointer");
  }
  L1Args a = args;
  const int64_t block_rows = int64_t(kernel.tile_rows()) * kL1BlockTiles;
  const int64_t blocks = (a.n_rows + block_rows - 1) / block_rows;
  if (a.threads > blocks) a.threads = blocks > 0 ? int(blocks) : 1;
  return kernel.l1(a, workspace(kernel.l1_workspace_floats(a.S, a.threads)).get());
}

void vec_math(const std::string& fn, const float* x, float* y, int64_t n,
              const std::string& isa) {
  const IsaKernel& kernel = kernel_for(isa);
  require(n >= 0, "n must be >= 0, got " + std::to_string(n));
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
