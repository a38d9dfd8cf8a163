"""Rows of weight snapshots (N, S) for the kernel tests, generated from a seed."""
import torch


def trajectories(n, S, seed, *, scale=0.05, step=1e-3, drift=True):
    """Weights as training leaves them: w0 ~ N(0, scale), then small steps, which share a
    per-row drift unless ``drift=False``.  Every row is smooth."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, 1, generator=g) * scale
    shared = torch.randn(n, 1, generator=g) * step if drift else None
    steps = torch.randn(n, S - 1, generator=g) * step
    if shared is not None:
        steps = shared + steps
    return torch.cat([w0, w0 + torch.cumsum(steps, dim=1)], dim=1)


def weight_like_rows(n, dtype, seed, *, S=5, device="cpu"):
    """An offset per row plus a small drift, like real weight trajectories, and every 7th
    row wild: the GPU backends' tests and their CPU stand-ins (interpreter, emulator)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = (0.1 * torch.randn(n, 1, generator=gen, device=device)
            + 0.01 * torch.randn(n, S, generator=gen, device=device).cumsum(1))
    rows[::7] = torch.randn(rows[::7].shape, generator=gen, device=device)
    return rows.to(dtype)


def with_next(full, S, dtype=None):
    """Windows of the first S snapshots of ``full`` (in ``dtype`` if given) and, as the
    training target, the snapshot after them."""
    rows = full[:, :S] if dtype is None else full[:, :S].to(dtype)
    return rows.contiguous(), full[:, S].contiguous()


def windows(n, S, seed):
    """Smooth float32 windows and their true next values (the CPU L1 tests)."""
    return with_next(trajectories(n, S + 1, seed), S)


def rows_and_target(n, dtype, seed, *, S=5, device="cpu"):
    """Weight-like windows of S snapshots and, as target, the true next snapshot (the GPU
    L1 backends' tests and their CPU stand-ins)."""
    return with_next(weight_like_rows(n, torch.float32, seed, S=S + 1, device=device), S, dtype)


def strided(t):
    """The same values as a non-contiguous view: every other element of the last dimension
    of a tensor twice as wide.  ``strided(rows.t()).t()`` gives a column-major layout."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]
