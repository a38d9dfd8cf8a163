// How both compiled modules, know_kernels._C (CPU) and know_kernels._cuda, take their
// arguments from the Python wrappers (know_kernels/kernels/ops/): tensors as raw addresses,
// storage dtypes as the codes below (exported to Python as DTYPE_CODES), the normalisation
// as `bool wnn` (false: "raw").  The wrappers have validated every argument; the modules
// only refuse a call that would read or write out of bounds.
//
// Per-ISA CPU sources include this header too, hence static functions (see packed_layout.h).
#pragma once

namespace know {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct DTypeName {
  const char* name;  // torch's name, as the wrappers look codes up
  DType code;
};
constexpr DTypeName kDTypeNames[] = {
    {"float32", kFloat32}, {"bfloat16", kBFloat16}, {"float16", kFloat16}};

static constexpr bool is_dtype(int code) {
  return code == kFloat32 || code == kBFloat16 || code == kFloat16;
}

}  // namespace know
