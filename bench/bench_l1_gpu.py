"""L1 meta-training step on one CUDA card: the fused backends (triton, cuda) against eager
PyTorch autograd on the reference, side by side.

    python bench/bench_l1_gpu.py      # N = 64K and 1M rows, well under a minute on an H100

One optimizer step, as meta-training takes it, on a batch of N windows:

* fused: pack the head (``packing.pack``, differentiable), the backend's fused forward,
  L1 and backward kernel on the packed head, the packed gradient carried back to the
  head's parameters through ``pack`` by autograd, then Adam;
* eager: the mean L1 by ``l1.l1_reference`` (autograd on the reference) in float32,
  ``backward()``, Adam.

Rows are float32 windows of S = 5 weight-like snapshots with the next snapshot as target,
norm "wnn", loss in the meta-training default's space, Adam with lr 1e-3.  Times
are CUDA events around whole steps, best of a few after warm-up steps (which also autotune
the Triton kernel).  ``kernel ms`` is the backend's ``run`` alone.  Target: at least 20x the
eager step's samples/s.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_nowcast_gpu import print_provenance  # noqa: E402
from cuda_timing import cuda_ms  # noqa: E402
from know_kernels import KNOWNHead  # noqa: E402
from know_kernels.research.metatrain import MetaTrainConfig  # noqa: E402
from know_kernels.kernels.packing import pack, packed_size  # noqa: E402
from know_kernels.kernels.l1 import l1_reference  # noqa: E402

S = 5
NORM = "wnn"
LOSS_SPACE = MetaTrainConfig.loss_space  # meta-training's default
SIZES = (1 << 16, 1 << 20)
BACKENDS = ("triton", "cuda")
TARGET_SPEEDUP = 20.0


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n windows of weight-like trajectories on the GPU, and the snapshot after each."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w0 = torch.randn(n, 1, generator=g, device="cuda") * 0.05
    drift = (torch.randn(n, 1, generator=g, device="cuda") * 1e-3
             + torch.randn(n, S, generator=g, device="cuda") * 1e-3)
    full = torch.cat([w0, w0 + drift.cumsum(1)], 1)
    return full[:, :S].contiguous(), full[:, S].contiguous()


def eager_step(head, opt, rows, target):
    def step():
        opt.zero_grad(set_to_none=False)
        l1_reference(rows, target, head, norm=NORM, loss_space=LOSS_SPACE).backward()
        opt.step()
    return step


def fused_step(run, head, opt, rows, target):
    grad = torch.empty(packed_size(S), device=rows.device)

    def kernel(packed):
        return run(rows, target, packed, S=S, norm=NORM, loss_space=LOSS_SPACE, grad=grad)

    def step():
        opt.zero_grad(set_to_none=False)
        packed = pack(head.params_dict(), S)
        kernel(packed.detach())
        packed.backward(grad / rows.shape[0])  # the kernel sums; meta-training takes the mean
        opt.step()

    def kernel_only():
        kernel(pack({k: v.detach() for k, v in head.params_dict().items()}, S))
    return step, kernel_only


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_l1_gpu.py needs a CUDA GPU and a CUDA build of torch "
                 "(torch.cuda.is_available() is False)")
    print_provenance()
    print(f"step: S={S}, norm {NORM}, loss {LOSS_SPACE}, float32 rows, Adam (lr 1e-3)")
    modules = {}
    for name in BACKENDS:
        module = importlib.import_module(f"know_kernels.kernels.ops.l1_{name}")
        ok, why = module.available(torch.device("cuda"))
        print(f"backend {name}: {why}")
        if ok:
            modules[name] = module
    header = (f"{'path':8s} {'N':>10s} {'ms/step':>9s} {'kernel ms':>9s} "
              f"{'Msamples/s':>10s} {'x eager':>8s}")
    print(header)
    print("-" * len(header))
    speedups = {}
    for n in SIZES:
        rows, target = batch(n)
        repeats = 5 if n <= SIZES[0] else 3
        head = KNOWNHead(S, NORM, seed=0).cuda()
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        step = eager_step(head, opt, rows, target)
        step()
        eager = cuda_ms(step, repeats)
        print(f"{'eager':8s} {n:10,d} {eager:9.3f} {'':>9s} {n / eager / 1e3:10.2f} "
              f"{1.0:7.1f}x", flush=True)
        for name, module in modules.items():
            head = KNOWNHead(S, NORM, seed=0).cuda()
            opt = torch.optim.Adam(head.parameters(), lr=1e-3)
            step, kernel_only = fused_step(module.run, head, opt, rows, target)
            step()  # warm-up; autotunes the Triton kernel for this size
            step()
            ms = cuda_ms(step, repeats)
            kernel = cuda_ms(kernel_only, repeats)
            speedups[(name, n)] = eager / ms
            print(f"{name:8s} {n:10,d} {ms:9.3f} {kernel:9.3f} {n / ms / 1e3:10.2f} "
                  f"{eager / ms:7.1f}x", flush=True)
        del rows, target
        torch.cuda.empty_cache()
    print()
    for (name, n), speedup in speedups.items():
        verdict = ">=" if speedup >= TARGET_SPEEDUP else "<"
        print(f"target, {name} at N={n:,}: {speedup:.1f}x eager {verdict} "
              f"{TARGET_SPEEDUP:.0f}x")


if __name__ == "__main__":
    main()
