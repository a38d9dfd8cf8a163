"""The CPU kernel's bf16 products (precision="bf16") against its float32 products and
torch.mm's float32 and bf16 ceilings, side by side in one run, at the same thread counts.

    python bench/bench_nowcast_cpu_bf16.py               # N = 1M and an 11.2M-row step (~1 min)
    python bench/bench_nowcast_cpu_bf16.py --quick       # N = 200k, no 11.2M-row step
    python bench/bench_nowcast_cpu_bf16.py --error STORE # bf16 vs float32 accuracy (real rows)

Rows are bfloat16 weight-like trajectories (bench_nowcast_cpu.trajectories), S = 5, norm
wnn, float32 output, one step; each time is one whole ``nowcast()`` call (head packing
included), best of 3 (of 2 for 11.2M rows).  GF/s counts the 14,736 FLOP per row of the
folded form the kernels execute; %fp32 and %bf16 are that rate over torch.mm 2048 x 2048
(best of 10) in float32 and in bfloat16 at the same thread count.

``--error STORE`` reads a trajectory store (``know collect``), predicts 3 steps of every
row of every run with the shipped KNOWN (S = 5) in float32 and in bf16, and prints the
relative L2 errors against each other and against the float64 reference, and of the
predicted change (prediction - last value), which the whole prediction's norm hides; then
the same for the synthetic rows and untrained heads of the GPU's emulated table
(bench_nowcast_gpu.py --tf32-estimate).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from know_kernels import KNOWN, KNOWNHead, nowcast
from know_kernels.io.store import TrajectoryFile
from know_kernels.kernels.ops import nowcast_cpu
from know_kernels.kernels.reference import nowcast_ref
from know_kernels.kernels.reference_bf16 import nowcast_ref_bf16
from bench_nowcast_cpu import EXECUTED_FLOP, RESNET18, S, best_time, machine, trajectories
from provenance import commit


def ceilings(threads: int) -> dict:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = {}
    for name, (x, y) in (("fp32", (a, b)), ("bf16", (a.bfloat16(), b.bfloat16()))):
        torch.mm(x, y)
        out[name] = 2 * 2048 ** 3 / best_time(lambda: torch.mm(x, y), 10) / 1e9
    return out


def kernel_seconds(rows, head, precision, threads, repeats) -> float:
    out = torch.empty(rows.shape[0])
    return best_time(lambda: nowcast(rows, head, backend="cpu", out=out, threads=threads,
                                     precision=precision), repeats)


def table(quick: bool) -> None:
    kernel, why = nowcast_cpu.bf16_kernel()
    print(f"machine: {machine()}; torch {torch.__version__}; float32 kernel ISA "
          f"{nowcast_cpu.isa()}; bf16 kernel: {kernel or 'none'} ({why})")
    print(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}; commit: {commit()}; "
          f"command: python {' '.join(sys.argv)}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if kernel is None:
        sys.exit(f"no bf16 products on this CPU: {why}")
    head = KNOWNHead(S=S, norm="wnn", seed=0)
    n = 200_000 if quick else 1_000_000
    rows = trajectories(n).to(torch.bfloat16)
    header = (f"{'path':26s} {'thr':>3s} {'N':>10s} {'seconds':>8s} {'GF/s':>7s} {'%fp32':>6s} "
              f"{'%bf16':>6s} {'vs fp32 kernel':>14s}")
    print(header)
    print("-" * len(header))
    for threads in (1, 2):
        ceil = ceilings(threads)
        for name in ("fp32", "bf16"):
            print(f"{'torch.mm 2048^2 ' + name:26s} {threads:>3d} {'':>10s} {'':>8s} "
                  f"{ceil[name]:>7.1f} {100 * ceil[name] / ceil['fp32']:>5.0f}% "
                  f"{100 * ceil[name] / ceil['bf16']:>5.0f}%")
        secs = {p: kernel_seconds(rows, head, p, threads, 3) for p in ("float32", "bf16")}
        for p, label in (("float32", "kernel float32"), ("bf16", f"kernel bf16 ({kernel})")):
            rate = n * EXECUTED_FLOP / secs[p] / 1e9
            print(f"{label:26s} {threads:>3d} {n:>10,d} {secs[p]:>8.3f} {rate:>7.1f} "
                  f"{100 * rate / ceil['fp32']:>5.0f}% {100 * rate / ceil['bf16']:>5.0f}% "
                  f"{secs['float32'] / secs[p]:>13.2f}x", flush=True)
    if not quick:
        del rows
        rows = trajectories(RESNET18).to(torch.bfloat16)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            secs = {p: kernel_seconds(rows, head, p, threads, 2) for p in ("float32", "bf16")}
            print(f"{RESNET18:,}-row step (ResNet18 size, S = {S}, bf16 rows), {threads} "
                  f"thread(s): float32 {secs['float32']:.3f} s, bf16 {secs['bf16']:.3f} s "
                  f"({secs['float32'] / secs['bf16']:.2f}x)", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def errors(rows, head, norm, steps=3) -> dict:
    params = {k: v.detach().double() for k, v in head.params_dict().items()}
    kw = dict(steps=steps, all_steps=True, backend="cpu", norm=norm, out_dtype=torch.float32)
    f32 = nowcast(rows, head, **kw)
    b16 = nowcast(rows, head, precision="bf16", **kw)
    exact = nowcast_ref(rows.double(), params, norm, steps=steps, all_steps=True)
    emulated = nowcast_ref_bf16(rows, params, norm, steps=steps, all_steps=True)
    last = rows[:, -1:].double()
    return {"bf16 vs fp32": rel(b16, f32.double()), "bf16 vs f64": rel(b16, exact),
            "fp32 vs f64": rel(f32, exact), "bf16 vs its f64": rel(b16, emulated),
            "change bf16 vs f64": rel(b16.double() - last, exact - last)}


def print_errors(label, errs) -> None:
    print(f"{label:40s} " + " ".join(f"{v:>18.2e}" for v in errs.values()), flush=True)


def error_table(store: Path) -> None:
    """bf16 against float32 and float64 on real trajectories and on the GPU table's rows."""
    print(f"machine: {machine()}; date: {datetime.datetime.now().isoformat(timespec='minutes')}; "
          f"commit: {commit()}; command: python {' '.join(sys.argv)}")
    known = KNOWN.pretrained(S=S)
    columns = ("bf16 vs fp32", "bf16 vs f64", "fp32 vs f64", "bf16 vs its f64",
               "change bf16 vs f64")
    print("relative L2 error, steps = 3 (all three predictions); 'its f64': the float64 "
          "reference of the bf16 rounding (reference_bf16.py); 'change': of pred - last value")
    print(f"{'rows':40s} " + " ".join(f"{c:>18s}" for c in columns))
    files = sorted(store.glob("run_*.safetensors"))
    if not files:
        sys.exit(f"no run_*.safetensors in {store}")
    for head_name in ("conv", "fc", "bias"):
        parts = []
        for path in files:
            f = TrajectoryFile(path)
            if head_name in f.heads:
                parts.append(f.read(head_name, order="time")[:, -S:].float())
        rows = torch.cat(parts)
        head = known[head_name]
        print_errors(f"{len(files)} runs, {head_name} ({rows.shape[0]:,} rows, {head.norm})",
                     errors(rows.contiguous(), head, head.norm))
    gen = torch.Generator().manual_seed(0)
    n = 20000
    synthetic = {"randn": torch.randn(n, S, generator=gen),
                 "weight-like": (0.05 * torch.randn(n, 1, generator=gen)
                                 + 1e-3 * torch.randn(n, S, generator=gen).cumsum(1))}
    for name, rows in synthetic.items():
        for norm in ("wnn", "raw"):
            worst = {}
            for seed in (0, 1):
                for k, v in errors(rows, KNOWNHead(S, norm, seed=seed), norm).items():
                    worst[k] = max(worst.get(k, 0.0), v)
            print_errors(f"{name}, {norm}, untrained (seeds 0, 1)", worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200k, no 11.2M-row step")
    parser.add_argument("--error", type=Path, metavar="STORE",
                        help="accuracy of bf16 vs float32 on a trajectory store's rows")
    args = parser.parse_args()
    ok, why = nowcast_cpu.available(torch.device("cpu"))
    if not ok:
        sys.exit(f"the fused CPU kernel is not available: {why}")
    if args.error:
        error_table(args.error)
    else:
        table(args.quick)


if __name__ == "__main__":
    main()
