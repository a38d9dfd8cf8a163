"""Checkpoints [Θ^0, Θ^1, …] (paper order: full data first) of small models, and the files
predict_files reads and writes."""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHUNK = 97  # smaller than Net's big parameters, so they are split across chunks
# Shard sizes that split Net's state dict into 3 and into 6 shards.
THREE_SHARDS, SIX_SHARDS = 4000, 1000


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(53, 37)
        self.fc2 = nn.Linear(37, 10)


def small_cnn(in_channels=1, width=3, classes=5, side=4):
    """conv, BatchNorm, flatten, linear: one parameter of every head and a BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.BatchNorm2d(width), nn.Flatten(),
                         nn.Linear(width * (side - 2) ** 2, classes))


def drifting_checkpoints(model, S=5, *, seed=0, dtype=None, count_ints=True):
    """``model()``'s state dict, then each stage a small step further from it: entry
    v + 0.01 i N(0, 1) at stage i (in ``dtype`` if given); integer entries (BatchNorm's
    batch count) + i unless ``count_ints=False``.  ``seed=None`` leaves torch's global
    generator as the caller set it."""
    if seed is not None:
        torch.manual_seed(seed)
    base = {k: v.clone() for k, v in model().state_dict().items()}
    cks = []
    for i in range(S):
        ck = {}
        for k, v in base.items():
            if v.is_floating_point():
                ck[k] = v + 0.01 * i * torch.randn_like(v)
                if dtype is not None:
                    ck[k] = ck[k].to(dtype)
            else:
                ck[k] = v + i if count_ints else v
        cks.append(ck)
    return cks


def trajectory(S=5, dtype=None, seed=0):
    """Checkpoints of ``Net``: parameters large enough to span several chunks and shards."""
    return drifting_checkpoints(Net, S, seed=seed, dtype=dtype)


def forgetting_checkpoints(S=5, seed=0, dtype=None):
    """Checkpoints of a small CNN (conv, BatchNorm, linear)."""
    return drifting_checkpoints(small_cnn, S, seed=seed, dtype=dtype)


def save_checkpoints(cks, directory, kinds="pt", stem="theta"):
    """Each Θ^i as directory/<stem><i>.<kind>, ``kinds`` one format ("pt" or
    "safetensors") for all or one per checkpoint; returns the paths."""
    if isinstance(kinds, str):
        kinds = [kinds] * len(cks)
    paths = []
    for i, (ck, kind) in enumerate(zip(cks, kinds, strict=True)):
        path = Path(directory) / f"{stem}{i}.{kind}"
        if kind == "pt":
            torch.save(ck, path)
        else:
            save_file(ck, str(path))
        paths.append(path)
    return paths


def save_mixed(cks, directory, first="safetensors"):
    """Θ^0 as ``first``; the others alternate .pt and .safetensors."""
    kinds = [first] + ["pt" if i % 2 else "safetensors" for i in range(1, len(cks))]
    return save_checkpoints(cks, directory, kinds)


def read_output(target):
    """Every tensor of an output file, or of all shards of an output directory."""
    target = Path(target)
    if target.is_file():
        return load_file(str(target))
    state = {}
    for f in sorted(target.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


class Wide(nn.Module):
    """About ``width``² parameters of every head, for runs that last long enough to be
    interrupted (a few seconds with small chunks)."""

    def __init__(self, width=256):
        super().__init__()
        self.conv = nn.Conv2d(width // 16, width // 16, 3)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width // 2)


def wide_checkpoints(directory, width=256, S=5):
    """``Wide(width)``'s drifting checkpoints saved as .safetensors; returns the paths."""
    return save_checkpoints(drifting_checkpoints(lambda: Wide(width), S), directory,
                            "safetensors")
