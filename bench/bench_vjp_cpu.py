"""The fused CPU VJP of one nowcast step against the forward kernel and eager autograd.

    python bench/bench_vjp_cpu.py                     # N = 1M rows, S = 5, 1 and 2 threads
    python bench/bench_vjp_cpu.py --rows 65536 --eager-rows 65536

Each line times one path on the same head and rows (best of a few calls after a warm-up):
the forward kernel (``nowcast``, one step, no grad), the VJP kernel without and with the
row gradient (``ops/vjp_cpu.run``: forward kept per tile, backward to the packed head, and
to the rows), and eager torch autograd on ``reference.step_ref`` in float32 (forward and
backward to the parameters and the rows; on ``--eager-rows`` rows, its memory being
N x 64 per intermediate).  FLOP per row (S = 5, csrc/cpu/vjp_kernel.cpp): forward 14,736
(the folded form), VJP to the head 42,656 (forward + 27,920), with rows 43,952 (+ 1,296);
eager autograd's nominal 3 x 17,664 (the spec's forward and a backward of about twice it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench_nowcast_cpu import best_time, machine, trajectories
from know_kernels import KNOWNHead, nowcast
from know_kernels.kernels.ops import nowcast_cpu, vjp_cpu
from know_kernels.kernels.packing import pack, packed_size
from know_kernels.kernels.reference import step_ref
from provenance import commit

FORWARD_FLOP = 2 * 7368
VJP_FLOP = FORWARD_FLOP + 27920
VJP_ROWS_FLOP = VJP_FLOP + 2 * 72 * 9
EAGER_FLOP = 3 * 2 * 8832


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--eager-rows", type=int, default=1 << 18)
    parser.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")],
                        default=[1, 2])
    args = parser.parse_args()
    ok, why = vjp_cpu.available(torch.device("cpu"))
    if not ok:
        sys.exit(f"the fused CPU VJP kernel is not available: {why}")
    print(f"machine: {machine()}; torch {torch.__version__}; kernel ISA {nowcast_cpu.isa()}")
    print(f"commit: {commit()}; command: python {' '.join(sys.argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    head = KNOWNHead(S=5, norm="wnn", seed=0)
    params = {k: v.detach() for k, v in head.params_dict().items()}
    packed = pack(params, 5)
    rows = trajectories(args.rows, seed=1).contiguous()
    upstream = torch.randn(args.rows, generator=torch.Generator().manual_seed(2))
    grad_packed = torch.empty(packed_size(5))
    grad_rows = torch.empty(rows.shape)
    eager_rows = rows[:args.eager_rows]

    def eager():
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        w = eager_rows.clone().requires_grad_()
        (step_ref(w, p, "wnn") * upstream[:args.eager_rows]).sum().backward()

    def forward():
        with torch.no_grad():
            nowcast(rows, head, backend="cpu")

    paths = [
        ("forward kernel", args.rows, FORWARD_FLOP, forward),
        ("vjp, head only", args.rows, VJP_FLOP,
         lambda: vjp_cpu.run(rows, packed, upstream, S=5, norm="wnn", grad_packed=grad_packed,
                             grad_rows=None)),
        ("vjp, head+rows", args.rows, VJP_ROWS_FLOP,
         lambda: vjp_cpu.run(rows, packed, upstream, S=5, norm="wnn", grad_packed=grad_packed,
                             grad_rows=grad_rows)),
        ("eager autograd", args.eager_rows, EAGER_FLOP, eager),
    ]
    header = (f"{'threads':>7s} {'path':>15s} {'N':>9s} {'seconds':>8s} {'rows/s':>12s} "
              f"{'GFLOP/s':>8s}")
    print(header)
    print("-" * len(header))
    for t in args.threads:
        torch.set_num_threads(t)
        for name, n, flop, fn in paths:
            fn()
            seconds = best_time(fn, 3)
            print(f"{t:>7d} {name:>15s} {n:>9,d} {seconds:>8.3f} {n / seconds:>12,.0f} "
                  f"{n * flop / seconds / 1e9:>8.1f}", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
