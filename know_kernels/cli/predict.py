"""``know predict CKPT0 CKPT1 … --steps K --out DIR``: one .safetensors per predicted step."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..fileio import load_state_dict, save_safetensors
from ..heads import KNOWN
from ..nowcast import BACKENDS
from ..baselines import DEFAULT_LAMBDA
from ..predict import METHODS, NONFINITE, count_rows, predict


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict KNOW weights from forgetting checkpoints",
                       description="Checkpoints in the paper's order: Θ^0 (full data) first, "
                                   "then Θ^1 … Θ^{S-1}. Writes DIR/know_step{k}.safetensors "
                                   "for k = 1 … steps (×1/r, ×1/r², …).")
    p.add_argument("checkpoints", nargs="+", help=".pt/.pth (weights-only) or .safetensors")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=1, help="prediction steps (default 1)")
    p.add_argument("--method", default="known", choices=METHODS,
                   help="KNOWN (default) or a baseline extrapolation")
    p.add_argument("--known", default=None,
                   help="KNOWN weights (.safetensors, see `KNOWN.save`); needed for --method known")
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="TaskVector's λ (default 0.2)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--nonfinite", default="error", choices=NONFINITE,
                   help="rows with NaN/Inf: refuse (default) or keep them at Θ^0")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def output_paths(out_dir: Path, steps: int) -> list[Path]:
    return [out_dir / f"know_step{k}.safetensors" for k in range(1, steps + 1)]


def run(args) -> int:
    out_dir = Path(args.out)
    targets = output_paths(out_dir, args.steps)
    if args.method == "known" and args.known is None:
        raise ValueError("--method known needs --known PATH (KNOWN weights)")
    inputs = {Path(c).resolve() for c in args.checkpoints + ([args.known] if args.known else [])}
    for t in targets:
        if t.resolve() in inputs:
            raise ValueError(f"output {t} would overwrite an input; choose another --out")
        if t.exists() and not args.force:
            raise FileExistsError(f"{t} exists; pass --force to overwrite it")
    known = KNOWN.load(args.known) if args.method == "known" else None
    first = load_state_dict(args.checkpoints[0])
    total = sum(count_rows(first).values())
    with tqdm(total=total, unit="row", unit_scale=True, disable=args.quiet,
              desc="KNOW predict") as bar:
        states = predict([first] + list(args.checkpoints[1:]), known, steps=args.steps,
                         method=args.method, lam=args.lam, backend=args.backend,
                         nonfinite=args.nonfinite, threads=args.threads,
                         progress=bar.update)
    for k, (state, target) in enumerate(zip(states, targets), start=1):
        meta = {"know_step": k, "method": args.method,
                "checkpoints": [str(c) for c in args.checkpoints]}
        if known is not None:
            meta.update(known=str(args.known), known_provenance=known.provenance)
        save_safetensors(state, target, metadata={"know": json.dumps(meta)})
        print(f"wrote {target}")
    return 0
