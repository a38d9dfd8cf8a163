"""One meta-training step on the CPU, fused kernel against autograd on the eager reference.

    python bench/bench_l1.py                 # N = 64K and 1M rows, 2 threads (~3 min)
    python bench/bench_l1.py --sizes 65536   # one size

A step is what meta-training does per batch: zero the gradients, l1_loss (pack the head,
forward, loss, backward) and Adam.  Both paths get the same head, rows and targets; the
time is the best of a few steps after a warm-up one: wall clock, and beside it the
process's CPU time (both threads), which other work on the cores disturbs less (though
threads spinning while they wait count in it).  FLOP per row: the reference runs the
spec's 17,664-FLOP forward and a backward of about twice that (3 x 17,664 "nominal"); the
fused kernel executes 42,656 (forward 14,736 in the folded form, backward 27,920:
csrc/cpu/vjp_kernel.cpp).  The fp32 matmul ceiling is measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench_nowcast_cpu import best_time, machine, matmul_ceiling, trajectories
from know_kernels import KNOWNHead, l1_loss
from know_kernels.research.metatrain import MetaTrainConfig
from know_kernels.kernels.ops import nowcast_cpu, vjp_cpu
from provenance import commit

NOMINAL_FLOP = 3 * 2 * 8832              # forward + backward ~ 3 forwards, spec section 7
FUSED_FLOP = 2 * (7368 + 7016 + 6944)    # what the fused kernel executes (S = 5)
LOSS_SPACE = MetaTrainConfig.loss_space  # meta-training's default


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-like rows and, as targets, the next value the recent drift points to."""
    rows = trajectories(n, seed=1)
    g = torch.Generator().manual_seed(2)
    drift = rows[:, -1] - rows[:, -2]
    return rows, rows[:, -1] + drift + 1e-4 * torch.randn(n, generator=g)


def step_seconds(backend: str, rows, target, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best process CPU seconds of one step.  The CPU time (all the
    process's threads) hardly moves when other work shares the cores; the wall time does."""
    head = KNOWNHead(S=5, norm="wnn", seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    cpu = []

    def step():
        start = time.process_time()
        opt.zero_grad(set_to_none=True)
        l1_loss(rows, target, head, backend=backend, loss_space=LOSS_SPACE).backward()
        opt.step()
        cpu.append(time.process_time() - start)

    step()
    return best_time(step, repeats), min(cpu[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                        default=[1 << 16, 1 << 20], help="rows per batch, comma separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ok, why = vjp_cpu.available(torch.device("cpu"))
    if not ok:
        sys.exit(f"the fused CPU VJP kernel (l1_loss on the cpu backend) is not available: {why}")
    print(f"machine: {machine()}; torch {torch.__version__}; kernel ISA {nowcast_cpu.isa()} "
          f"({nowcast_cpu.tile_rows()} rows per tile); {args.threads} threads")
    print(f"commit: {commit()}; command: python {' '.join(sys.argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    ceiling = matmul_ceiling(args.threads)
    print(f"fp32 matmul ceiling, {args.threads} threads: {ceiling:.1f} GFLOP/s "
          f"(torch.mm 2048x2048, best of 5)")
    torch.set_num_threads(args.threads)
    header = (f"{'N':>9s} {'path':>9s} {'seconds':>8s} {'samples/s':>10s} {'GF/s nom':>8s} "
              f"{'GF/s exe':>8s} {'%ceil':>6s} {'speed-up':>8s} {'cpu s':>7s} {'cpu x':>6s}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        rows, target = batch(n)
        repeats = 3 if n <= 1 << 17 else 2
        ref, ref_cpu = step_seconds("reference", rows, target, repeats)
        fused, fused_cpu = step_seconds("cpu", rows, target, 2 * repeats)
        for path, seconds, cpu, executed in (("reference", ref, ref_cpu, NOMINAL_FLOP),
                                             ("fused", fused, fused_cpu, FUSED_FLOP)):
            exe = n * executed / seconds / 1e9
            print(f"{n:>9,d} {path:>9s} {seconds:>8.3f} {n / seconds:>10,.0f} "
                  f"{n * NOMINAL_FLOP / seconds / 1e9:>8.1f} {exe:>8.1f} "
                  f"{100 * exe / ceiling:>5.0f}% {ref / seconds:>7.1f}x {cpu:>7.3f} "
                  f"{ref_cpu / cpu:>5.1f}x", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
