"""Check every usable backend against the float64 reference on fresh random data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .heads import KNOWNHead
from ..kernels.nowcast import BACKENDS, backend_status, nowcast
from ..kernels.reference import nowcast_ref

# fp32 kernels must match the float64 reference to this relative L2 error.
FP32_BOUND = 1e-5


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
    return checks


def format_table(checks: list[Check]) -> str:
    lines = [f"{'backend':<10} {'device':<6} {'dtype':<9} {'norm':<5} {'steps':>5} "
             f"{'rel. error':>11}  result"]
    for c in checks:
        if c.rel_err is None:
            lines.append(f"{c.backend:<10} {c.device:<6} {'':<9} {'':<5} {'':>5} {'':>11}  {c.note}")
        else:
            lines.append(f"{c.backend:<10} {c.device:<6} {c.dtype:<9} {c.norm:<5} {c.steps:>5} "
                         f"{c.rel_err:>11.2e}  {'ok' if c.ok else f'FAIL (bound {FP32_BOUND:g})'}")
    return "\n".join(lines)
