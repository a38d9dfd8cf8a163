"""Meta-training KNOWN on a meta-dataset of forgetting trajectories (paper Eq. 6).

A training sample is a window of S + 1 consecutive snapshots of one parameter's trajectory,
in time order towards more data: the first S are the input row, the last one the target.
A run with T stages gives T - S windows per parameter.  Rows are streamed from the store in
chunks; a buffer of chunks from several runs is shuffled together so every minibatch mixes
runs, and nothing but that buffer is ever in memory.

Validation is split by whole runs (held-out architectures and datasets), never by rows.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..kernels.baselines import extrapolate
from ..fileio import PathLike, atomic_path
from .forgetting import derive_seed
from ..known.heads import KNOWN, KNOWNHead
from ..kernels.l1 import check_loss_space, l1_loss
from ..kernels.nowcast import BACKENDS, nowcast
from ..kernels.reference import check_norm
from ..known.routing import HEADS
from ..io.store import MetaDataset


@dataclass
class MetaTrainConfig:
    S: int = 5
    norm: str = "wnn"
    # "original": on the default meta-dataset it beat "normalised" on every head's held-out
    # L1 (MODEL_CARD.md); normalised targets blow up on rows whose window barely moves.
    loss_space: str = "original"
    heads: tuple = HEADS
    batch_size: int = 4096
    lr: float = 1e-4
    epochs: int = 3
    chunk_rows: int = 1 << 14
    mix_chunks: int = 16
    reg_kernel: float = 1e-6
    reg_bias: float = 0.1
    # Negate each training window and its target with probability 1/2 (a trajectory and its
    # mirror image are equally plausible).  Off: on the default meta-dataset it helped the fc
    # head a little and cost the bias head more (MODEL_CARD.md).
    sign_flip: bool = False
    seed: int = 0
    # Held out, whole runs: an architecture KNOWN never trains on.  (Holding out a dataset
    # as well left 15 of 36 runs for training on the previous meta-dataset.)
    val_architectures: tuple = ("densenet",)
    val_datasets: tuple = ()
    checkpoint_every: int = 200
    backend: str = "auto"  # of l1_loss: the fused kernel for the rows' device, if any

    def check(self) -> "MetaTrainConfig":
        check_norm(self.norm)
        check_loss_space(self.loss_space)
        if self.backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, "
                             f"got {self.backend!r}")
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown:
            raise ValueError(f"unknown heads {unknown}; heads are {HEADS}")
        for name in ("batch_size", "chunk_rows", "mix_chunks", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.sign_flip, bool):
            raise ValueError(f"sign_flip must be True or False, got {self.sign_flip!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        return self


def windows(rows_time: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) time-ordered rows -> inputs (n·(T-S), S) and targets (n·(T-S),)."""
    T = rows_time.shape[1]
    if T <= S:
        raise ValueError(f"trajectories with {T} stages give no window of {S} inputs + 1 target")
    inputs = torch.cat([rows_time[:, w:w + S] for w in range(T - S)])
    targets = torch.cat([rows_time[:, w + S] for w in range(T - S)])
    return inputs, targets


def split_runs(store: MetaDataset, val_architectures: Sequence[str] = (),
               val_datasets: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Run ids for training and validation; a run is held out when its architecture or its
    dataset is in the held-out lists."""
    train, val = [], []
    for run_id, entry in store.runs().items():
        meta = entry["meta"]
        held = meta.get("arch") in val_architectures or meta.get("dataset") in val_datasets
        (val if held else train).append(run_id)
    return train, val


def window_batches(store: MetaDataset, head: str, runs: Sequence[str], S: int, batch_size: int,
                   *, chunk_rows: int, mix_chunks: int, seed: int, shuffle: bool = True,
                   sign_flip: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of (inputs (B, S) float32, targets (B,)) from ``runs``' ``head`` rows;
    ``sign_flip`` negates a random half of the windows together with their targets."""
    gen = torch.Generator().manual_seed(seed)
    # Signs from a stream of their own: flipping leaves the batches' order as it was.
    flips = torch.Generator().manual_seed(derive_seed(seed, 1)) if sign_flip else None
    buffer_x, buffer_y = [], []

    def drain():
        x, y = torch.cat(buffer_x), torch.cat(buffer_y)
        if shuffle:
            perm = torch.randperm(x.shape[0], generator=gen)
            x, y = x[perm], y[perm]
        if sign_flip:
            sign = torch.randint(0, 2, (x.shape[0],), generator=flips).to(x.dtype) * 2 - 1
            x, y = x * sign[:, None], y * sign
        buffer_x.clear()
        buffer_y.clear()
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]

    chunks = store.iter_chunks(head, chunk_rows, shuffle=shuffle, seed=seed, order="time",
                               runs=list(runs))
    for rows, _ in chunks:
        x, y = windows(rows.to(torch.float32), S)
        buffer_x.append(x)
        buffer_y.append(y)
        if len(buffer_x) == mix_chunks:
            yield from drain()
    if buffer_x:
        yield from drain()


