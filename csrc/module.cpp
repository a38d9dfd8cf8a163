// know_kernels._C: the CPU side of know-kernels.  It never links against torch: the
// Python wrappers validate tensors and pass raw pointers, so one build serves any torch.
#include <pybind11/pybind11.h>
#include <omp.h>

#include "cpu/cpu_features.h"

namespace py = pybind11;

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
    return d;
  }, "Instruction-set features of the running processor.");
  m.def("best_isa", &know::best_isa, "Best instruction set usable here.");
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
}
