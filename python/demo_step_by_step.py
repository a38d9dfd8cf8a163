"""What `know demo` does, spelled out step by step with the public API, the way training code
would use it: your own training loop, a ForgettingSchedule recording the snapshots, predict()
for the KNOW weights, and transfer() for the paired evaluation.

    python python/demo_step_by_step.py [--known known.safetensors] [--data-dir DIR] [--seeds 5]

Downstream task: scikit-learn's digits (10 images per class per seed).  --quick shrinks every
step to about a minute.  Fashion-MNIST comes from Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist) or --data-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels.data import load_dataset  # noqa: E402
from know_kernels.fileio import save_safetensors  # noqa: E402
from know_kernels.forgetting import ForgettingSchedule, evaluate  # noqa: E402
from know_kernels.predict import predict  # noqa: E402
from know_kernels.transfer import (FineTune, format_table, know_candidates,  # noqa: E402
                                   plot_results, select_classes, transfer)
from know_kernels.zoo import build_model  # noqa: E402

R = 0.5  # each forgetting stage keeps half of the previous subset


def train(model, dataset, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """An ordinary training loop: the package needs nothing from it but the model."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", default=None, help="KNOWN weights; default KNOWN.pretrained()")
    ap.add_argument("--data-dir", default=None, help="directory of Fashion-MNIST's IDX files")
    ap.add_argument("--seeds", type=int, default=5, help="paired fine-tuning seeds (>= 2)")
    ap.add_argument("--out", default="know-steps", help="where the plot and weights go")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="smaller everything (≈ 1 minute)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d0_size, pretrain_epochs, finetune_epochs = (1600, 2, 4) if args.quick else (10000, 3, 15)

    # Step 0: the KNOWN (first, so a missing file fails before any training).
    known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)

    # Step 1: data.  Pretrain on Fashion-MNIST's classes 0-4; transfer to digits, resized
    # from 8x8 to the network's 28x28 (the adapter is explicit: shapes must match).
    fashion = load_dataset("fashion-mnist", args.data_dir)
    source = select_classes(fashion, range(5), name="fashion-mnist[0-4]", test_size=2000)
    digits = load_dataset("digits", digits_size=source.in_shape[-1])

    # Step 2: Θ^0, trained by your own loop on D^0.
    torch.manual_seed(0)
    model = build_model("resnet", source.in_shape, source.num_classes, width=16)
    d0 = torch.randperm(len(source.train), generator=torch.Generator().manual_seed(0))[:d0_size]
    schedule = ForgettingSchedule(d0, r=R, stages=5, seed=0)
    schedule.check_batch_size(32)

    # Step 3: progressive forgetting: fine-tune Θ^{i-1} on D^i ⊂ D^{i-1}, record Θ^i.
    for stage, indices in schedule:
        epochs, lr = (pretrain_epochs, 2e-3) if stage == 0 else (1, 1e-3)
        train(model, Subset(source.train, indices.tolist()), epochs, lr, 32, seed=stage)
        acc = evaluate(model, source.test)
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

    # Step 5: transfer.  Every candidate gets a new 10-class classifier and the same
    # fine-tuning; seed s fixes the subset, head init and batch order for all of them.
    result = transfer(candidates,
                      lambda: build_model("resnet", source.in_shape, digits.num_classes, width=16),
                      digits, in_shape=source.in_shape, seeds=args.seeds,
                      recipe=FineTune(shots=10, epochs=finetune_epochs, batch_size=25),
                      progress=True)
    print(format_table(result))
    plot_results([result], out / "transfer.png")
    print(f"wrote {out}/know_x2.safetensors, know_x4…, know_x8… and transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