def window_count(store: MetaDataset, head: str, runs: Sequence[str], S: int) -> int:
    entries = store.runs()
    return sum(entries[r]["rows"].get(head, 0) * max(0, entries[r]["stages"] - S)
               for r in runs)


def regulariser(head: KNOWNHead, reg_kernel: float, reg_bias: float) -> torch.Tensor:
    """The authors' L1 penalties on the first and the 64 -> 32 dense layers of each stream."""
    total = torch.zeros(())
    for stream in (head.x, head.d):
        for w, b in ((stream.w1, stream.b1), (stream.w2, stream.b2)):
            total = total + reg_kernel * w.abs().sum() + reg_bias * b.abs().sum()
    return total


@dataclass
class TrainState:
    """Everything needed to resume: finished heads, the head in progress and its optimiser."""
    config: MetaTrainConfig
    done: dict = field(default_factory=dict)        # head -> state_dict
    current: Optional[str] = None
    current_state: Optional[dict] = None
    optimizer: Optional[dict] = None
    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: dict = field(default_factory=dict)     # head -> list of (step, loss)
    seconds: float = 0.0


def save_state(state: TrainState, path: PathLike) -> None:
    blob = {"config": json.dumps(dataclasses.asdict(state.config)), "done": state.done,
            "current": state.current or "", "current_state": state.current_state or {},
            "optimizer": state.optimizer or {}, "epoch": state.epoch, "batch": state.batch,
            "step": state.step,
            "history": json.dumps(state.history), "seconds": state.seconds}
    write_checkpoint(blob, path)


def write_checkpoint(blob: dict, path: PathLike) -> None:
    """``torch.save`` ``blob`` to ``path`` atomically."""
    # Serialised in memory first: torch.save's own writer reports a full disk as an
    # "enforce fail" RuntimeError; a plain write raises OSError, named by atomic_path.
    data = io.BytesIO()
    torch.save(blob, data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.getbuffer())


def load_state(path: PathLike) -> TrainState:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = json.loads(blob["config"])
    cfg = MetaTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    return TrainState(config=cfg, done=blob["done"], current=blob["current"] or None,
                      current_state=blob["current_state"] or None,
                      optimizer=blob["optimizer"] or None, epoch=int(blob["epoch"]),
                      batch=int(blob["batch"]), step=int(blob["step"]),
                      history=json.loads(blob["history"]), seconds=float(blob["seconds"]))


def resumed_state(checkpoint: Optional[PathLike], cfg, load: Callable):
    """``load(checkpoint)``, refused unless it exists and was written with ``cfg``."""
    if checkpoint is None or not Path(checkpoint).is_file():
        raise FileNotFoundError(f"nothing to resume: checkpoint {checkpoint} not found")
    state = load(checkpoint)
    if dataclasses.asdict(state.config) != dataclasses.asdict(cfg):
        raise ValueError(f"{checkpoint} was written with a different configuration; "
                         f"resume with the same settings or start afresh")
    return state


