// know_kernels._C: the CPU side of know-kernels.  It never links against torch: the Python
// wrappers pass raw pointers, so one build serves any torch.  Arguments come in the form
// kernel_abi.h describes, shared with know_kernels._cuda.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cpu/cpu_features.h"
#include "cpu/nowcast_dispatch.h"
#include "kernel_abi.h"

namespace py = pybind11;

namespace {

// The fields the kernels' argument structs share, from a binding's arguments.
template <class Args>
void set_rows_and_head(Args& a, uintptr_t rows, int rows_dtype, uintptr_t packed, int64_t n,
                       int S, bool wnn) {
  a.rows = reinterpret_cast<const void*>(rows);
  a.rows_dtype = know::dtype_from_code(rows_dtype);
  a.packed = reinterpret_cast<const float*>(packed);
  a.n_rows = n;
  a.S = S;
  a.wnn = wnn;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "know-kernels CPU extension";
  m.def("cpu_features", []() {
    const know::CpuFeatures& f = know::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["neon"] = f.neon;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx_bf16"] = f.amx_bf16;
    d["amx_tile"] = f.amx_tile;
    d["amx_os"] = f.amx_os;
    d["amx_granted"] = f.amx_granted;
    return d;
  }, "Instruction-set features of the running processor.");
  m.def("best_isa", &know::best_isa, "Best instruction set usable here.");
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });

  py::dict codes;
  for (const know::DTypeName& d : know::kDTypeNames) codes[d.name] = int(d.code);
  m.attr("DTYPE_CODES") = codes;

  m.def(
      "nowcast",
      [](uintptr_t rows, int rows_dtype, uintptr_t packed, uintptr_t out, int out_dtype,
         int64_t n, int S, bool wnn, int steps, bool all_steps, int threads,
         const std::string& isa, int64_t row_begin, std::optional<int64_t> row_end) {
        know::NowcastArgs a;
        set_rows_and_head(a, rows, rows_dtype, packed, n, S, wnn);
        a.out = reinterpret_cast<void*>(out);
        a.out_dtype = know::dtype_from_code(out_dtype);
        a.steps = steps;
        a.all_steps = all_steps;
        a.threads = threads;
        a.row_begin = row_begin;
        a.row_end = row_end.value_or(n);
        know::nowcast(a, isa);
      },
      py::arg("rows"), py::arg("rows_dtype"), py::arg("packed"), py::arg("out"),
      py::arg("out_dtype"), py::arg("n"), py::arg("S"), py::arg("wnn"), py::arg("steps"),
      py::arg("all_steps"), py::arg("threads"), py::arg("isa"), py::arg("row_begin") = 0,
      py::arg("row_end") = py::none(), py::call_guard<py::gil_scoped_release>(),
      "Fused KNOWN prediction of rows [row_begin, row_end) (default: all) of a contiguous "
      "(n, S) array at address rows, into out ((n, steps) if all_steps else (n,)).  "
      "Addresses are raw pointers; see know_kernels/kernels/ops/nowcast_cpu.py.");
  m.def(
      "vjp",
      [](uintptr_t rows, int rows_dtype, uintptr_t packed, uintptr_t upstream,
         uintptr_t grad_packed, uintptr_t grad_rows, int64_t n, int S, bool wnn, int threads,
         const std::string& isa) {
        know::VjpArgs a;
        set_rows_and_head(a, rows, rows_dtype, packed, n, S, wnn);
        a.upstream = reinterpret_cast<const float*>(upstream);
        a.grad_packed = reinterpret_cast<float*>(grad_packed);
        a.grad_rows = reinterpret_cast<float*>(grad_rows);
        a.threads = threads;
        know::vjp(a, isa);
      },
      py::arg("rows"), py::arg("rows_dtype"), py::arg("packed"), py::arg("upstream"),
      py::arg("grad_packed"), py::arg("grad_rows"), py::arg("n"), py::arg("S"), py::arg("wnn"),
      py::arg("threads"), py::arg("isa"), py::call_guard<py::gil_scoped_release>(),
      "Fused VJP of one prediction step of a contiguous (n, S) array at address rows with n "
      "float32 upstream gradients: writes sum_i upstream_i d pred_i / d packed to grad_packed "
      "(packing.packed_size(S) floats) and, unless grad_rows is 0, upstream_i d pred_i / d "
      "rows_i to the (n, S) float32 array at grad_rows.  Addresses are raw pointers; see "
      "know_kernels/kernels/ops/vjp_cpu.py.");
  m.def("nowcast_tile_rows", &know::nowcast_tile_rows, py::arg("isa"),
        "Rows per tile of the fused kernel for one instruction set.");
  m.def("compiled_isas", &know::compiled_isas,
        "Instruction sets the fused kernel was compiled for, best first.");
  m.def("runnable_isas", &know::runnable_isas,
        "Compiled instruction sets this processor can run, best first.");
  m.def("compiled_bf16_kernels", &know::compiled_bf16_kernels,
        "Copies of the inference kernel with bfloat16 products compiled into this build "
        "(nowcast's isa for precision=\"bf16\").");
  m.def("runnable_bf16_kernels", &know::runnable_bf16_kernels,
        "Compiled bfloat16-product kernels this processor can run.");
  m.def(
      "vec_math",
      [](const std::string& fn, uintptr_t x, uintptr_t y, int64_t n, const std::string& isa) {
        know::vec_math(fn, reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), n,
                       isa);
      },
      py::arg("fn"), py::arg("x"), py::arg("y"), py::arg("n"), py::arg("isa"),
      py::call_guard<py::gil_scoped_release>(),
      "y = fn(x) for n float32 values (fn: 'exp', 'exp2' or 'tanh') with the kernel's "
      "vector math.");
}
