"""KNOW inside training frameworks (the ``integrations`` extra:
``pip install 'know-kernels[integrations]'``).

* :mod:`.hf`: ``forget_and_predict_hf(trainer, out_dir, r=…)`` for a ``transformers.Trainer``;
* :mod:`.lightning`: ``forget_and_predict_lightning(module, out_dir, trainer=…, r=…)`` for a
  ``lightning.LightningModule``.

Both are :func:`know_kernels.research.forget.forget_and_predict` with the framework's own
training as ``train_fn``; snapshots go to files (so memory never holds S copies of the
model) and every Θ^i and Θ̂^{-k} comes out as a directory ``theta{i}/`` or ``know_step{k}/``
that the framework's own loader reads.  This package imports neither framework; only the
adapter modules do.  :func:`recipe_parser` holds the command-line options
the two recipes in python/ share.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import uuid
from pathlib import Path
from types import ModuleType
from typing import Callable

from torch import nn

from ..fileio import PathLike, load_state_dict, refuse_existing
from ..pipeline.options import Options
from ..research.forget import (ForgetResult, TrainFn, forget_and_predict,
                               prediction_names, snapshot_names)
from ..research.forgetting import check_stages

EXTRA = "integrations"


def require(package: str) -> ModuleType:
    """``package``, imported, or an ImportError that names the extra which installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{package} is not installed; know_kernels.integrations needs the "
                          f"'{EXTRA}' extra: pip install 'know-kernels[{EXTRA}]'") from exc


def forget_and_export(model: nn.Module, dataset, train_fn: TrainFn, out_dir: PathLike,
                      write: Callable[[Path], None], *, stages: int, steps: int,
                      force: bool, **settings) -> ForgetResult:
    """:func:`forget_and_predict` through files in a scratch directory, then each state
    (Θ^0 … Θ^{S-1}, Θ̂^{-1} …) loaded into ``model`` and handed to ``write(out_dir/name)``
    for the framework to save its way.  ``model`` ends as Θ^{S-1}, as training left it.
    Existing output directories are refused, before any training, unless ``force``.
    ``settings``: the rest of :func:`forget_and_predict`'s keyword arguments."""
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in snapshot_names(check_stages(stages))
               + prediction_names(Options(steps=steps).steps)]
    refuse_existing(targets, force)
    # Beside the outputs, so a big model's snapshots go to the disk that has room for them;
    # made by the first snapshot written, so a run refused by a check leaves nothing behind.
    scratch = out_dir / f".know-scratch-{uuid.uuid4().hex}"
    try:
        result = forget_and_predict(model, dataset, train_fn, stages=stages, steps=steps,
                                    out_dir=scratch, **settings)
        for target, path in zip(targets, result.snapshots + result.predictions):
            model.load_state_dict(load_state_dict(path))
            write(target)
        model.load_state_dict(load_state_dict(result.snapshots[-1]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.snapshots, result.predictions = targets[:stages], targets[stages:]
    return result


def recipe_parser(doc: str, out: str, smoke: str) -> argparse.ArgumentParser:
    """The options of a forget-then-predict recipe: --out (default ``out``), --force, --r,
    --stages, --steps, --seed, --threads and --smoke (``smoke``: its help); the description
    is the first paragraph of ``doc``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=out, help="output directory (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="write into an existing --out")
    ap.add_argument("--r", type=float, default=0.5, help="forgetting ratio")
    ap.add_argument("--stages", type=int, default=5,
                    help="S: snapshots Θ^0 … Θ^{S-1}; the shipped KNOWN takes 3, 4 or 5")
    ap.add_argument("--steps", type=int, default=2, help="predict Θ̂^-1 … Θ̂^-steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (a model this small gains nothing from more)")
    ap.add_argument("--smoke", action="store_true", help=smoke)
    return ap