def meta_train(store: MetaDataset, cfg: MetaTrainConfig, *, checkpoint: Optional[PathLike] = None,
               resume: bool = False,
               progress: Optional[Callable[[str, int, int, float], None]] = None) -> tuple[KNOWN, TrainState]:
    """Train one head per entry of ``cfg.heads``; checkpoint to ``checkpoint`` every
    ``cfg.checkpoint_every`` steps and after each head; ``resume`` continues from it."""
    state = (resumed_state(checkpoint, cfg, load_state) if resume
             else TrainState(config=cfg.check()))
    train_runs, _ = split_runs(store, cfg.val_architectures, cfg.val_datasets)
    if not train_runs:
        raise ValueError("no training runs left after holding out the validation runs")
    for i, head_name in enumerate(cfg.heads):
        if head_name in state.done:
            continue
        n_windows = window_count(store, head_name, train_runs, cfg.S)
        if n_windows == 0:
            raise ValueError(f"no training windows for head {head_name!r} (S={cfg.S})")
        estimate = cfg.epochs * -(-n_windows // cfg.batch_size)
        head = KNOWNHead(cfg.S, cfg.norm, seed=cfg.seed + i)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
        if state.current == head_name and state.current_state is not None:
            head.load_state_dict(state.current_state)
            opt.load_state_dict(state.optimizer)
        else:
            state.current, state.epoch, state.batch, state.step = head_name, 0, 0, 0
        history = state.history.setdefault(head_name, [])
        started = time.perf_counter()
        while state.epoch < cfg.epochs:
            # Seeding by epoch makes a resumed run see the same batches as an uninterrupted
            # one; the batches of this epoch done before the interruption are skipped.
            batches = window_batches(store, head_name, train_runs, cfg.S, cfg.batch_size,
                                     chunk_rows=cfg.chunk_rows, mix_chunks=cfg.mix_chunks,
                                     seed=cfg.seed * 1000 + state.epoch,
                                     sign_flip=cfg.sign_flip)
            for b, (x, y) in enumerate(batches):
                if b < state.batch:
                    continue
                loss = l1_loss(x, y, head, backend=cfg.backend, loss_space=cfg.loss_space)
                opt.zero_grad(set_to_none=True)
                (loss + regulariser(head, cfg.reg_kernel, cfg.reg_bias)).backward()
                opt.step()
                state.batch, state.step = b + 1, state.step + 1
                value = float(loss.detach())
                if state.step == 1 or state.step % 50 == 0:
                    history.append((state.step, value))
                if progress is not None:
                    progress(head_name, state.step, estimate, value)
                if checkpoint is not None and state.step % cfg.checkpoint_every == 0:
                    state.current_state, state.optimizer = head.state_dict(), opt.state_dict()
                    state.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    save_state(state, checkpoint)
            state.epoch, state.batch = state.epoch + 1, 0
        state.seconds += time.perf_counter() - started
        state.done[head_name] = head.state_dict()
        state.current, state.current_state, state.optimizer = None, None, None
        if checkpoint is not None:
            save_state(state, checkpoint)
    heads = {}
    for name in cfg.heads:
        head = KNOWNHead(cfg.S, cfg.norm)
        head.load_state_dict(state.done[name])
        heads[name] = head
    return KNOWN(heads), state


def copy_last(inputs: torch.Tensor) -> torch.Tensor:
    return inputs[:, -1]


def baseline_predictors() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "copy-last": copy_last,
        "taskvector": lambda x: extrapolate(x, "taskvector"),
        "linear": lambda x: extrapolate(x, "linear"),
    }


def prediction_errors(store: MetaDataset, runs: Sequence[str], head_name: str, S: int,
             predictors: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
             *, chunk_rows: int = 1 << 16) -> dict[str, float]:
    """Mean L1 (original units) to the true next snapshot over every window of ``runs``."""
    sums = {name: 0.0 for name in predictors}
    count = 0
    for x, y in window_batches(store, head_name, runs, S, chunk_rows, chunk_rows=chunk_rows,
                               mix_chunks=1, seed=0, shuffle=False):
        x64, y64 = x.double(), y.double()
        for name, fn in predictors.items():
            sums[name] += float((fn(x).double() - y64).abs().sum())
        count += x64.shape[0]
    if count == 0:
        raise ValueError(f"no validation windows for head {head_name!r}")
    return {name: s / count for name, s in sums.items()}


def known_predictor(head: KNOWNHead, norm: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Validation predictions: under no_grad, so that nowcast records nothing for autograd."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return nowcast(x, head, norm=norm, out_dtype=torch.float32)
    return predict
