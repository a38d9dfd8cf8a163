"""The paper's ResNet18 protocol: CIFAR-100 → CIFAR-10 transfer from KNOW-predicted weights.

Needs CIFAR-100 and CIFAR-10 in their "python version" archives, extracted into one directory
(``DIR/cifar-100-python/train`` and ``DIR/cifar-10-batches-py/data_batch_1`` …), and in
practice a GPU:

    python python/cifar_resnet18_transfer.py --data-dir DIR --known known.safetensors

1. Θ^0: ResNet18 trained on CIFAR-100's training images less 5,000 held out (D^0 = 45,000),
   SGD, cosine cycles until the held-out accuracy stops improving (the convergence
   criterion of know_kernels.research.training.Convergence, recorded in results.json).
2. Progressive forgetting, r = 0.5, S = 5: Θ^1 … Θ^4 fine-tuned on 22,500 … 2,812 images,
   each stage for the same budget (--stage-budget × |D^0| samples), so the small subsets
   are revisited and over-fitted: the model forgets.
3. KNOW ×2, ×4, ×8 with KNOWN and the baselines (TaskVector, LinearFit, LogFit, ExpFit).
4. Every starting point (Θ^0 = naive transfer, Θ^1, the predictions) gets a 10-class
   classifier and is fine-tuned on CIFAR-10 with the same recipe and the same paired seeds;
   the table gives the accuracy and the paired difference to naive transfer.

The network is know_kernels.research.zoo's ResNet with ResNet18's layout (2, 2, 2, 2 basic blocks of
64 … 512 channels, 11.2M parameters, no torchvision); its stem is one 3x3 stride-2
convolution, so images are processed at 16x16 from the first stage on: 4x cheaper than the
usual stride-1 CIFAR stem, and a little less accurate.  Training batches get random 4-pixel
crops and horizontal flips on the device.  The snapshots Θ^0 … Θ^4 are saved in --out as
theta{i}.safetensors (inputs for `know predict`), with results.json/.md/.png.

Cost at the defaults: about 50 (or up to 150, if the criterion asks for more cycles) + 4 × 2
epochs of CIFAR for steps 1-2, then 17 starting points ×
--seeds fine-tunings of --finetune-epochs epochs each (17 × 5 × 10 = 850 CIFAR-10 epochs);
narrow it with --methods, --seeds, --shots or --finetune-epochs.  --smoke runs every step on
a few hundred images to check an installation.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels.research.data import DataSplit, load_dataset  # noqa: E402
from know_kernels.fileio import atomic_path, existing_output, save_safetensors, write_json  # noqa: E402
from know_kernels.research.forgetting import progressive_forgetting  # noqa: E402
from know_kernels.research.report import format_table, plot_results  # noqa: E402
from know_kernels.research.transfer import (PAPER_ORDER, FineTune, check_methods, check_seeds,  # noqa: E402
                                            know_candidates, select_classes, transfer)
from know_kernels.research.zoo import count_parameters, resnet  # noqa: E402

RESNET18_BLOCKS = (2, 2, 2, 2)


def resnet18(num_classes: int) -> torch.nn.Module:
    return resnet((3, 32, 32), num_classes, 64, blocks=RESNET18_BLOCKS)


def augment(module: torch.nn.Module, inputs):
    """Forward pre-hook: random crops of the 4-pixel zero-padded batch and horizontal flips,
    in training mode only (a hook leaves the state dict's names alone)."""
    if not module.training:
        return None
    (x,) = inputs
    n, c, h, w = x.shape
    dev = x.device
    x = torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.5, x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n, 1), device=dev)
    rows = (dy + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx + torch.arange(w, device=dev))[:, None, None, :]
    return (padded[torch.arange(n, device=dev)[:, None, None, None],
                   torch.arange(c, device=dev)[None, :, None, None], rows, cols],)


def build(num_classes: int, device: str) -> torch.nn.Module:
    model = resnet18(num_classes).to(device)
    model.register_forward_pre_hook(augment)
    return model


