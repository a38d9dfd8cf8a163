"""The fused VJP of one nowcast step on one CUDA card: the fused backends (triton, cuda),
with and without the rows' gradient, against eager PyTorch autograd on the reference.

    python bench/bench_vjp_gpu.py      # N = 64K and 1M rows, well under a minute on an H100

One call computes, for float32 windows of S = 5 weight-like snapshots (norm "wnn") and a
random upstream gradient u, sum_i u_i d pred_i / d packed and (with rows) u_i d pred_i /
d rows_i; the eager path is ``torch.autograd.grad`` of sum u pred through
``reference.step_ref`` in float32 (with respect to the head's parameters, and the rows).
Times are CUDA events around whole calls, best of a few after warm-up calls (which compile
the Triton kernel).

Work per row (``vjp_macs``): the forward pass, the backward pass's recomputation of each
stream's hidden units (``h``, ``b``, ``c``: the kernels keep only ``z`` and ``v``), the
weight-gradient products, the data-gradient products back to each stream's bottleneck and,
with rows, to its input: about 3.3x the forward's multiply-adds, 2 FLOP each.  Bytes per
row (``vjp_bytes``): what must cross DRAM at least (rows, u, the rows' gradient); the
partial-gradient rows (P floats per group) stay in L2 on any card with more than 32 MB and
are left out.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_nowcast_gpu import print_provenance  # noqa: E402
from cuda_timing import cuda_ms  # noqa: E402
from know_kernels import KNOWNHead  # noqa: E402
from know_kernels.kernels.backends import backend_status, fused_module  # noqa: E402
from know_kernels.kernels.packing import pack, packed_size  # noqa: E402
from know_kernels.kernels.reference import BOTTLENECK, HIDDEN, OUT_HIDDEN, step_ref  # noqa: E402

S = 5
NORM = "wnn"
SIZES = (1 << 16, 1 << 20)
BACKENDS = ("triton", "cuda")


def stream_macs(n: int, row_grad: bool) -> dict[str, int]:
    """Multiply-adds per row of one stream with n inputs, by phase."""
    hb = HIDDEN * BOTTLENECK
    forward = n * BOTTLENECK + n * HIDDEN + 2 * hb + BOTTLENECK * OUT_HIDDEN + HIDDEN * OUT_HIDDEN
    return {
        "forward": forward,
        "recompute": n * HIDDEN + 2 * hb,
        "weight grads": forward,  # one product over the rows per forward product
        "data grads": HIDDEN * OUT_HIDDEN + BOTTLENECK * OUT_HIDDEN + 2 * hb
                      + (n * HIDDEN + n * BOTTLENECK if row_grad else 0),
    }


def vjp_macs(S: int, row_grad: bool) -> int:
    """Multiply-adds per row of the whole VJP (both streams and the head)."""
    head = 3 * 2 * OUT_HIDDEN  # y, wo's gradient, dL/dv
    return head + sum(sum(stream_macs(n, row_grad).values()) for n in (S, S - 1))


def forward_macs(S: int) -> int:
    return 2 * OUT_HIDDEN + sum(stream_macs(n, False)["forward"] for n in (S, S - 1))


def vjp_bytes(S: int, row_bytes: int, row_grad: bool) -> int:
    """Bytes per row that must cross DRAM: rows, u, and the rows' gradient."""
    return S * row_bytes + 4 + (4 * S if row_grad else 0)


def weight_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w0 = torch.randn(n, 1, generator=g, device="cuda") * 0.05
    drift = (torch.randn(n, 1, generator=g, device="cuda") * 1e-3
             + torch.randn(n, S - 1, generator=g, device="cuda") * 1e-3)
    rows = torch.cat([w0, w0 + drift.cumsum(1)], 1).contiguous()
    return rows, torch.randn(n, generator=g, device="cuda")


def eager(head, rows, upstream, row_grad):
    params = list(head.parameters())

    def call():
        w = rows.detach().requires_grad_(row_grad)
        total = (upstream * step_ref(w, head.params_dict(), NORM)).sum()
        torch.autograd.grad(total, params + ([w] if row_grad else []))
    return call


def fused(name, head, rows, upstream, row_grad):
    run = fused_module(name, "vjp", S).run
    packed = pack({k: v.detach() for k, v in head.params_dict().items()}, S)
    grad_packed = torch.empty(packed_size(S), device="cuda")
    grad_rows = torch.empty_like(rows) if row_grad else None

    def call():
        run(rows, packed, upstream, S=S, norm=NORM, grad_packed=grad_packed,
            grad_rows=grad_rows)
    return call


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_vjp_gpu.py needs a CUDA GPU and a CUDA build of torch "
                 "(torch.cuda.is_available() is False)")
    print_provenance()
    print(f"VJP of one step: S={S}, norm {NORM}, float32 rows; multiply-adds per row: "
          f"forward {forward_macs(S):,}, VJP {vjp_macs(S, False):,} "
          f"(+rows {vjp_macs(S, True):,})")
    usable = []
    for name in BACKENDS:
        ok, why = backend_status(name, torch.device("cuda"), op="vjp")
        print(f"backend {name}: {why}")
        if ok:
            usable.append(name)
    header = (f"{'path':8s} {'rows grad':>9s} {'N':>10s} {'ms':>9s} {'Mrows/s':>9s} "
              f"{'TFLOP/s':>8s} {'GB/s':>7s} {'x eager':>8s}")
    print(header)
    print("-" * len(header))
    head = KNOWNHead(S, NORM, seed=0).cuda()
    for n in SIZES:
        rows, upstream = weight_like(n)
        repeats = 5 if n <= SIZES[0] else 3
        for row_grad in (False, True):
            flop = 2 * vjp_macs(S, row_grad) * n
            moved = vjp_bytes(S, 4, row_grad) * n
            base = None
            for name in ("eager", *usable):
                call = (eager(head, rows, upstream, row_grad) if name == "eager"
                        else fused(name, head, rows, upstream, row_grad))
                call()
                call()
                ms = cuda_ms(call, repeats)
                base = base or ms
                print(f"{name:8s} {str(row_grad):>9s} {n:10,d} {ms:9.3f} {n / ms / 1e3:9.2f} "
                      f"{flop / ms / 1e9:8.2f} {moved / ms / 1e6:7.1f} {base / ms:7.1f}x",
                      flush=True)
        del rows, upstream
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
