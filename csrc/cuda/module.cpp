// know_kernels._cuda: the CUDA side of know-kernels.  Like _C it never links against
// torch: the Python wrappers (know_kernels/kernels/ops/*_cuda.py) hand over device pointers
// and the caller's stream as integers, the other arguments in the forms of
// ../kernel_abi.h, shared with _C.  The CUDA runtime is linked statically, so the module
// imports on machines without a driver or GPU and says so through runtime_status().
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "nowcast.cuh"
#include "vjp.cuh"

namespace py = pybind11;
using know::cuda::NowcastArgs;
using know::cuda::VjpArgs;

namespace {

void check(const std::string& error) {
  if (!error.empty()) throw std::runtime_error("know_kernels._cuda: " + error);
}

// Runs a launcher without the GIL (it may wait on the driver) and raises its error.
template <typename Args>
void queue(std::string (*launch)(const Args&), const Args& args) {
  std::string error;
  {
    py::gil_scoped_release release;
    error = launch(args);
  }
  check(error);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "know-kernels CUDA extension (tensor-core KNOWN inference and its VJP)";
  m.attr("MAX_WINDOW") = know::cuda::kMaxWindow;
  py::dict codes;
  for (const know::DTypeName& d : know::kDTypeNames) codes[d.name] = int(d.code);
  m.attr("DTYPE_CODES") = codes;
  m.attr("EXP_MODES") = py::dict(py::arg("sfu") = int(know::cuda::kExpSfu),
                                 py::arg("poly") = int(know::cuda::kExpPoly),
                                 py::arg("mixed") = int(know::cuda::kExpMixed));
  m.def("build_info", &know::cuda::build_info,
        "CUDA runtime version and GPU architectures this module was compiled for.");
  m.def("runtime_status", []() {
    const auto s = know::cuda::runtime_status();
    return py::make_tuple(s.device_count, s.message);
  }, "(device_count, message): message says why when no device can be used.");
  m.def("device_count", []() { return know::cuda::runtime_status().device_count; });
  m.def("compute_capability", &know::cuda::compute_capability, py::arg("device"),
        "major * 10 + minor of a device, or -1.");
  m.def("nowcast",
        [](std::uintptr_t rows, int rows_dtype, std::uintptr_t packed, std::uintptr_t out,
           int out_dtype, std::int64_t n, int S, bool wnn, int steps, bool all_steps,
           bool precise, int blocks_per_sm, std::uintptr_t stream, int device) {
          NowcastArgs a;
          a.rows = rows;
          a.rows_dtype = rows_dtype;
          a.packed = packed;
          a.out = out;
          a.out_dtype = out_dtype;
          a.n = n;
          a.S = S;
          a.wnn = wnn;
          a.steps = steps;
          a.all_steps = all_steps;
          a.precise = precise;
          a.blocks_per_sm = blocks_per_sm;
          a.stream = stream;
          a.device = device;
          queue(know::cuda::nowcast, a);
        },
        py::arg("rows"), py::arg("rows_dtype"), py::arg("packed"), py::arg("out"),
        py::arg("out_dtype"), py::arg("n"), py::arg("S"), py::arg("wnn"), py::arg("steps"),
        py::arg("all_steps"), py::arg("precise"), py::arg("blocks_per_sm"), py::arg("stream"),
        py::arg("device"),
        "Queue the fused kernel on `stream`.  Pointers are device addresses.");
  m.def("vjp_workspace_floats",
        [](std::int64_t n, int S, int groups) {
          std::int64_t floats = 0;
          check(know::cuda::vjp_workspace_floats(n, S, groups, &floats));
          return floats;
        },
        py::arg("n"), py::arg("S"), py::arg("groups"),
        "Floats of float32 workspace that vjp needs for n rows in at most `groups` groups "
        "(0: the default).");
  m.def("vjp",
        [](std::uintptr_t rows, int rows_dtype, std::uintptr_t packed, std::uintptr_t upstream,
           std::uintptr_t grad_packed, std::uintptr_t grad_rows, std::uintptr_t workspace,
           std::int64_t workspace_floats, std::int64_t n, int S, bool wnn, int groups,
           int max_blocks, std::uintptr_t stream, int device) {
          queue(know::cuda::vjp, VjpArgs{rows, rows_dtype, packed, upstream, grad_packed,
                                         grad_rows, workspace, workspace_floats, n, S, wnn,
                                         groups, max_blocks, stream, device});
        },
        py::arg("rows"), py::arg("rows_dtype"), py::arg("packed"), py::arg("upstream"),
        py::arg("grad_packed"), py::arg("grad_rows"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("n"), py::arg("S"), py::arg("wnn"),
        py::arg("groups"), py::arg("max_blocks"), py::arg("stream"), py::arg("device"),
        "Queue the fused VJP of one nowcast step on `stream`: overwrites grad_packed (packed "
        "size) with sum u d pred / d packed and, unless grad_rows is 0, grad_rows (n, S) "
        "with u d pred / d rows.  Pointers are device addresses.");
  m.def("exp_throughput",
        [](int exp_mode, std::uintptr_t out, std::int64_t threads, int iters,
           std::uintptr_t stream, int device) {
          check(know::cuda::exp_throughput(exp_mode, out, threads, iters, stream, device));
        },
        py::arg("exp_mode"), py::arg("out"), py::arg("threads"), py::arg("iters"),
        py::arg("stream"), py::arg("device"),
        "Queue the exp micro-benchmark: each thread evaluates 8 * iters exponentials.");
}
