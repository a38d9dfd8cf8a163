"""What `know demo` does, spelled out step by step with the public API, the way training code
would use it, over independent pretraining replicates: your own training loop, trained to
convergence (Convergence), the same loop on really ×0.5, ×2 and ×4 the data, a
ForgettingSchedule recording the snapshots of stages that each get the same budget,
predict() for the KNOW weights, a matched-noise control per prediction, source
generalisation and a linear probe per replicate, then the replicates pooled with standard
errors clustered by replicate and the verdict, ladder check first.

    python python/demo_step_by_step.py [--known known.safetensors] [--data-dir DIR] [--replicates 3]

Downstream task: scikit-learn's digits (20 images per class per seed).  --quick shrinks every
step to about a minute.  Fashion-MNIST comes from Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist) or --data-dir.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels.research.data import load_dataset  # noqa: E402
from know_kernels.fileio import existing_output, save_safetensors  # noqa: E402
from know_kernels.research.controls import noise_candidates  # noqa: E402
from know_kernels.research.forgetting import ForgettingSchedule  # noqa: E402
from know_kernels.pipeline.predict import predict  # noqa: E402
from know_kernels.research.pooling import pool_task  # noqa: E402
from know_kernels.research.probe import LinearProbe  # noqa: E402
from know_kernels.research.report import format_pooled_table, plot_results  # noqa: E402
from know_kernels.research.source_eval import source_generalisation  # noqa: E402
from know_kernels.research.training import Convergence, top1_accuracy  # noqa: E402
from know_kernels.research.transfer import (MORE_DATA, Candidate, know_candidates,  # noqa: E402
                                            select_classes, transfer)
from know_kernels.research.verdict import verdict  # noqa: E402
from know_kernels.research.zoo import build_model  # noqa: E402

R = 0.5  # each forgetting stage keeps half of the previous subset


def train(model, dataset, steps: int, lr: float, batch_size: int, seed: int,
          warmup: int = 0, on_epoch=None) -> None:
    """An ordinary training loop (``steps`` batches, passes repeated as needed; a linear
    warm-up, then cosine annealing to 0): the package needs nothing from it but the model."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: (t + 1) / (warmup + 1) if t < warmup else
        0.5 * (1 + math.cos(math.pi * (t - warmup) / max(steps - warmup, 1))))
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
        if on_epoch is not None:
            on_epoch()
            model.train()


