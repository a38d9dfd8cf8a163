"""KNOW for a ``lightning.LightningModule`` that has finished training::

    L.Trainer(max_epochs=20).fit(module, loader)      # your run: Θ^0
    forget_and_predict_lightning(module, "know", train_dataloader=loader, r=0.5, stages=5,
                                 trainer=dict(max_epochs=5, logger=False))
    best_guess = MyModule.load_from_checkpoint("know/know_step1/model.ckpt")

Each forgetting stage fits the module with a new ``lightning.Trainer`` (from ``trainer``: a
dict of its keyword arguments, or a function of the stage number returning one), so
``configure_optimizers`` gives a fresh optimizer and schedule each time.  The data is the
``train_dataloader``'s dataset, or that of ``datamodule.train_dataloader()`` after
``prepare_data`` and ``setup("fit")``; each stage gets a DataLoader over the next nested
subset with the original's batch size, shuffling, workers and collate function (a
``batch_sampler`` cannot be carried over).  Only the training data is passed to ``fit``:
the module's own ``val_dataloader``, if any, still runs.

``out_dir`` receives ``theta0/`` … ``theta{S-1}/`` and ``know_step1/`` …, each holding
``model.ckpt`` written by the last stage's Trainer (``save_checkpoint(weights_only=True)``:
weights and hyper-parameters), which ``MyModule.load_from_checkpoint`` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from torch.utils.data import DataLoader, RandomSampler

from ..fileio import PathLike
from ..known.heads import KNOWN
from ..known.routing import Route
from ..research.forget import ForgetResult
from . import forget_and_export, require

L = require("lightning")

TrainerSpec = Union[Mapping[str, Any], Callable[[int], "L.Trainer"]]


def _loader_like(loader: DataLoader, subset) -> DataLoader:
    return DataLoader(subset, batch_size=loader.batch_size,
                      shuffle=isinstance(loader.sampler, RandomSampler),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers, generator=loader.generator)


def forget_and_predict_lightning(module: "L.LightningModule", out_dir: PathLike, *,
                                 trainer: TrainerSpec, r: float,
                                 train_dataloader: Optional[DataLoader] = None,
                                 datamodule: Optional["L.LightningDataModule"] = None,
                                 stages: int = 5, seed: int = 0, steps: int = 1,
                                 known: Union[None, KNOWN, PathLike] = None,
                                 route: Route = None, force: bool = False) -> ForgetResult:
    """Forget on nested subsets of the training data, predict, and write every state as
    ``<name>/model.ckpt`` in ``out_dir`` (existing ones refused unless ``force``).  Pass
    exactly one of ``train_dataloader`` and ``datamodule``.  ``r``, ``stages`` (= the KNOWN
    heads' S: 3, 4 or 5 for the shipped KNOWN), ``seed``, ``steps``, ``known``, ``route``:
    as :func:`~know_kernels.research.forget.forget_and_predict`.  Returns its result with
    the directories as ``snapshots`` and ``predictions``; ``module`` ends as Θ^{S-1}."""
    if not isinstance(module, L.LightningModule):
        raise TypeError(f"module must be a lightning.LightningModule, got "
                        f"{type(module).__name__}")
    if isinstance(trainer, Mapping):
        kwargs = dict(trainer)

        def make_trainer(stage: int) -> L.Trainer:
            return L.Trainer(**kwargs)
    elif callable(trainer):
        make_trainer = trainer
    else:
        raise TypeError(f"trainer must be a dict of lightning.Trainer arguments or a function "
                        f"(stage) -> lightning.Trainer, got {type(trainer).__name__}")
    if (train_dataloader is None) == (datamodule is None):
        raise ValueError("pass exactly one of train_dataloader= and datamodule=")
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_dataloader = datamodule.train_dataloader()
    if not isinstance(train_dataloader, DataLoader):
        raise TypeError(f"the training data must come as a torch DataLoader, got "
                        f"{type(train_dataloader).__name__}")
    if train_dataloader.batch_size is None:
        raise ValueError("the training DataLoader uses a batch_sampler, which cannot be "
                         "carried over to the subsets; give it a batch_size instead")
    fitted: list[L.Trainer] = []

    def train_stage(model, subset) -> None:
        stage_trainer = make_trainer(subset.stage)
        if not isinstance(stage_trainer, L.Trainer):
            raise TypeError(f"trainer({subset.stage}) returned "
                            f"{type(stage_trainer).__name__}, not a lightning.Trainer")
        stage_trainer.fit(model, train_dataloaders=_loader_like(train_dataloader, subset))
        fitted[:] = [stage_trainer]

    def write(target: Path) -> None:
        # The Trainer that fitted the module writes the checkpoint format its loader reads.
        fitted[0].save_checkpoint(target / "model.ckpt", weights_only=True)

    return forget_and_export(module, train_dataloader.dataset, train_stage, out_dir, write,
                             r=r, stages=stages, seed=seed, steps=steps, known=known,
                             route=route, force=force)
