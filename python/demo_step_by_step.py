"""What `know demo` does, spelled out step by step with the public API, the way training code
would use it: your own training loop, trained to convergence (Convergence), a
ForgettingSchedule recording the snapshots of stages that each get the same budget,
predict() for the KNOW weights, and transfer() with a linear probe for the paired
evaluation.

    python python/demo_step_by_step.py [--known known.safetensors] [--data-dir DIR] [--seeds 20]

Downstream task: scikit-learn's digits (20 images per class per seed).  --quick shrinks every
step to about a minute.  Fashion-MNIST comes from Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist) or --data-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels.research.data import load_dataset  # noqa: E402
from know_kernels.fileio import existing_output, save_safetensors  # noqa: E402
from know_kernels.research.forgetting import ForgettingSchedule  # noqa: E402
from know_kernels.pipeline.predict import predict  # noqa: E402
from know_kernels.research.probe import LinearProbe  # noqa: E402
from know_kernels.research.report import format_table, plot_results  # noqa: E402
from know_kernels.research.training import Convergence, top1_accuracy  # noqa: E402
from know_kernels.research.transfer import know_candidates, select_classes, transfer  # noqa: E402
from know_kernels.research.zoo import build_model  # noqa: E402

R = 0.5  # each forgetting stage keeps half of the previous subset


def train(model, dataset, steps: int, lr: float, batch_size: int, seed: int, cosine: bool,
          on_epoch=None) -> None:
    """An ordinary training loop (``steps`` batches, passes repeated as needed): the package
    needs nothing from it but the model."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            done += 1
            if done == steps:
                break
        if on_epoch is not None:
            on_epoch()
            model.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", default=None, help="KNOWN weights; default KNOWN.pretrained()")
    ap.add_argument("--data-dir", default=None, help="directory of Fashion-MNIST's IDX files")
    ap.add_argument("--seeds", type=int, default=20, help="paired probe seeds (>= 2)")
    ap.add_argument("--out", default="know-steps", help="where the plot and weights go")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="smaller everything (≈ 1 minute)")
    ap.add_argument("--force", action="store_true", help="write into an existing --out")
    args = ap.parse_args()
    error = existing_output(args.out, args.force)
    if error:
        print(f"{ap.prog}: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    d0_size, epochs = (640, 12) if args.quick else (2000, 20)

    # Step 0: the KNOWN (first, so a missing file fails before any training).
    known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)

    # Step 1: data.  Pretrain on Fashion-MNIST's classes 0-4; transfer to digits, resized
    # from 8x8 to the network's 28x28 (the adapter is explicit: shapes must match).
    fashion = load_dataset("fashion-mnist", args.data_dir)
    source = select_classes(fashion, range(5), name="fashion-mnist[0-4]", test_size=2000)
    digits = load_dataset("digits", digits_size=source.in_shape[-1])
    order = torch.randperm(len(source.train), generator=torch.Generator().manual_seed(0))
    d0, held = order[:d0_size], order[-1000:]
    x, y = source.train.tensors
    val = TensorDataset(x[held], y[held])

    # Step 2: Θ^0, trained by your own loop on D^0 to convergence: cosine cycles until the
    # held-out accuracy stops improving over the last quarter of the epochs.
    torch.manual_seed(0)
    model = build_model("resnet", source.in_shape, source.num_classes, width=16)
    schedule = ForgettingSchedule(d0, r=R, stages=5, seed=0)
    schedule.check_batch_size(32)
    criterion, history, lr = Convergence(), [], 2e-3
    for cycle in range(criterion.max_cycles):
        train(model, Subset(source.train, d0.tolist()), epochs * (d0_size // 64), lr, 64,
              seed=cycle, cosine=True, on_epoch=lambda: history.append(top1_accuracy(model, val)))
        if criterion.holds(history):
            break
        lr /= 2
    print(f"Θ^0: {len(history)} epochs, converged: {criterion.holds(history)}")

    # Step 3: progressive forgetting: fine-tune Θ^{i-1} on D^i ⊂ D^{i-1} for the same budget
    # (one pass of D^0) whatever the subset's size, record Θ^i.
    for stage, indices in schedule:
        if stage > 0:
            train(model, Subset(source.train, indices.tolist()), d0_size // 32, 1e-3, 32,
                  seed=stage, cosine=False)
        acc = top1_accuracy(model, source.test)
        schedule.record(stage, model, test_acc=acc)
        print(f"Θ^{stage}: |D^{stage}| = {len(indices):5d}, source test accuracy {100 * acc:.1f}%")

    # Step 4: KNOW prediction.  Checkpoints go in the paper's order, Θ^0 first; the result
    # is [Θ̂^-1, Θ̂^-2, Θ̂^-3] ≈ trained on ×2, ×4, ×8 the data.  Save them for later use.
    theta = schedule.snapshots
    know = predict(theta, known, steps=3)
    out = Path(args.out)
    for k, state in enumerate(know, 1):
        save_safetensors(state, out / f"know_x{R ** -k:g}.safetensors")
    # know_candidates does the same for every baseline too, plus Θ^0 and Θ^1 as references.
    candidates = know_candidates(theta, r=R, known=known, steps=3)

    # Step 5: transfer.  Every candidate's frozen features get a linear probe fitted on the
    # same few digits per seed (BatchNorm statistics re-estimated on D^0 first, since the
    # predictions carry Θ^0's).
    result = transfer(candidates,
                      lambda: build_model("resnet", source.in_shape, digits.num_classes, width=16),
                      digits, in_shape=source.in_shape, seeds=args.seeds,
                      recipe=LinearProbe(shots=20), calibration=x[d0], progress=True)
    print(format_table(result))
    plot_results([result], out / "transfer.png")
    print(f"wrote {out}/know_x2.safetensors, know_x4…, know_x8… and transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
