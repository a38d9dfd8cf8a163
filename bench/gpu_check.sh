#!/usr/bin/env bash
# One pass on a CUDA machine: build both extensions, run the GPU tests (inference and the
# VJP of one step), then the GPU benchmarks.  Logs go to $OUT (or ./out) so that they survive a time-out; each step has
# its own limit so that one slow step cannot take the rest with it.
#   bash bench/gpu_check.sh            # everything (about 10 minutes on an H100/H200)
#   STEPS="build tests" bash bench/gpu_check.sh
# Where one command may run 10 minutes at most, split it in two on the same machine (the
# build stays): STEPS="build selftest tests vjptests", then STEPS="full vjpbench exp profile".
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PATH="$PATH:/usr/local/cuda/bin"
PY=${PYTHON:-python3}
STEPS=${STEPS:-"build tests selftest vjptests full vjpbench exp profile"}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null
TAIL=5 step build 240 env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" $PY setup.py -q build_ext --inplace
$PY -m know_kernels info | tail -8
step selftest 60 $PY -m know_kernels selftest
step tests 200 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_nowcast_gpu.py tests/kernels/test_nowcast_api.py
# The VJP's tests on the card, then its CPU stand-ins against the freshly built module
# (nvcc compile without spills, the emulator, the binding's own checks).
step vjptests 200 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_vjp_gpu.py \
  tests/kernels/test_vjp_cuda_build.py tests/pipeline/test_streaming.py
TAIL=40 step full 220 $PY bench/bench_nowcast_gpu.py
TAIL=30 step vjpbench 120 $PY bench/bench_vjp_gpu.py
step exp 80 $PY bench/bench_nowcast_gpu.py --exp
# What bounds each path: one launch per path under Nsight Compute, where it can read the
# counters (Firecracker machines; on gVisor ncu fails and the step says so).  The scheduler
# and warp-state sections test what bench/sass_census.py infers: issue slots left idle,
# and which stall (scoreboard waits on memory or on the MMA/SFU pipes) idles them.
if command -v ncu > /dev/null; then
  TAIL=160 step profile 150 ncu --profile-from-start off --clock-control none \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section SchedulerStats --section WarpStateStats \
    $PY bench/bench_nowcast_gpu.py --once
fi
