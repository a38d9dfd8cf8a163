"""What ``know demo`` runs: its configuration, presets and data (shared by the replicate
workers and the driver, :mod:`know_kernels.research.demo`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .data import load_dataset
from ..fileio import PathLike
from .forgetting import check_r, check_stages, derive_seed
from ..known.heads import KNOWN
from .more_data import PretrainRecipe
from ..pipeline.plan import group_by_head
from .probe import LinearProbe
from ..known.routing import route_state
from .training import check_positive
from .transfer import (PAPER_ORDER, FineTune, check_input_shape, check_methods, check_seeds,
                       select_classes)

ARCH = "resnet"
# Fashion-MNIST: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat | 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot.  Θ^0 never sees the second half, which makes it a
# downstream task of the same image statistics but new classes.
SOURCE_CLASSES = (0, 1, 2, 3, 4)
HELDOUT_CLASSES = (5, 6, 7, 8, 9)
TASKS = ("digits", "fashion-heldout")
SOURCE_TASK = "source"
ABLATION_S = (3, 4)
PROTOCOLS = ("probe", "finetune")


@dataclass(frozen=True)
class DemoConfig:
    replicates: int = 4              # independent pretraining replicates P
    seeds: int = 8                   # paired downstream seeds per task and replicate
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = PAPER_ORDER
    seed: int = 0                    # replicate p's seeds derive from (seed, p)
    width: int = 16                  # ResNet base width (77k parameters at 16)
    source_size: int = 2000          # |D^0|
    val_size: int = 1000             # held-out source images for the convergence check
    source_test_size: int = 2000     # held-out source images: forgetting record, source rows
    heldout_test_size: int = 1000
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    # The real-data ladder: Θ^0's recipe on half of D^0 and on 2× and 4× the images.
    more_data: tuple[float, ...] = (0.5, 2.0, 4.0)
    r: float = 0.5
    stages: int = 5                  # S snapshots Θ^0 … Θ^{S-1}
    steps: int = 3                   # predictions ×1/r … ×1/r^steps
    # The forgetting recipe: every stage trains for stage_budget × |D^0| samples at
    # forget_lr after a linear warm-up over forget_warmup of its steps, cosine-annealed
    # to 0 when forget_cosine.  Chosen on validation replicates so that source accuracy
    # falls at every stage (docs/demo.md).
    stage_budget: float = 2.0
    forget_lr: float = 2e-3
    forget_warmup: float = 0.1
    forget_cosine: bool = True
    forget_batch_size: int = 32
    protocol: Union[LinearProbe, FineTune] = field(default_factory=LinearProbe)
    s_ablation: bool = False         # also KNOWN with S = 3 and 4 (the paper's Table 6)

    def check(self) -> "DemoConfig":
        check_positive("replicates", self.replicates, integer=True)
        if self.replicates < 2:
            raise ValueError(f"replicates must be >= 2 (the clustered standard error needs "
                             f"two pretraining replicates), got {self.replicates}")
        check_seeds(self.seeds)
        check_methods(self.methods)
        check_r(self.r)
        check_stages(self.stages)
        check_positive("stage_budget", self.stage_budget)
        check_positive("forget_lr", self.forget_lr)
        if not 0.0 <= self.forget_warmup < 1.0:
            raise ValueError(f"forget_warmup must lie in [0, 1), got {self.forget_warmup}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks: unknown {unknown or 'empty list'}; choose from {TASKS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if sorted(self.more_data) != list(self.more_data) or 0.5 not in self.more_data \
                or 2.0 not in self.more_data or 4.0 not in self.more_data:
            raise ValueError(f"more_data must be increasing and hold the ladder's 0.5, 2 and "
                             f"4, got {self.more_data}")
        if self.s_ablation and ("known" not in self.methods or self.stages < max(ABLATION_S)):
            raise ValueError("the S ablation needs the KNOWN method and >= "
                             f"{max(ABLATION_S)} stages")
        return self

    @property
    def protocol_name(self) -> str:
        return "linear-probe" if isinstance(self.protocol, LinearProbe) else "fine-tune"


def replicate_seed(config: DemoConfig, replicate: int) -> int:
    """The seed every random draw of replicate ``replicate`` derives from."""
    return derive_seed(config.seed, 100, replicate)


PRESETS = {
    # Under 10 minutes on the project's 2-core machine with --jobs 2 (docs/demo.md).
    "default": DemoConfig(),
    # A smoke run (CI): every stage of the pipeline on a fraction of the data.
    "quick": DemoConfig(replicates=2, seeds=3, source_size=400, val_size=300,
                        source_test_size=400, heldout_test_size=200,
                        pretrain=PretrainRecipe(samples=4000), forget_batch_size=16,
                        protocol=LinearProbe(shots=10)),
}
# The paper's protocol: every weight fine-tuned downstream (``--protocol finetune``).
FINETUNE = FineTune(shots=10, epochs=15)


def load_tasks(config: DemoConfig, data_dir: Optional[PathLike]):
    """(source split, {task name: downstream split}); Fashion-MNIST from Debian's package or
    ``data_dir``.  The test images are the same for every replicate."""
    fashion = load_dataset("fashion-mnist", data_dir)
    source = select_classes(fashion, SOURCE_CLASSES, name="fashion-mnist[0-4]",
                            test_size=config.source_test_size, seed=config.seed)
    tasks = {}
    for name in config.tasks:
        if name == "digits":
            # The deliberate adapter: 8x8 digits resized to the network's input size.
            tasks[name] = load_dataset("digits", digits_size=source.in_shape[-1])
        else:
            tasks[name] = select_classes(fashion, HELDOUT_CLASSES, name=name,
                                         test_size=config.heldout_test_size, seed=config.seed)
        check_input_shape(source.in_shape, tasks[name])
    return source, tasks


def check_known(known: Optional[KNOWN], model, config: DemoConfig, source: str) -> None:
    """Before any training: the KNOWN must have the heads and S the network needs."""
    try:
        group_by_head(route_state(model.state_dict()), "known", known, config.stages)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
