#pragma once
#include <string>

namespace know {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool neon = false;
};

// What the processor running this process supports (not what the build assumed).
const CpuFeatures& cpu_features();

// The best instruction set this build can use here: "avx512", "avx2" or "portable".
std::string best_isa();

}  // namespace know
