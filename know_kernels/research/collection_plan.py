"""What decides a collection's runs: the presets, and each run's draws.

Run k draws its architecture and dataset from a balanced shuffle of the grid
architectures × datasets (every combination once per block of the grid's size), then
r ~ U(0.3, 0.9), a learning rate in [1e-5, 4e-3] and a batch size from the preset's menu.
The learning rate is stratified: its range is cut into ``lr_strata`` equal strata, and
each combination's visits, taken ``lr_strata`` blocks at a time, draw once from every
stratum (in a shuffled order), so no architecture's or dataset's runs all land at low or
all at high rates.  The scale is the authors' (``lr_scale="linear"``: their sampling script
draws the rate uniformly); on a log scale a third of the runs fall below 1.6e-4, where
the forgetting stages barely move a converged Θ^0 and source accuracy did not fall
(docs/collection.md).

Every draw depends only on (seed, k), so a collection's runs are deterministic.  Two
constraints tie the draws to the data: the last subset |D^{S-1}| ≈ r^{S-1}|D^0| must hold
one batch, so r's lower bound is raised where D^0 is too small for the smallest batch size
of the menu (recorded as ``r_low`` in the run's metadata), and the batch size is drawn
among the menu's sizes that fit the last subset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from .forgetting import derive_seed, subset_sizes
from .zoo import ARCHITECTURES, DEFAULT_WIDTH


# Learning-rate scales: (to the scale the strata are cut on, back).
LR_SCALES = {"linear": (lambda v: v, lambda v: v), "log": (np.log, np.exp)}


@dataclass(frozen=True)
class Preset:
    """Everything that decides a collection's runs (saved in the index as the recipe)."""
    runs: int
    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    widths: dict = field(default_factory=dict)  # arch -> width (missing: the zoo default)
    train_size: Optional[int] = None            # |D^0| (None: the training split less val)
    val_size: int = 1000                        # held-out source images for convergence
    test_size: Optional[int] = None             # fixed test subset per dataset
    # |D^0| is capped so that at least extra_ratio·|D^0| training images stay outside D^0
    # and the validation images: the extra pool E a replayed run is scored on (at most
    # extra_cap·|D^0| of them are recorded).
    extra_ratio: float = 0.0
    extra_cap: float = 4.0
    stages: int = 7
    pretrain_samples: int = 40000               # one cosine cycle of Θ^0 (>= 4 epochs)
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 64
    convergence_tol: float = 0.5                # points, see training.Convergence
    max_cycles: int = 3
    stage_budget: float = 1.0                   # samples per forgetting stage / |D^0|
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    r_range: tuple[float, float] = (0.3, 0.9)
    lr_range: tuple[float, float] = (1e-5, 4e-3)
    lr_scale: str = "linear"                    # or "log": strata of equal log width
    lr_strata: int = 3
    optimizer: str = "adam"
    threads: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"lr_scale must be one of {tuple(LR_SCALES)}, got "
                             f"{self.lr_scale!r}")
        if not 0 <= self.extra_ratio <= self.extra_cap:
            raise ValueError(f"need 0 <= extra_ratio <= extra_cap, got {self.extra_ratio} "
                             f"and {self.extra_cap}")


PRESETS = {
    # Seconds per run, for tests and smoke checks; needs only scikit-learn's digits.
    "quick": Preset(runs=3, datasets=("digits",), archs=ARCHITECTURES,
                    widths={"cnn": 4, "resnet": 4, "densenet": 4, "shufflenet": 4,
                            "mobilenetv2": 4, "mlp": 8, "vit": 8},
                    train_size=400, val_size=200, test_size=200, pretrain_samples=2400,
                    batch_sizes=(16, 32, 64), extra_ratio=1.0),
    # 70 runs (10 per architecture, 35 per dataset), about 35M rows, in about an hour with
    # --jobs 2 on 2 CPU cores (docs/collection.md).  |D^0| = 2,000 (digits: 1,079) keeps
    # Θ^0 short of what its data could teach: the regime where more data helps.
    "default": Preset(runs=70, datasets=("fashion-mnist", "digits"), archs=ARCHITECTURES,
                      widths={"cnn": 24, "resnet": 16, "densenet": 8, "shufflenet": 16,
                              "mobilenetv2": 16, "mlp": 192, "vit": 64},
                      train_size=2000, test_size=2000),
}
# The default's runs with an extra pool E of at least |D^0| images for the task objective
# (know meta-train --objective task): digits' D^0 shrinks to 539 to leave room for it.
PRESETS["replay"] = replace(PRESETS["default"], extra_ratio=1.0)


