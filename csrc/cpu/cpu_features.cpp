#include "cpu/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace know {

#if defined(__x86_64__) || defined(__i386__)
namespace {

constexpr unsigned kXTileCfg = 17, kXTileData = 18;  // XSAVE state components of AMX

// XCR0, the state components the OS saves and restores; 0 without OSXSAVE.
unsigned long long xcr0() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux (5.16 and later) hands out the AMX tile data only to processes that ask for it.
bool request_amx_tile_data() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, long(kXTileData)) == 0;
#else
  return false;
#endif
}

void detect_bf16(CpuFeatures& f) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
  const unsigned max_subleaf = a;
  f.amx_bf16 = (d >> 22) & 1;
  f.amx_tile = (d >> 24) & 1;
  if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
    f.avx512_bf16 = f.avx512f && ((a >> 5) & 1);
  const unsigned long long tiles = (1ull << kXTileCfg) | (1ull << kXTileData);
  f.amx_os = f.amx_tile && (xcr0() & tiles) == tiles;
  f.amx_granted = f.amx_bf16 && f.amx_os && request_amx_tile_data();
}

}  // namespace
#endif

static CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  detect_bf16(f);
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::string best_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.fma) return "avx512";
  if (f.avx2 && f.fma) return "avx2";
  return "portable";
}

}  // namespace know
