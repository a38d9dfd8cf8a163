"""KNOW for a ``transformers.Trainer`` that has finished pretraining::

    trainer.train()                                   # your run: Θ^0
    forget_and_predict_hf(trainer, "know", r=0.5, stages=5, steps=2)
    model = AutoModelForCausalLM.from_pretrained("know/know_step1")

Each forgetting stage trains ``trainer.model`` on the next nested subset of
``trainer.train_dataset`` with a new Trainer of the same class, ``TrainingArguments``, data
collator, processing class, loss and metrics (so a fresh optimizer and learning-rate
schedule each time; ``max_steps`` gives every stage the same budget, ``num_train_epochs``
one that shrinks with the subset).  Three arguments are overridden for the stages:
``save_strategy="no"``, ``load_best_model_at_end=False`` and ``push_to_hub=False`` (the
snapshots are written here, and a "best" checkpoint reloaded would undo the forgetting).
Callbacks are not carried over.  A Trainer subclass whose constructor needs other arguments
(e.g. one that preprocesses the dataset itself) does not fit; call
:func:`know_kernels.research.forget.forget_and_predict` with your own ``train_fn`` instead.

``out_dir`` receives ``theta0/`` … ``theta{S-1}/`` and ``know_step1/`` … , each written by
``save_pretrained`` (config, generation config, weights with tied weights stored once) with
the trainer's tokenizer or processor saved beside it, so ``from_pretrained`` loads any of
them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from ..fileio import PathLike
from ..known.heads import KNOWN
from ..known.routing import Route
from ..research.forget import ForgetResult
from . import forget_and_export, require

transformers = require("transformers")
require("accelerate")  # Trainer refuses to train without it


def forget_and_predict_hf(trainer: "transformers.Trainer", out_dir: PathLike, *, r: float,
                          stages: int = 5, seed: int = 0, steps: int = 1,
                          known: Union[None, KNOWN, PathLike] = None, route: Route = None,
                          force: bool = False) -> ForgetResult:
    """Forget on nested subsets of ``trainer.train_dataset``, predict, and write every state
    as a ``save_pretrained`` directory in ``out_dir`` (existing ones refused unless
    ``force``).  ``r``, ``stages`` (= the KNOWN heads' S: 3, 4 or 5 for the shipped KNOWN),
    ``seed``, ``steps``, ``known``, ``route``: as
    :func:`~know_kernels.research.forget.forget_and_predict`.  Returns its result with the
    directories as ``snapshots`` and ``predictions``; ``trainer.model`` ends as Θ^{S-1}."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    model = trainer.model
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"trainer.model must be a transformers PreTrainedModel (its outputs "
                        f"are save_pretrained directories), got {type(model).__name__}; "
                        f"for other models use know_kernels.research.forget")
    if trainer.train_dataset is None:
        raise ValueError("trainer has no train_dataset: the forgetting stages train on nested "
                         "subsets of it")
    args = dataclasses.replace(trainer.args, save_strategy="no", load_best_model_at_end=False,
                               push_to_hub=False)

    def train_stage(model, subset) -> None:
        type(trainer)(model=model, args=args, data_collator=trainer.data_collator,
                      train_dataset=subset, eval_dataset=trainer.eval_dataset,
                      processing_class=trainer.processing_class,
                      compute_loss_func=trainer.compute_loss_func,
                      compute_metrics=trainer.compute_metrics,
                      preprocess_logits_for_metrics=trainer.preprocess_logits_for_metrics
                      ).train()

    def write(target: Path) -> None:
        model.save_pretrained(target)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(target)

    return forget_and_export(model, trainer.train_dataset, train_stage, out_dir, write, r=r,
                             stages=stages, seed=seed, steps=steps, known=known, route=route,
                             force=force)