def recipe_of(preset: Preset, name: str, seed: int) -> dict:
    """What must match for runs to be resumed or appended (not the run count)."""
    recipe = asdict(preset)
    del recipe["runs"], recipe["threads"]
    return {"preset": name, "seed": seed,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}}


def feasible_r_low(n0: int, preset: Preset) -> float:
    """The smallest r in the preset's range whose last subset holds the smallest batch."""
    lo, hi = preset.r_range
    need = min(preset.batch_sizes)

    def fits(r):
        return subset_sizes(n0, r, preset.stages)[-1] >= need

    if not fits(hi):
        raise ValueError(f"|D^0| = {n0} is too small for {preset.stages} stages with r <= {hi} "
                         f"and batches of {need}")
    if fits(lo):
        return lo
    for _ in range(40):  # bisection: the last subset size grows with r
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def grid_cell(preset: Preset, seed: int, k: int) -> tuple[int, int]:
    """Run k's block of the grid and its combination's index in the grid."""
    size = len(preset.archs) * len(preset.datasets)
    block = np.random.default_rng(derive_seed(seed, 0, k // size)).permutation(size)
    return k // size, int(block[k % size])


def plan_run(preset: Preset, seed: int, k: int) -> dict:
    """Run k's architecture, dataset and seed (the draws that need no data)."""
    grid = [(a, d) for a in preset.archs for d in preset.datasets]
    arch, dataset = grid[grid_cell(preset, seed, k)[1]]
    return {"run_id": f"run_{k:04d}", "index": k, "arch": arch, "dataset": dataset,
            "width": preset.widths.get(arch, DEFAULT_WIDTH[arch]), "seed": derive_seed(seed, 2, k)}


def lr_stratum(preset: Preset, seed: int, k: int) -> int:
    """Which of the preset's lr strata run k draws from: a combination's visits in blocks
    g·n … g·n + n - 1 (n strata) take the strata in a shuffled order."""
    block, cell = grid_cell(preset, seed, k)
    n = preset.lr_strata
    group = block // n
    order = np.random.default_rng(derive_seed(seed, 3, group, cell)).permutation(n)
    return int(order[block % n])


def draw_lr(preset: Preset, stratum: int, rng: np.random.Generator) -> float:
    """A learning rate uniform within ``stratum`` of the preset's range, cut into equal
    strata on its scale."""
    forward, back = LR_SCALES[preset.lr_scale]
    lo, hi = forward(np.asarray(preset.lr_range, dtype=np.float64))
    width = (hi - lo) / preset.lr_strata
    return float(back(rng.uniform(lo + stratum * width, lo + (stratum + 1) * width)))


def split_sizes(preset: Preset, n_train: int) -> tuple[int, int]:
    """|D^0| and the number of held-out validation images for a training split of
    ``n_train``: the validation images (at most a quarter of the split) come first."""
    n_val = min(preset.val_size, n_train // 4)
    room = int((n_train - n_val) / (1 + preset.extra_ratio))
    n0 = room if preset.train_size is None else min(preset.train_size, room)
    return n0, n_val


def draw_settings(preset: Preset, seed: int, k: int, n_train: int) -> dict:
    """Run k's D^0, validation images and extra pool E (disjoint), r, learning rate and
    batch size."""
    rng = np.random.default_rng(derive_seed(seed, 1, k))
    n0, n_val = split_sizes(preset, n_train)
    perm = rng.permutation(n_train)
    d0, val = np.sort(perm[:n0]), np.sort(perm[n_train - n_val:])
    n_extra = min(n_train - n_val - n0, int(preset.extra_cap * n0))
    extra = np.sort(perm[n0:n0 + n_extra])
    r_low = feasible_r_low(n0, preset)
    r = float(rng.uniform(r_low, preset.r_range[1]))
    lr = draw_lr(preset, lr_stratum(preset, seed, k), rng)
    last = subset_sizes(n0, r, preset.stages)[-1]
    batch_size = int(rng.choice([b for b in preset.batch_sizes if b <= last]))
    return {"d0": torch.from_numpy(d0), "val": torch.from_numpy(val),
            "extra": torch.from_numpy(extra), "r": r,
            "r_low": r_low, "lr": lr, "batch_size": batch_size,
            "pretrain_epochs": max(4, round(preset.pretrain_samples / n0)),
            "stage_samples": max(batch_size, round(preset.stage_budget * n0))}


def training_samples(preset: Preset, draws: dict) -> list[int]:
    """Samples each stage trains on (full batches only), stage 0 = Θ^0's first cycle."""
    n0, pbs, bs = len(draws["d0"]), preset.pretrain_batch_size, draws["batch_size"]
    return ([draws["pretrain_epochs"] * (n0 // pbs) * pbs]
            + [draws["stage_samples"] // bs * bs] * (preset.stages - 1))
