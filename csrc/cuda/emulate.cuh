// A small SIMT emulator so that the kernels of this directory run, slowly, on a CPU when
// compiled as C++ with -DKNOW_CUDA_EMULATE (the test suite does this: it is the only way
// to check the tensor-core fragment bookkeeping on a machine without a GPU).
//
// Every CUDA thread of a block is a std::thread.  Warp-collective operations (mma.sync,
// shuffles) publish each lane's operands in per-warp slots, meet at a warp barrier,
// compute the lane's own result from all slots, and meet again before the slots are
// reused.  The m16n8k8 fragment layout below follows the PTX ISA ("Matrix Fragments for
// mma.m16n8k8", .tf32): lane = 4 * groupID + threadID_in_group, and
//   A (16x8, row): a0 (g, t)   a1 (g+8, t)   a2 (g, t+4)   a3 (g+8, t+4)
//   B (8x8, col):  b0 (t, g)   b1 (t+4, g)
//   C (16x8):      c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
// The tensor cores read only the top 19 bits of a TF32 operand; the products are summed
// in double and rounded once, so the emulation checks data movement and algebra, not the
// hardware's accumulation rounding (the GPU tests bound that).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace emu {

// The emulated device: two SMs, one resident block each, so that small tests already
// send every warp through several row tiles of the persistent loop.
constexpr int kSmCount = 2;

struct Warp {
  std::barrier<> sync{32};
  std::uint32_t a[32][4];
  std::uint32_t b[32][2];
  float value[32];
};

struct Thread {
  dim3 thread_idx, block_idx;
  Warp* warp = nullptr;
  std::barrier<>* block = nullptr;
};

inline thread_local Thread self;
inline dim3 block_dim, grid_dim;
inline std::vector<float> shared_memory;
inline std::mutex launch_mutex;

inline float* dynamic_shared() { return shared_memory.data(); }
inline int lane() { return static_cast<int>(self.thread_idx.x & 31u); }

inline float as_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::uint32_t as_uint(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// cvt.rna.tf32.f32: nearest, ties away from zero; Inf and NaN pass through.
inline std::uint32_t cvt_rna_tf32(float x) {
  const std::uint32_t u = as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2]) {
  Warp& w = *self.warp;
  const int me = lane();
  std::memcpy(w.a[me], a, sizeof a);
  std::memcpy(w.b[me], b, sizeof b);
  w.sync.arrive_and_wait();
  const auto tf32 = [](std::uint32_t u) { return static_cast<double>(as_float(u & 0xffffe000u)); };
  const int g = me >> 2, t = me & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double sum = 0.0;
    for (int k = 0; k < 8; ++k) {
      const double av = tf32(w.a[(row & 7) * 4 + (k & 3)][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
      const double bv = tf32(w.b[col * 4 + (k & 3)][k >= 4 ? 1 : 0]);
      sum += av * bv;
    }
    d[i] = static_cast<float>(static_cast<double>(d[i]) + sum);
  }
  w.sync.arrive_and_wait();
}

inline float shfl_xor(float v, int mask) {
  Warp& w = *self.warp;
  const int me = lane();
  w.value[me] = v;
  w.sync.arrive_and_wait();
  const float r = w.value[me ^ mask];
  w.sync.arrive_and_wait();
  return r;
}

inline float half_to_float(std::uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline std::uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  std::uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t u = as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes,
            Args&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const int threads = static_cast<int>(block.x);
  block_dim = block;
  grid_dim = grid;
  shared_memory.assign(smem_bytes / sizeof(float) + 4, 0.0f);
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> block_sync(threads);
    std::vector<std::unique_ptr<Warp>> warps;
    for (int i = 0; i < (threads + 31) / 32; ++i) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> pool;
    for (int tid = 0; tid < threads; ++tid) {
      pool.emplace_back([&, tid] {
        self = Thread{dim3(static_cast<unsigned>(tid)), dim3(bx), warps[tid / 32].get(), &block_sync};
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace emu

#define threadIdx (emu::self.thread_idx)
#define blockIdx (emu::self.block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::self.block->arrive_and_wait(); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl_xor(v, mask); }
inline float __uint_as_float(std::uint32_t u) { return emu::as_float(u); }
inline std::uint32_t __float_as_uint(float f) { return emu::as_uint(f); }
inline float __int_as_float(int i) { return emu::as_float(static_cast<std::uint32_t>(i)); }

inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kSmCount; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
  }
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int,
                                                                 std::size_t) {
  *blocks = 1;
  return cudaSuccess;
}
