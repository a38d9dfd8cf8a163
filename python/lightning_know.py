"""Forget, then predict, with PyTorch Lightning: KNOW for a small MLP on scikit-learn's digits.

    python python/lightning_know.py --out know-lightning      # under a minute on a CPU
    python python/lightning_know.py --smoke --out /tmp/k      # the whole chain, tiny

1. scikit-learn's bundled 8x8 digits (1,797 images, nothing is downloaded), a seeded split
   into 1,200 training and 597 test images.
2. Θ^0: ``DigitsMLP``, a LightningModule, fitted by ``lightning.Trainer``.
3. ``know_kernels.integrations.lightning.forget_and_predict_lightning``: S-1 forgetting
   stages, each a new Trainer fitting the module on a random fraction r of the previous
   stage's images (same batch size and shuffling), then KNOW's Θ̂^{-1} … Θ̂^{-steps}.
   --out receives ``theta0/`` … and ``know_step1/`` …, each holding ``model.ckpt``.
4. Each checkpoint loaded back with ``DigitsMLP.load_from_checkpoint`` and scored on the
   test images.

For your own module: fit it as usual, then call ``forget_and_predict_lightning(module,
out_dir, train_dataloader=…, trainer=dict(max_epochs=…), r=0.5, stages=5)``.  An existing
--out is refused unless --force.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels.fileio import existing_output  # noqa: E402
from know_kernels.integrations import recipe_parser  # noqa: E402

TRAIN_IMAGES = 1200


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:TRAIN_IMAGES], order[TRAIN_IMAGES:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def lightning_module():
    """DigitsMLP, defined once lightning is imported (after the --out check)."""
    import lightning as L

    class DigitsMLP(L.LightningModule):
        def __init__(self, hidden: int = 64, lr: float = 3e-3):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return L, DigitsMLP


@torch.no_grad()
def accuracy(model, data: TensorDataset) -> float:
    x, y = data.tensors
    return (model.eval()(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    args = recipe_parser(__doc__, "know-lightning",
                         "a few epochs per stage: checks the whole chain").parse_args(argv)
    out = Path(args.out)
    # Before the slow imports, so a refusal is immediate.
    error = existing_output(out, args.force)
    if error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        return 2
    L, DigitsMLP = lightning_module()
    from know_kernels.integrations.lightning import forget_and_predict_lightning

    # Lightning announces devices and tips at INFO on every Trainer; one per stage here.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    epochs = 5 if args.smoke else 40
    train, test = digits(args.seed)
    loader = DataLoader(train, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    trainer_args = dict(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    torch.manual_seed(args.seed)
    module = DigitsMLP()
    L.Trainer(**trainer_args).fit(module, loader)
    print(f"Θ^0: DigitsMLP trained on {len(train)} images, {epochs} epochs")
    # The same epochs per stage: each stage's cost shrinks with its subset, as in the paper.
    result = forget_and_predict_lightning(module, out, trainer=trainer_args,
                                          train_dataloader=loader, r=args.r,
                                          stages=args.stages, steps=args.steps,
                                          seed=args.seed, force=args.force)
    sizes = result.data_sizes()  # a prediction's: the data it stands for
    print("\n| weights | training images | test accuracy |\n|---|---:|---:|")
    for name, directory in result.named.items():
        model = DigitsMLP.load_from_checkpoint(directory / "model.ckpt")
        print(f"| {name}/ | {sizes[name]:.0f} | {100 * accuracy(model, test):.1f}% |")
    print(f"\nwrote {out}/: load any checkpoint with DigitsMLP.load_from_checkpoint "
          f"(done above); {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
