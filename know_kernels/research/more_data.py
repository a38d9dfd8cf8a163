"""The yardstick: Θ^0's own recipe run on really more data.

KNOW claims to give weights "as if trained on more data".  Whether a downstream task can see
that at all is measured by training the real thing: the same network, the same
initialisation, the same pretraining recipe (:func:`know_kernels.research.training.pretrain`, to
convergence), on nested supersets D^{-k} ⊃ D^0 of ``factor`` × |D^0| images.  Its rows say
how much real extra data is worth on the task, and every method's gain is read as a
fraction of it.  A task on which twice the data does not beat Θ^0 cannot measure
knowledge.

The sets are prefixes of one seeded order of the source pool, so D^0 ⊂ D^{-1} ⊂ D^{-2}
(``nested_prefixes``); the caller trains Θ^0 on the first prefix with the same recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .training import Convergence, check_positive, pretrain, top1_accuracy
from .transfer import MORE_DATA, Candidate


@dataclass(frozen=True)
class PretrainRecipe:
    """How Θ^0 is trained, and therefore every more-data model: cosine cycles of
    ``max(4, round(samples / |D|))`` epochs (one cycle sees about ``samples`` images)
    with ``optimizer`` at ``lr`` and batches of ``batch_size``, until ``convergence``
    holds on the held-out images."""
    samples: int = 40000
    lr: float = 2e-3
    batch_size: int = 64
    optimizer: str = "adam"
    convergence: Convergence = Convergence()

    def __post_init__(self):
        check_positive("samples", self.samples, integer=True)
        check_positive("lr", self.lr)
        check_positive("batch_size", self.batch_size, integer=True)

    def epochs(self, n: int) -> int:
        return max(4, round(self.samples / n))


def nested_prefixes(order: torch.Tensor, n0: int, factors: Sequence[float]) -> list[torch.Tensor]:
    """D^0 = the first ``n0`` of ``order``, then the first ⌊factor·n0⌋ for each factor
    (sorted indices; prefixes of one order, so a smaller set lies inside every larger one:
    a factor below 1 gives a subset of D^0)."""
    order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
    sizes = [math.floor(f * n0) for f in factors]
    if n0 < 1 or any(f <= 0 or f == 1 for f in factors) or sizes != sorted(set(sizes)) \
            or (sizes and sizes[0] < 1):
        raise ValueError(f"need n0 >= 1 and increasing factors other than 1 that each keep "
                         f">= 1 image, got n0={n0}, factors={list(factors)}")
    sizes = [n0] + sizes
    if sizes[-1] > order.numel():
        raise ValueError(f"the largest set needs {sizes[-1]} images, the pool has "
                         f"{order.numel()}")
    return [order[:n].sort().values for n in sizes]


def more_data_candidates(model_fn: Callable[[], nn.Module], dataset: Dataset,
                         sets: Sequence[torch.Tensor], recipe: PretrainRecipe, *,
                         init_seed: int, order_seed: int,
                         val_dataset: Optional[Dataset] = None,
                         test_dataset: Optional[Dataset] = None,
                         progress: Optional[Callable[[str], None]] = None
                         ) -> tuple[list[Candidate], list[dict]]:
    """Train one model per set of ``sets[1:]`` (``sets[0]`` is D^0, Θ^0's own; smaller sets
    first, steps -1, -2, … from the largest of them, then 1, 2, … for the larger ones) from the
    initialisation ``torch.manual_seed(init_seed); model_fn()`` with batch order seed
    ``order_seed``, as Θ^0 was.  Returns the candidates (method "more-data", factor
    |set| / |D^0|) and each model's pretraining record (convergence check included, and
    ``test_acc`` in % on ``test_dataset`` when given)."""
    n0 = sets[0].numel()
    candidates, records = [], []
    smaller = sum(s.numel() < n0 for s in sets[1:])
    # Steps as for predictions: k > 0 stands for more data than D^0, k < 0 for less.
    steps = [k - smaller - (k <= smaller) for k in range(1, len(sets))]
    for k, indices in zip(steps, sets[1:]):
        factor = indices.numel() / n0
        if progress is not None:
            progress(f"more data ×{factor:.3g}: {indices.numel()} images")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = model_fn()
        record = pretrain(model, dataset, indices, epochs=recipe.epochs(indices.numel()),
                          lr=recipe.lr, batch_size=recipe.batch_size,
                          optimizer=recipe.optimizer,
                          generator=torch.Generator().manual_seed(order_seed),
                          val_dataset=val_dataset, convergence=recipe.convergence)
        if test_dataset is not None:
            record["test_acc"] = 100 * top1_accuracy(model, test_dataset)
        records.append({"factor": factor, "images": indices.numel(), **record})
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        candidates.append(Candidate(MORE_DATA, k, factor, state))
    return candidates, records
