// What the runtime can say about the machine, for `available()` and `know info`.  The
// module links the CUDA runtime statically, so it imports without a driver; the first
// runtime call then reports "no driver" or "no device" instead of failing to load.
#include "device.cuh"
#include "nowcast.cuh"

#ifndef KNOW_CUDA_ARCHS
#define KNOW_CUDA_ARCHS "unknown"
#endif

namespace know::cuda {
namespace {

std::string runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace

RuntimeStatus runtime_status() {
  RuntimeStatus status;
  const cudaError_t err = cudaGetDeviceCount(&status.device_count);
  if (err == cudaErrorInsufficientDriver) {
    // What the runtime says when there is no driver at all, too.
    status.device_count = 0;
    status.message = "no NVIDIA driver, or one too old for the CUDA " + runtime_version() +
                     " runtime this module was built with";
  } else if (err != cudaSuccess) {
    status.device_count = 0;
    status.message = cudaGetErrorString(err);
  } else if (status.device_count == 0) {
    status.message = "no CUDA device";
  }
  return status;
}

int compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return -1;
  }
  return major * 10 + minor;
}

std::string build_info() {
  return "CUDA runtime " + runtime_version() + " (static), architectures " + KNOW_CUDA_ARCHS;
}

}  // namespace know::cuda
