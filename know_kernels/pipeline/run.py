"""The one loop that turns checkpoints into predictions: a reader thread assembles chunks of
rows from the sources, this thread predicts them, a writer thread hands them to the sink.

Buffers come from fixed pools, so memory stays at a few chunks whatever the model size; a
buffer goes back to its pool once its last user is done with it (on a GPU, once the
asynchronous copy that reads it has finished: the pool holds its fence).  On a GPU rows go
through pinned buffers, the host-to-device copy of the next chunk runs on a side stream
during the current chunk's compute, and results come back asynchronously.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..io.sources import Source
from ..kernels.baselines import extrapolate
from ..kernels.nowcast import nowcast
from .options import Options
from .plan import Plan, Segment, batches

_PIPELINE_DEPTH = 3      # chunks in flight per stage: one being filled, one waiting, one in use


PASSTHROUGH = "nonfinite='passthrough'"   # how the message names the option (the CLI renames it)


class NonFiniteError(ValueError):
    """A predicted parameter holds NaN or Inf in a checkpoint (``name``, ``label``)."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        super().__init__(f"parameter {name!r} holds NaN or Inf in {label}; pass "
                         f"{PASSTHROUGH} to keep such rows at Θ^0")


def predict_rows(rows: torch.Tensor, head: str, known, options: Options,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(N, steps) predictions for time-ordered rows (N, S) of parameters routed to ``head``;
    ``known`` maps head names to KNOWN heads (the baselines ignore it)."""
    if options.method == "known":
        pred = nowcast(rows, known[head], steps=options.steps, backend=options.backend,
                       all_steps=True, threads=options.threads, out_dtype=out_dtype,
                       precision=options.precision)
    else:
        pred = extrapolate(rows, options.method, steps=options.steps, all_steps=True,
                           lam=options.lam, out_dtype=out_dtype)
    if options.nonfinite == "passthrough":
        bad = ~torch.isfinite(rows).all(dim=1)
        pred[bad] = rows[bad, -1:].to(pred.dtype)
    return pred


def _require_finite(stage: torch.Tensor, pieces) -> None:
    """Raise naming the parameter and checkpoint of the first NaN/Inf among ``pieces``
    (name, label, values), which together make up ``stage``."""
    # A sum is several times cheaper than isfinite and is NaN/Inf when any value is (or when
    # it overflows: then the exact scan finds nothing and the chunk goes on).
    if torch.isfinite(stage.sum(dim=1, dtype=torch.float32)).all():
        return
    for name, label, piece in pieces:
        if not torch.isfinite(piece).all():
            raise NonFiniteError(name, label)


class _Cancelled(Exception):
    pass


class _Pipeline:
    """Bounded queues between threads; once any thread fails, blocked calls raise
    :class:`_Cancelled` instead of waiting forever, and the first error is kept."""

    def __init__(self):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Cancelled from None

    def put(self, q: queue.Queue, item) -> None:
        while True:
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                if self.stop.is_set():
                    raise _Cancelled from None

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def thread(self, fn: Callable[[], None]) -> threading.Thread:
        def body():
            try:
                fn()
            except _Cancelled:
                pass
            except BaseException as exc:
                self.fail(exc)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t


@dataclass
class _Chunk:
    """Rows read for one batch: its segments, its head (None: copied from Θ^0) and the host
    data ((n, S) time-ordered rows, or (n,) Θ^0 values), held in a pool buffer."""
    head: Optional[str]
    batch: list[Segment]
    data: torch.Tensor
    buffer: torch.Tensor


@dataclass
class _Write:
    """Values for the sink: (steps, n), or (1, n) for a copy (the same for every step);
    ``fence`` marks when they are ready, ``pool`` takes ``buffer`` back afterwards."""
    batch: list[Segment]
    data: torch.Tensor
    fence: Optional[torch.cuda.Event] = None
    pool: Optional[queue.Queue] = None
    buffer: Optional[torch.Tensor] = None


def _fence(device: torch.device):
    """A marker, on the current stream, that a waiting thread can synchronise on."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _wait(fence) -> None:
    if fence is not None:
        fence.synchronize()


def run(sources: Sequence[Source], sink, plan: Plan, known, options: Options,
        device: torch.device) -> None:
    """Predict the plan's groups from ``sources`` (Θ^0 first) into ``sink``."""
    S, steps = len(sources), options.steps
    timeline = sources[::-1]   # time order runs towards more data: Θ^{S-1} first, Θ^0 last
    gpu = device.type == "cuda"
    live = [(h, g) for h, g in plan.groups if g]
    in_bytes = max([options.chunk_rows * S * plan.in_dtype[g[0].name].itemsize
                    for _, g in live], default=0)
    out_bytes = max([options.chunk_rows * steps * plan.out_dtype[g[0].name].itemsize
                     for h, g in live if h is not None], default=0)
    pipe = _Pipeline()
    ready: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    in_pool: queue.Queue = queue.Queue()
    out_pool: queue.Queue = queue.Queue()
    for _ in range(_PIPELINE_DEPTH):
        in_pool.put((torch.empty(in_bytes, dtype=torch.uint8, pin_memory=gpu), None))
        out_pool.put((torch.empty(out_bytes, dtype=torch.uint8, pin_memory=gpu), None))

    def reader():
        staging = torch.empty(in_bytes, dtype=torch.uint8)
        for head, segments in live:
            dtype = plan.in_dtype[segments[0].name]
            width = S if head is not None else 1
            # Copies move Θ^0 only, so a copy chunk holds as many bytes as a row chunk.
            for batch in batches(segments, options.chunk_rows * (S // width)):
                n = sum(seg.stop - seg.start for seg in batch)
                buffer, fence = pipe.get(in_pool)
                _wait(fence)
                flat = buffer[:n * width * dtype.itemsize].view(dtype)
                if head is None:
                    at = 0
                    for seg in batch:
                        sources[0].read(seg.name, seg.start, seg.stop,
                                        flat[at:at + seg.stop - seg.start])
                        at += seg.stop - seg.start
                    pipe.put(ready, _Chunk(None, batch, flat, buffer))
                    continue
                # Each snapshot's slice is one contiguous read; the rows are their transpose.
                stage = staging[:flat.numel() * dtype.itemsize].view(dtype).view(S, n)
                pieces = []
                for s, source in enumerate(timeline):
                    at = 0
                    for seg in batch:
                        piece = stage[s, at:at + seg.stop - seg.start]
                        source.read(seg.name, seg.start, seg.stop, piece)
                        pieces.append((seg.name, source.label, piece))
                        at += seg.stop - seg.start
                if options.nonfinite == "error":
                    _require_finite(stage, pieces)
                rows = flat.view(n, S)
                rows.copy_(stage.t())
                pipe.put(ready, _Chunk(head, batch, rows, buffer))
        pipe.put(ready, None)

    def writer():
        while True:
            work = pipe.get(to_write)
            if work is None:
                return
            try:
                _wait(work.fence)
                at = 0
                for seg in work.batch:
                    n = seg.stop - seg.start
                    for k in range(steps):
                        row = work.data[k if work.data.shape[0] > 1 else 0, at:at + n]
                        sink.write(k, seg.name, seg.start, row)
                    at += n
            finally:
                if work.pool is not None:
                    work.pool.put((work.buffer, None))

    if gpu:
        side = torch.cuda.Stream(device)
        dev_rows = [torch.empty(in_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        dev_free = [None, None]
    workers = [pipe.thread(reader), pipe.thread(writer)]
    done, turn = 0, 0
    try:
        while True:
            chunk = pipe.get(ready)
            if chunk is None:
                break
            dtype = plan.in_dtype[chunk.batch[0].name]
            od = plan.out_dtype[chunk.batch[0].name]
            if chunk.head is None:
                if od == dtype:
                    pipe.put(to_write, _Write(chunk.batch, chunk.data[None], None, in_pool,
                                              chunk.buffer))
                else:
                    converted = chunk.data.to(od)[None]
                    in_pool.put((chunk.buffer, None))
                    pipe.put(to_write, _Write(chunk.batch, converted))
                continue
            n = chunk.data.shape[0]
            rows = chunk.data
            if gpu:
                # Two device buffers: the next chunk's copy overlaps this chunk's compute.
                with torch.cuda.stream(side):
                    if dev_free[turn] is not None:
                        side.wait_event(dev_free[turn])
                    nbytes = chunk.data.numel() * dtype.itemsize
                    rows = dev_rows[turn][:nbytes].view(dtype).view(n, S)
                    rows.copy_(chunk.data, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(side)
                torch.cuda.current_stream(device).wait_event(copied)
                in_pool.put((chunk.buffer, copied))
            # The fused kernels write float32 or the rows' dtype; other outputs are cast below.
            kernel_dtype = (od if od in (dtype, torch.float32) or options.method != "known"
                            else torch.float32)
            pred = predict_rows(rows, chunk.head, known, options,
                                out_dtype=None if kernel_dtype == dtype else kernel_dtype)
            if gpu:
                dev_free[turn] = _fence(device)
                turn ^= 1
            else:
                in_pool.put((chunk.buffer, None))
            out_buffer, _ = pipe.get(out_pool)
            host = out_buffer[:n * steps * od.itemsize].view(od).view(steps, n)
            host.copy_(pred.t(), non_blocking=gpu)
            pipe.put(to_write, _Write(chunk.batch, host, _fence(device), out_pool, out_buffer))
            done += n
            if options.progress is not None:
                options.progress(done, plan.rows)
        pipe.put(to_write, None)
    except _Cancelled:
        pass
    except BaseException as exc:
        pipe.fail(exc)
    for worker in workers:
        worker.join()
    if pipe.errors:
        raise pipe.errors[0]