def on_device(split: DataSplit, device: str, train_size=None, test_size=None) -> DataSplit:
    """The training tensors moved to ``device`` once (the training loops index them there;
    evaluation compares on the CPU, so the test split stays there), optionally cut to a
    seeded subset (--smoke)."""
    if train_size or test_size:
        split = select_classes(split, range(split.num_classes), name=split.name,
                               train_size=train_size, test_size=test_size)
    return DataSplit(split.name, TensorDataset(*(t.to(device) for t in split.train.tensors)),
                     split.test, split.num_classes)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for the protocol.")
    ap.add_argument("--data-dir", required=True,
                    help="directory holding cifar-100-python/ and cifar-10-batches-py/")
    ap.add_argument("--known", default=None,
                    help="KNOWN weights (.safetensors); default: KNOWN.pretrained()")
    ap.add_argument("--out", default="cifar-know", help="output directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=5, help="paired fine-tuning seeds (>= 2)")
    ap.add_argument("--methods", default=",".join(PAPER_ORDER))
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--pretrain-epochs", type=int, default=50)
    ap.add_argument("--pretrain-lr", type=float, default=0.1)
    ap.add_argument("--val-size", type=int, default=5000,
                    help="CIFAR-100 training images held out for the convergence check")
    ap.add_argument("--stage-budget", type=float, default=2.0,
                    help="samples per forgetting stage, in multiples of |D^0|")
    ap.add_argument("--forget-lr", type=float, default=0.01)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shots", type=int, default=None,
                    help="CIFAR-10 training images per class per seed (default: all 5,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write into an existing --out")
    ap.add_argument("--smoke", action="store_true",
                    help="a few hundred images and one epoch per step: checks the pipeline")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    error = existing_output(args.out, args.force)
    if error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        return 2
    methods = check_methods(args.methods)
    check_seeds(args.seeds)
    recipe = FineTune(shots=args.shots, epochs=args.finetune_epochs, batch_size=args.batch_size,
                      lr=args.finetune_lr, optimizer="sgd", weight_decay=5e-4)
    sizes = dict(train_size=1000, test_size=500) if args.smoke else {}
    if args.smoke:
        args.pretrain_epochs, args.stage_budget, args.val_size = 4, 0.2, 200
        args.batch_size = 32  # D^4 holds 50 of the 800 images
        recipe = FineTune(shots=20, epochs=1, batch_size=50, lr=args.finetune_lr,
                          optimizer="sgd")
    # The KNOWN and both datasets first: a missing file stops the run before any training.
    try:
        known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)
        c100 = on_device(load_dataset("cifar100", args.data_dir), args.device, **sizes)
        c10 = on_device(load_dataset("cifar10", args.data_dir), args.device, **sizes)
    except FileNotFoundError as exc:
        sys.exit(f"{Path(__file__).name}: {exc}")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build(c100.num_classes, args.device)
    print(f"ResNet18 ({count_parameters(model):,} parameters) on {c100.name} "
          f"({len(c100.train):,} images), then forgetting r={args.r}, S={args.stages}")
    order = torch.randperm(len(c100.train), generator=torch.Generator().manual_seed(args.seed))
    held, d0 = order[:args.val_size], order[args.val_size:].sort().values
    x, y = c100.train.tensors
    schedule = progressive_forgetting(
        model, c100.train, indices=d0, r=args.r, stages=args.stages,
        stage_samples=round(args.stage_budget * len(d0)), batch_size=args.batch_size,
        lr=args.forget_lr, optimizer="sgd", weight_decay=5e-4, seed=args.seed,
        pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr,
        val_dataset=TensorDataset(x[held], y[held]), test_dataset=c100.test, progress=True)
    pre = schedule.info["pretrain"]
    print(f"Θ^0: {pre['epochs']} epochs, last-quarter gain {pre['gain_last_quarter']:+.2f} "
          f"points, converged: {pre['converged']}")
    print("CIFAR-100 test accuracy per stage: "
          + " ".join(f"{100 * a:.2f}" for a in schedule.test_acc))
    for i, state in enumerate(schedule.snapshots):
        save_safetensors(state, out / f"theta{i}.safetensors")

    # On the device, so that KNOWN and the baselines run there too.
    snapshots = [{k: v.to(args.device) for k, v in s.items()} for s in schedule.snapshots]
    candidates = know_candidates(snapshots, r=args.r, methods=methods, known=known)
    result = transfer(candidates, lambda: build(c10.num_classes, args.device), c10,
                      in_shape=c100.in_shape, seeds=args.seeds, recipe=recipe,
                      device=args.device, progress=True)
    table = format_table(result)
    print(table)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(f"# ResNet18: CIFAR-100 → CIFAR-10\n\n{table}\n", encoding="utf-8")
    write_json({"protocol": "resnet18 cifar100 -> cifar10", "args": vars(args),
                 "source_test_acc": [100 * a for a in schedule.test_acc],
                 "pretrain": pre,
                 "seconds": time.perf_counter() - started, "result": result.to_dict()},
                out / "results.json")
    plot_results([result], out / "results.png", title="ResNet18: CIFAR-100 → CIFAR-10")
    print(f"wrote {out}/results.json, results.md, results.png and "
          f"theta0..{args.stages - 1}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
