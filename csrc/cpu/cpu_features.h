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
  // bf16 products.  avx512_bf16: VDPBF16PS (CPUID.(7,1):EAX[5]); usable with avx512f, whose
  // flag already includes the OS saving the zmm state.  amx_bf16, amx_tile: TDPBF16PS and
  // the tile registers (CPUID.(7,0):EDX[22], [24]); amx_os: the OS enables the tile state in
  // XCR0 (bits 17 and 18); amx_granted: Linux granted this process the tile data with
  // arch_prctl(ARCH_REQ_XCOMP_PERM), asked for once, only where the three above hold.
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
  bool amx_tile = false;
  bool amx_os = false;
  bool amx_granted = false;
};

// What the processor running this process supports (not what the build assumed); detected
// once, on the first call.
const CpuFeatures& cpu_features();

// The best instruction set this build can use here: "avx512", "avx2" or "portable".
std::string best_isa();

}  // namespace know
