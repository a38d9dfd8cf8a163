"""Prediction split over processes: each rank's share, and byte-identical files from torchrun."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch.distributed

from know_kernels.cli import main
from know_kernels.pipeline.distributed import split
from know_kernels.io.sinks import save_sharded
from know_kernels.pipeline.plan import Segment

from support import ROOT
from support.checkpoints import THREE_SHARDS, save_mixed, trajectory


@pytest.mark.parametrize("seed", range(20))
def test_split_covers_every_element_once_and_balances_bytes(seed):
    rng = random.Random(seed)
    groups = [[Segment(f"g{g}p{i}", rng.randrange(3), 0) for i in range(rng.randrange(4))]
              for g in range(rng.randrange(1, 5))]
    for group in groups:
        for seg in group:
            seg.stop = seg.start + rng.choice([0, 1, 2, 17, 1000, rng.randrange(5000)])
    weights = [rng.choice([1, 2, 4, 8, 20]) for _ in groups]
    world = rng.randrange(1, 6)
    parts = [split(groups, weights, r, world) for r in range(world)]
    total = sum(w * (s.stop - s.start) for g, w in zip(groups, weights) for s in g)
    for g, group in enumerate(groups):
        for seg in group:
            covered = sorted((p.start, p.stop) for r in range(world) for p in parts[r][g]
                             if p.name == seg.name)
            flat = [seg.start] + [x for ab in covered for x in ab] + [seg.stop]
            assert flat[0::2] == flat[1::2] or not covered and seg.start == seg.stop, covered
    for r in range(world):
        cost = sum(w * (s.stop - s.start) for part, w in zip(parts[r], weights) for s in part)
        assert abs(cost - total / world) <= max(weights), (r, cost, total / world)
    with pytest.raises(ValueError, match="rank must be in"):
        split(groups, weights, world, world)


def _torchrun(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "know_kernels", "predict", *args],
                          capture_output=True, text=True, timeout=240, cwd=cwd, env=env)


def _inputs(tmp_path, cks):
    paths = save_mixed(cks, tmp_path)
    paths[0] = save_sharded(cks[0], tmp_path / "ck0", max_shard_bytes=THREE_SHARDS)
    return [str(p) for p in paths]


needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(),
                                       reason="this torch build has no torch.distributed")


@needs_distributed
def test_two_processes_write_the_same_bytes_as_one(tmp_path):
    paths = _inputs(tmp_path, trajectory())
    args = [*paths, "--method", "linear", "--steps", "2", "--chunk-rows", "97", "--quiet"]
    res = _torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("wrote") == 2  # rank 0 reports, rank 1 stays quiet
    assert main(["predict", *args, "--out", str(tmp_path / "one")]) == 0
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert one == two and len(one) == 2 * (1 + 3 + 1)  # per step: a directory, 3 shards, index
    for rel in one:
        if (tmp_path / "one" / rel).is_file():
            a, b = (tmp_path / "one" / rel).read_bytes(), (tmp_path / "two" / rel).read_bytes()
            if rel.suffix == ".json":  # the recorded checkpoint paths are the same strings
                a, b = json.loads(a), json.loads(b)
            assert a == b, rel


@needs_distributed
def test_a_failing_rank_stops_the_others(tmp_path):
    cks = trajectory()
    cks[2]["fc2.weight"][-1, -1] = float("inf")  # the last predicted rows: rank 1's share
    paths = _inputs(tmp_path, cks)
    res = _torchrun(*paths, "--method", "linear", "--out", str(tmp_path / "out"), "--quiet",
                    cwd=tmp_path)
    assert res.returncode != 0
    assert "rank 1 failed: NonFiniteError: parameter 'fc2.weight' holds NaN or Inf" in res.stderr
    assert "--nonfinite passthrough" in res.stderr and "nonfinite=" not in res.stderr
    assert not any((tmp_path / "out").rglob("*"))  # no outputs, no temporary files
