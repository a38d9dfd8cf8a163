"""Fused CPU kernel (backend "cpu") against the eager PyTorch reference, side by side.

    python bench/bench_nowcast_cpu.py            # the full table (~6 min on 2 cores)
    python bench/bench_nowcast_cpu.py --quick    # smaller N, fewer configs (~30 s)
    python bench/bench_nowcast_cpu.py --exp-accuracy   # exhaustive exp/exp2/tanh error scan

Reported per config: seconds (best of a few runs), rows/s, GFLOP/s counted two ways
(the spec's nominal 8,832 MAC = 17,664 FLOP per row per step, and the 7,368 MAC = 14,736
FLOP the folded form actually executes), and the executed rate as a fraction of this
machine's fp32 matmul ceiling, measured in the same run (torch.mm 2048 x 2048, best of 5,
same thread count).  The reference is the float32 eager nowcast_ref on the same rows.
Peak RSS for N = 11.2M is measured in a fresh child process per path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from know_kernels import KNOWNHead, nowcast
from know_kernels.kernels.ops import nowcast_cpu
from know_kernels.kernels.reference import nowcast_ref
from provenance import commit

NOMINAL_FLOP = 2 * 8832   # per row per step, spec section 7
EXECUTED_FLOP = 2 * 7368  # the folded form of packing.py
RESNET18 = 11_200_000
S = 5


def trajectories(n: int, seed: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """Rows like real weight trajectories: w0 ~ N(0, 0.05), then small drifting steps.
    Built in chunks so that generating them does not set the process's peak RSS."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, S)
    for start in range(0, n, chunk):
        block = rows[start:start + chunk]
        w0 = torch.randn(block.shape[0], 1, generator=g) * 0.05
        steps = torch.randn(block.shape[0], 1, generator=g) * 1e-3 + \
            torch.randn(block.shape[0], S - 1, generator=g) * 1e-3
        block[:, :1] = w0
        block[:, 1:] = w0 + torch.cumsum(steps, dim=1)
    return rows


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_ceiling(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048 ** 3 / best_time(lambda: torch.mm(a, b), 5) / 1e9


def machine() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"




def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_child(path: str, n: int, steps: int) -> None:
    """Runs in a fresh process: one prediction of n rows, then its peak RSS as JSON."""
    head = KNOWNHead(S=S, norm="wnn", seed=0)
    rows = trajectories(n)
    before = proc_status_kib("VmRSS")
    if path == "fused":
        nowcast(rows, head, steps=steps, backend="cpu")
    else:
        with torch.no_grad():
            nowcast_ref(rows, {k: v.detach() for k, v in head.params_dict().items()}, "wnn",
                        steps=steps)
    print(json.dumps({"before_mib": before / 1024,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "hwm_mib": proc_status_kib("VmHWM") / 1024}))


def peak_rss(path: str, n: int, steps: int) -> dict:
    """Linux carries ru_maxrss across exec, so a child started by a big parent would report
    the parent's size: main() measures before it allocates anything, and the child's own
    high-water mark (VmHWM) is printed beside it as a check."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", path, str(n), str(steps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def exp_accuracy() -> None:
    """Max relative error of the kernel's exp, exp2 and tanh over every finite float whose
    result is a normal float, against float64 numpy; other inputs must give the float32
    rounding of the true result (0, +inf, +-1, a subnormal within one unit)."""
    isa = nowcast_cpu.isa()
    tiny = np.finfo(np.float32).tiny
    for fn, ref_fn in (("exp", np.exp), ("exp2", np.exp2), ("tanh", np.tanh)):
        worst, worst_x, edge_failures, start_time = 0.0, None, 0, time.time()
        step = 1 << 24
        for start in range(0, 1 << 32, step):
            x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
            x = x[np.isfinite(x)]
            y = nowcast_cpu.vec_math(fn, torch.from_numpy(x), isa).numpy().astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                ref = ref_fn(x.astype(np.float64))
                ref32 = ref.astype(np.float32).astype(np.float64)
                normal = np.isfinite(ref32) & (np.abs(ref) >= tiny)
                if normal.any():
                    rel = np.abs(y[normal] - ref[normal]) / np.abs(ref[normal])
                    i = int(rel.argmax())
                    if rel[i] > worst:
                        worst, worst_x = float(rel[i]), float(x[normal][i])
                other = ~normal
                ok = (y[other] == ref32[other]) | (np.abs(y[other] - ref32[other]) <= 2.0**-149)
                edge_failures += int((~ok).sum())
        print(f"{fn:5s} [{isa}]: max relative error {worst:.3e} ({worst / 2 ** -24:.2f} x 2^-24) "
              f"at x = {worst_x!r}; inputs outside the normal range not rounded like float32: "
              f"{edge_failures}  ({time.time() - start_time:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, fewer configs")
    parser.add_argument("--exp-accuracy", action="store_true",
                        help="only the exhaustive exp/exp2/tanh accuracy scan (~15 min)")
    parser.add_argument("--rss-child", nargs=3, metavar=("PATH", "N", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return
    ok, why = nowcast_cpu.available(torch.device("cpu"))
    if not ok:
        sys.exit(f"the fused CPU kernel is not available: {why}")
    if args.exp_accuracy:
        exp_accuracy()
        return

    sizes = [100_000] if args.quick else [1_000_000, RESNET18]
    thread_counts = [1, 2]
    dtypes = [torch.float32, torch.bfloat16]
    step_counts = [1, 3]
    print(f"machine: {machine()}; torch {torch.__version__}; kernel ISA {nowcast_cpu.isa()} "
          f"({nowcast_cpu.tile_rows()} rows per tile)")
    print(f"commit: {commit()}; load average at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("reference: float32 nowcast_ref, timed at steps=1 with float32 rows only (bfloat16 "
          "rows are converted to float32 first, so they cost the same; steps=3 costs 3x)")

    if not args.quick:
        for path in ("fused", "reference"):
            rss = peak_rss(path, RESNET18, 1)
            print(f"peak RSS, {path}, N={RESNET18:,} float32 rows, steps=1: "
                  f"{rss['maxrss_mib']:.0f} MiB by getrusage (VmHWM {rss['hwm_mib']:.0f} MiB); "
                  f"{rss['before_mib']:.0f} MiB just before the call (interpreter, torch, the "
                  f"{RESNET18 * S * 4 / 2**20:.0f} MiB of rows), so the call adds "
                  f"{rss['hwm_mib'] - rss['before_mib']:.0f} MiB (its output alone is "
                  f"{RESNET18 * 4 / 2**20:.0f} MiB)", flush=True)

    ceiling = {t: matmul_ceiling(t) for t in thread_counts}
    for t in thread_counts:
        print(f"fp32 matmul ceiling, {t} thread(s): {ceiling[t]:.1f} GFLOP/s "
              f"(torch.mm 2048x2048, best of 5)")

    head = KNOWNHead(S=S, norm="wnn", seed=0)
    params = {k: v.detach() for k, v in head.params_dict().items()}
    header = (f"{'path':9s} {'N':>10s} {'thr':>3s} {'dtype':>8s} {'steps':>5s} {'seconds':>8s} "
              f"{'Mrows/s':>8s} {'GF/s nom':>8s} {'GF/s exe':>8s} {'%ceil':>6s} {'speed-up':>8s}")
    print(header)
    print("-" * len(header))
    for n in sizes:
        rows32 = trajectories(n)
        repeats = 2 if n > 2_000_000 else 3
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with torch.no_grad():
                ref_s = best_time(lambda: nowcast_ref(rows32, params, "wnn", steps=1),
                                  1 if n > 2_000_000 else 2)
            report("reference", n, threads, torch.float32, 1, ref_s, ceiling[threads], None)
            for dtype in dtypes:
                rows = rows32.to(dtype)
                for steps in step_counts:
                    out = torch.empty(n, dtype=torch.float32)
                    seconds = best_time(lambda: nowcast(rows, head, steps=steps, backend="cpu",
                                                        out=out, threads=threads), repeats)
                    report("fused", n, threads, dtype, steps, seconds, ceiling[threads],
                           ref_s * steps)
                del rows
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def report(path, n, threads, dtype, steps, seconds, ceiling, ref_seconds) -> None:
    row_steps = n * steps
    executed = row_steps * EXECUTED_FLOP / seconds / 1e9
    nominal = row_steps * NOMINAL_FLOP / seconds / 1e9
    flop_done = executed if path == "fused" else nominal  # the reference runs the unfolded form
    speedup = f"{ref_seconds / seconds:7.1f}x" if ref_seconds else f"{'':8s}"
    print(f"{path:9s} {n:>10,d} {threads:>3d} {str(dtype).replace('torch.', ''):>8s} {steps:>5d} "
          f"{seconds:>8.3f} {n * steps / seconds / 1e6:>8.2f} {nominal:>8.1f} "
          f"{executed if path == 'fused' else float('nan'):>8.1f} "
          f"{100 * flop_done / ceiling:>5.0f}% {speedup}", flush=True)


if __name__ == "__main__":
    main()