def pretrain(model_fn, source, indices, epochs: int, val, seed: int):
    """Θ^0's recipe, to convergence: cosine cycles until the held-out accuracy stops
    improving over the last quarter of the epochs (each cycle at half the last peak rate)."""
    torch.manual_seed(seed)
    model = model_fn()
    criterion, history, lr = Convergence(), [], 2e-3
    for cycle in range(criterion.max_cycles):
        train(model, Subset(source.train, indices.tolist()), epochs * (len(indices) // 64), lr,
              64, seed=seed + cycle, on_epoch=lambda: history.append(top1_accuracy(model, val)))
        if criterion.holds(history):
            break
        lr /= 2
    return model, history, criterion.holds(history)


def replicate(p: int, args, source, digits, known, d0_size: int, epochs: int, out: Path):
    """One pretraining replicate: its own D^0, Θ^0, forgetting, real data and predictions,
    every starting point scored on source generalisation and on digits."""
    def model_fn(classes=source.num_classes):
        return build_model("resnet", source.in_shape, classes, width=16)

    order = torch.randperm(len(source.train), generator=torch.Generator().manual_seed(100 + p))
    pool, held = order[:-1000], order[-1000:]
    d0 = pool[:d0_size]
    x, y = source.train.tensors
    val = TensorDataset(x[held], y[held])

    # Step 2: Θ^0, trained by your own loop on D^0 to convergence.
    model, history, converged = pretrain(model_fn, source, d0, epochs, val, seed=1000 * p)
    print(f"replicate {p}: Θ^0: {len(history)} epochs, converged: {converged}")

    # Step 3: the real thing: the same recipe, the same initialisation, on nested prefixes
    # of one order of the pool: ×0.5 (inside D^0), ×2 and ×4 the images.
    more = []
    for k, factor in ((-1, 0.5), (1, 2.0), (2, 4.0)):
        m, _, _ = pretrain(model_fn, source, pool[:int(factor * d0_size)], epochs, val,
                           seed=1000 * p)
        more.append(Candidate(MORE_DATA, k, factor, {n: t.clone() for n, t in
                                                     m.state_dict().items()}))

    # Step 4: progressive forgetting: fine-tune Θ^{i-1} on D^i ⊂ D^{i-1} for the same budget
    # (two passes of D^0) whatever the subset's size (warm-up, then cosine), record Θ^i.
    schedule = ForgettingSchedule(d0, r=R, stages=5, seed=p)
    batch = 32 if d0_size >= 1000 else 16
    schedule.check_batch_size(batch)
    steps = 2 * d0_size // batch
    for stage, indices in schedule:
        if stage > 0:
            train(model, Subset(source.train, indices.tolist()), steps, 2e-3, batch,
                  seed=100 * p + stage, warmup=steps // 10)
        acc = top1_accuracy(model, source.test)
        schedule.record(stage, model, test_acc=acc)
        print(f"replicate {p}: Θ^{stage}: |D^{stage}| = {len(indices):5d}, source test "
              f"accuracy {100 * acc:.1f}%")

    # Step 5: KNOW prediction.  Checkpoints go in the paper's order, Θ^0 first; the result
    # is [Θ̂^-1, Θ̂^-2, Θ̂^-3] ≈ trained on ×2, ×4, ×8 the data.  Save them for later use.
    theta = schedule.snapshots
    for k, state in enumerate(predict(theta, known, steps=3), 1):
        save_safetensors(state, out / f"replicate{p}" / f"know_x{R ** -k:g}.safetensors")
    # know_candidates does the same for every baseline too, plus Θ^0 and Θ^1 as references;
    # each prediction gets a control: Θ^0 plus noise of the same size per tensor.
    candidates = know_candidates(theta, r=R, known=known, steps=3)
    predicted = candidates[2:]
    candidates = candidates[:2] + more + predicted + noise_candidates(predicted, theta[0],
                                                                      seed=p)

    # Step 6: score.  Source generalisation: each starting point's own classifier on held-out
    # source images; digits: a linear probe of the frozen features on the same few digits
    # per seed (BatchNorm statistics re-estimated on D^0 first: the predictions carry Θ^0's).
    rows = []
    for c in candidates:
        score = source_generalisation(c.weights, model_fn, *source.test.tensors, x[d0])
        rows.append({"method": c.method, "step": c.step, "factor": c.factor,
                     "acc": [score["acc"]], "ce": [score["ce"]], "diverged": []})
    source_rows = {"task": "source", "num_classes": source.num_classes,
                   "train_images_per_seed": None, "test_images": len(source.test),
                   "seeds": [0], "protocol": "held-out source images", "rows": rows}
    result = transfer(candidates, lambda: model_fn(digits.num_classes), digits,
                      in_shape=source.in_shape, recipe=LinearProbe(shots=20),
                      seeds=[100 * p + s for s in range(args.seeds)], calibration=x[d0])
    return source_rows, result.to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", default=None, help="KNOWN weights; default KNOWN.pretrained()")
    ap.add_argument("--data-dir", default=None, help="directory of Fashion-MNIST's IDX files")
    ap.add_argument("--seeds", type=int, default=10,
                    help="paired probe seeds per replicate (>= 2)")
    ap.add_argument("--replicates", type=int, default=3,
                    help="independent pretraining replicates (>= 2)")
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
    d0_size, epochs = (300, 12) if args.quick else (2000, 20)

    # Step 0: the KNOWN (first, so a missing file fails before any training).
    known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)

    # Step 1: data.  Pretrain on Fashion-MNIST's classes 0-4; transfer to digits, resized
    # from 8x8 to the network's 28x28 (the adapter is explicit: shapes must match).
    fashion = load_dataset("fashion-mnist", args.data_dir)
    source = select_classes(fashion, range(5), name="fashion-mnist[0-4]", test_size=2000)
    digits = load_dataset("digits", digits_size=source.in_shape[-1])
    out = Path(args.out)

    # Steps 2-6 once per independent pretraining replicate.
    runs = [replicate(p, args, source, digits, known, d0_size, epochs, out)
            for p in range(args.replicates)]

    # Step 7: pool the replicates (standard errors clustered by replicate, so the luck of
    # each pretraining run is in the error bars), then the verdict: the ladder check first.
    tasks = {"source": pool_task([r[0] for r in runs]), "digits": pool_task([r[1] for r in runs])}
    judged = verdict({"tasks": tasks})
    for name, task in tasks.items():
        print(f"\n## {name}\n")
        print(format_pooled_table(task, judged["tasks"][name]["rows"]))
    print("\n" + judged["text"])
    plot_results(list(tasks.values()), out / "transfer.png")
    print(f"wrote {out}/replicate*/know_x2.safetensors, know_x4…, know_x8… and transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
