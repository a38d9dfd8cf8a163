"""Validation study for ``know demo``'s forgetting recipe: which learning rate, budget,
warm-up and schedule make source test accuracy fall at every stage.

One Θ^0 per validation replicate (seeds 1000 + v, never the default demo's), trained with
the demo's pretraining recipe on 2,000 images; then every recipe below forgets from that
same Θ^0 (r = 0.5, S = 5) and the source test accuracy of Θ^0 … Θ^4 is printed, per
replicate and averaged.  Only the forgetting record is read: nothing is predicted.

    python bench/demo_forgetting_study.py 0 1 2
"""
import copy
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import TensorDataset

from know_kernels.research.demo_config import PRESETS, load_tasks
from know_kernels.research.forgetting import derive_seed, progressive_forgetting
from know_kernels.research.training import pretrain
from know_kernels.research.zoo import build_model

# name: (lr, samples per stage / |D^0|, warm-up fraction, cosine to 0)
RECIPES = {"lr1e-3 b1": (1e-3, 1.0, 0.0, False), "lr1e-3 b1 warm": (1e-3, 1.0, 0.1, False),
           "lr1e-3 b2 warm": (1e-3, 2.0, 0.1, False), "lr1e-3 b2 warm cos": (1e-3, 2.0, 0.1, True),
           "lr2e-3 b2 warm cos": (2e-3, 2.0, 0.1, True), "lr5e-4 b2 warm cos": (5e-4, 2.0, 0.1, True),
           "lr2e-3 b1 warm": (2e-3, 1.0, 0.1, False)}


def main(replicates) -> None:
    torch.set_num_threads(1)
    out = {name: [] for name in RECIPES}
    for v in replicates:
        seed = 1000 + v
        source, _ = load_tasks(replace(PRESETS["default"], tasks=("digits",), seed=seed), None)
        x, y = source.train.tensors
        order = torch.from_numpy(np.random.default_rng(derive_seed(seed, 1)).permutation(len(x)))
        d0, held = order[:2000].sort().values, order[len(order) - 1000:]
        torch.manual_seed(derive_seed(seed, 0))
        theta0 = build_model("resnet", source.in_shape, source.num_classes, 16)
        t = time.perf_counter()
        record = pretrain(theta0, source.train, d0, epochs=20, lr=2e-3, batch_size=64,
                          generator=torch.Generator().manual_seed(derive_seed(seed, 3)),
                          val_dataset=TensorDataset(x[held], y[held]))
        print(f"replicate {v}: Θ^0 {record['epochs']} epochs, converged {record['converged']} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        for name, (lr, budget, warmup, cosine) in RECIPES.items():
            schedule = progressive_forgetting(
                copy.deepcopy(theta0), source.train, indices=d0, r=0.5, stages=5,
                stage_samples=round(budget * 2000), batch_size=32, lr=lr,
                seed=derive_seed(seed, 2), stage_warmup=warmup, stage_cosine=cosine,
                test_dataset=source.test)
            out[name].append([100 * a for a in schedule.test_acc])
            print(f"  {name}: {' '.join(f'{a:.2f}' for a in out[name][-1])}", flush=True)
    print("mean over replicates (Θ^0 … Θ^4):")
    for name, acc in out.items():
        mean = np.mean(acc, axis=0)
        print(f"  {name}: {' '.join(f'{a:.2f}' for a in mean)}"
              f"{'  falls at every stage' if np.all(np.diff(mean) < 0) else ''}")


if __name__ == "__main__":
    main([int(v) for v in sys.argv[1:]] or [0, 1, 2])
