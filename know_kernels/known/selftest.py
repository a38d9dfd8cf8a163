"""Check every usable backend against the float64 reference on fresh random data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .heads import KNOWNHead
from ..kernels.nowcast import BACKENDS, backend_status, nowcast
from ..kernels.ops import nowcast_cpu
from ..kernels.reference import nowcast_ref
from ..kernels.reference_bf16 import nowcast_ref_bf16

# fp32 kernels must match the float64 reference to this relative L2 error.
FP32_BOUND = 1e-5
# The CPU's bf16 products, against the float64 reference of the same rounding
# (reference_bf16.py): measured up to 1.1e-5, bound and measurement in
# tests/kernels/test_nowcast_cpu_bf16.py.
BF16_BOUND = 1e-4


@dataclass
class Check:
    backend: str
    device: str
    dtype: str
    norm: str
    steps: int
    rel_err: Optional[float]
    ok: bool
    note: str = ""
    precision: str = "float32"
    bound: float = FP32_BOUND


def drifting_rows(n: int, S: int, generator: torch.Generator) -> torch.Tensor:
    """Realistic trajectories: small weights that drift a little from stage to stage."""
    start = torch.randn(n, 1, generator=generator, dtype=torch.float64) * 0.05
    drift = torch.randn(n, S, generator=generator, dtype=torch.float64) * 1e-3
    return start + drift.cumsum(dim=1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def run_selftest(n: int = 1009, seed: Optional[int] = None, devices=None) -> list[Check]:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed() % (2 ** 63))
    head = KNOWNHead(5, "wnn", seed=int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    params64 = {k: v.detach().double() for k, v in head.params_dict().items()}
    rows64 = drifting_rows(n, head.S, gen)
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    checks = []
    for device in devices:
        for name in BACKENDS:
            ok, why = backend_status(name, device)
            if not ok:
                checks.append(Check(name, device, "-", "-", 0, None, True, f"skipped: {why}"))
                continue
            dtypes = (torch.float32,) if name == "reference" else (torch.float32, torch.bfloat16)
            for dtype in dtypes:
                rows = rows64.to(dtype)
                for norm in ("wnn", "raw"):
                    for steps in (1, 3):
                        ref = nowcast_ref(rows.double(), params64, norm, steps=steps,
                                          all_steps=True)
                        out = torch.full((n, steps), float("nan"), device=device)
                        nowcast(rows.to(device), head.to(device), steps=steps, norm=norm,
                                backend=name, all_steps=True, out=out)
                        err = relative_error(out.cpu(), ref)
                        checks.append(Check(name, device, str(dtype).replace("torch.", ""),
                                            norm, steps, err, err <= FP32_BOUND))
            head.to("cpu")
    if "cpu" in devices and backend_status("cpu", "cpu")[0]:
        checks += _cpu_bf16_checks(rows64, head, params64)
    return checks


def _cpu_bf16_checks(rows64, head, params64) -> list[Check]:
    """precision="bf16" on the CPU backend against the float64 reference of the same
    rounding, where this processor has a bf16 kernel."""
    kernel, why = nowcast_cpu.bf16_kernel()
    if kernel is None:
        return [Check("cpu", "cpu", "-", "-", 0, None, True, f"bf16 skipped: {why}", "bf16")]
    checks = []
    n = rows64.shape[0]
    for dtype in (torch.float32, torch.bfloat16):
        rows = rows64.to(dtype)
        for norm in ("wnn", "raw"):
            for steps in (1, 3):
                ref = nowcast_ref_bf16(rows, params64, norm, steps=steps, all_steps=True)
                out = torch.full((n, steps), float("nan"))
                nowcast(rows, head, steps=steps, norm=norm, backend="cpu", all_steps=True,
                        out=out, precision="bf16")
                err = relative_error(out, ref)
                checks.append(Check("cpu", "cpu", str(dtype).replace("torch.", ""), norm, steps,
                                    err, err <= BF16_BOUND, precision="bf16",
                                    bound=BF16_BOUND))
    return checks


def format_table(checks: list[Check]) -> str:
    lines = [f"{'backend':<10} {'device':<6} {'precision':<9} {'dtype':<9} {'norm':<5} "
             f"{'steps':>5} {'rel. error':>11}  result"]
    for c in checks:
        head = f"{c.backend:<10} {c.device:<6} {c.precision:<9}"
        if c.rel_err is None:
            lines.append(f"{head} {'':<9} {'':<5} {'':>5} {'':>11}  {c.note}")
        else:
            lines.append(f"{head} {c.dtype:<9} {c.norm:<5} {c.steps:>5} "
                         f"{c.rel_err:>11.2e}  {'ok' if c.ok else f'FAIL (bound {c.bound:g})'}")
    return "\n".join(lines)
