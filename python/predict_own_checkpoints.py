"""Predict KNOW weights from your own forgetting checkpoints, save them, load them back.

Your S checkpoints (state dicts: .pt/.pth, loaded weights-only, or .safetensors), in the
paper's order: Θ^0 (trained on all the data) first, then Θ^1 … Θ^{S-1} from ever smaller
nested subsets (see docs/collection.md for making them):

    python python/predict_own_checkpoints.py theta0.pt theta1.pt theta2.pt theta3.pt \\
        theta4.pt --out know --known known.safetensors --steps 3 --keep 'fc.*'

writes know/know_step1.safetensors … (Θ̂^{-1} ≈ trained on 1/r times the data, …), each a
complete state dict: entries no KNOWN head predicts (normalisation layers, buffers, and
whatever --keep names) are Θ^0's.  Load one with ``model.load_state_dict(
safetensors.torch.load_file(path))`` and fine-tune from it.

Without checkpoint paths it first makes a real trajectory: a small CNN trained on
scikit-learn's digits, then four forgetting stages (r = 0.5), saved as .pt files in a
temporary directory (seconds on a CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels.research.data import load_dataset  # noqa: E402
from know_kernels.fileio import save_safetensors  # noqa: E402
from know_kernels.research.forgetting import progressive_forgetting  # noqa: E402
from know_kernels.research.training import top1_accuracy  # noqa: E402
from know_kernels.pipeline.options import METHODS  # noqa: E402
from know_kernels.pipeline.predict import load_checkpoints, predict  # noqa: E402
from know_kernels.research.zoo import build_model  # noqa: E402


def make_trajectory(root: Path) -> list[Path]:
    """Θ^0 … Θ^4 of a small CNN on digits, as .pt state dicts (what your training saves)."""
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("cnn", digits.in_shape, digits.num_classes, width=4)
    schedule = progressive_forgetting(model, digits.train, r=0.5, stages=5, batch_size=32,
                                      lr=1e-3, pretrain_epochs=5, test_dataset=digits.test)
    paths = []
    for i, state in enumerate(schedule.snapshots):
        paths.append(root / f"theta{i}.pt")
        torch.save(state, paths[-1])
        print(f"Θ^{i}: {schedule.sizes[i]:4d} training images, test accuracy "
              f"{100 * schedule.test_acc[i]:.1f}%  -> {paths[-1]}")
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="Θ^0 first (none: make a demo trajectory)")
    ap.add_argument("--out", default=None, help="output directory (demo: a temporary one)")
    ap.add_argument("--known", default=None, help="KNOWN weights; default KNOWN.pretrained()")
    ap.add_argument("--method", default="known", choices=METHODS)
    ap.add_argument("--steps", type=int, default=3, help="Θ̂^-1 … Θ̂^-steps (default 3)")
    ap.add_argument("--r", type=float, default=0.5, help="your forgetting ratio (labels only)")
    ap.add_argument("--keep", action="append", default=[], metavar="GLOB",
                    help="state-dict names to copy from Θ^0 unpredicted (repeatable), "
                         "e.g. a classifier you will replace anyway")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = ap.parse_args()
    demo = not args.checkpoints
    if not demo and args.out is None:
        ap.error("--out is required with checkpoint paths")
    if args.out is not None and not args.force:
        existing = [p for k in range(1, args.steps + 1)
                    if (p := Path(args.out) / f"know_step{k}.safetensors").exists()]
        if existing:
            print(f"{ap.prog}: error: {existing[0]} exists; pass --force to overwrite it",
                  file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="know-own-") as tmp:
        if demo:
            args.checkpoints = make_trajectory(Path(tmp))
            args.out = args.out or str(Path(tmp) / "know")
        known = None
        if args.method == "known":
            known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)
        states, _ = load_checkpoints(args.checkpoints)
        predicted = predict(states, known, steps=args.steps, method=args.method, keep=args.keep)
        out = Path(args.out)
        for k, state in enumerate(predicted, 1):
            path = out / f"know_step{k}.safetensors"
            meta = {"method": args.method, "step": k, "data_factor": args.r ** -k,
                    "checkpoints": [str(c) for c in args.checkpoints]}
            save_safetensors(state, path, metadata={"know": json.dumps(meta)})
            moved = sum((state[n].double() - states[0][n].double()).norm() ** 2
                        for n in state if state[n].is_floating_point()) ** 0.5
            print(f"wrote {path}: ×{args.r ** -k:.3g} the data, ‖Θ̂ − Θ^0‖ = {moved:.4g}")
        if demo:
            digits = load_dataset("digits")
            model = build_model("cnn", digits.in_shape, digits.num_classes, width=4)
            model.load_state_dict(predicted[0])  # strict: every name and shape must match
            print(f"loaded know_step1 into the CNN: test accuracy before any fine-tuning "
                  f"{100 * top1_accuracy(model, digits.test):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
