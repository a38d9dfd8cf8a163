"""``know selftest``: every usable backend against the float64 reference."""
from __future__ import annotations

from ..known.selftest import BF16_BOUND, FP32_BOUND, format_table, run_selftest


def register(sub) -> None:
    p = sub.add_parser("selftest", help="check every usable backend against the reference")
    p.add_argument("--rows", type=int, default=1009, help="rows per check (default 1009)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: fresh each run)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.rows < 1:
        raise ValueError(f"--rows must be positive, got {args.rows}")
    checks = run_selftest(args.rows, args.seed)
    print(format_table(checks))
    failed = [c for c in checks if not c.ok]
    ran = [c for c in checks if c.rel_err is not None]
    print(f"{len(ran) - len(failed)} passed, {len(failed)} failed "
          f"(relative L2 error vs float64 reference, bound {FP32_BOUND:g}; precision bf16 "
          f"vs the float64 reference of its rounding, bound {BF16_BOUND:g})")
    return 1 if failed else 0
