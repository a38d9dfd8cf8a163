"""Meta-datasets for the meta-training tests."""
import torch

from know_kernels.io.store import MetaDataset, Trajectory

STAGES = 7


def synthetic_store(root, runs=6, rows=600, seed=0):
    """Trajectories whose next value (towards more data) keeps the recent drift: something a
    head can learn and copy-last cannot."""
    g = torch.Generator().manual_seed(seed)
    store = MetaDataset(root)
    archs = ["cnn", "resnet", "densenet"]
    for i in range(runs):
        heads = {}
        for h in ("conv", "fc", "bias"):
            start = torch.randn(rows, 1, generator=g) * 0.05
            slope = torch.randn(rows, 1, generator=g) * 2e-3
            t = torch.arange(STAGES, dtype=torch.float32)
            time_order = start + slope * t  # least data first
            heads[h] = time_order.flip(1)   # stored in stage order: column 0 = Θ^0
        params = [{"name": f"{h}.w", "shape": [rows], "head": h, "offset": 0} for h in heads]
        meta = {"arch": archs[i % 3], "dataset": "digits", "r": 0.5}
        store.add(f"run{i}", Trajectory(heads=heads, params=params, meta=meta))
    return store
