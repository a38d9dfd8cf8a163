"""The demo's verdict: the ladder check first, then the controls, from pooled rows built of
synthetic per-replicate values."""
import numpy as np
import pytest

from know_kernels.research.pooling import compare, find_row, pool_task
from know_kernels.research.transfer import MORE_DATA, NAIVE
from know_kernels.research.verdict import ladder_check, verdict

REPLICATES, SEEDS = 4, 3


def _task(name, offsets, source=False):
    """Per-replicate results where row (method, factor) scores base + offset + a small
    replicate-and-seed wobble; ``offsets`` maps (method, factor) -> offset (points)."""
    rng = np.random.default_rng(0)
    base = 70 + rng.normal(0, 3, size=(REPLICATES, SEEDS))
    reps = []
    for p in range(REPLICATES):
        rows = []
        for k, ((method, factor), offset) in enumerate(offsets.items()):
            wobble = rng.normal(0, 0.05, size=SEEDS)
            acc = base[p] + offset + wobble if (method, factor) != (NAIVE, 1.0) else base[p]
            row = {"method": method, "step": k if (method, factor) != (NAIVE, 1.0) else 0,
                   "factor": factor, "acc": list(acc[:1] if source else acc), "diverged": []}
            if source:
                row["ce"] = [0.5 - offset / 100]
            rows.append(row)
        reps.append({"task": name, "num_classes": 5, "train_images_per_seed": 50,
                     "test_images": 100, "seeds": [0] if source else list(range(SEEDS)),
                     "protocol": "toy", "rows": rows})
    return pool_task(reps)


LADDER = {(NAIVE, 1.0): 0.0, (NAIVE, 0.5): -1.0, (MORE_DATA, 0.5): -2.0,
          (MORE_DATA, 2.0): 2.0, (MORE_DATA, 4.0): 4.0}


def test_a_metric_that_orders_real_data_passes_and_one_that_does_not_fails():
    good = _task("toy", LADDER)
    check = ladder_check(good)
    assert check["passes"] and [(s["lower"], s["upper"]) for s in check["steps"]] == [
        ("×0.5", "Θ^0"), ("Θ^0", "×2"), ("×2", "×4")]
    assert check["steps"][1]["diff_mean"] == pytest.approx(2.0, abs=0.1)
    # ×4 no better than ×2: the step ×2 < ×4 is not resolved and the metric fails.
    flat = _task("flat", {**LADDER, (MORE_DATA, 4.0): 2.0})
    check = ladder_check(flat)
    assert not check["passes"] and [s["resolved"] for s in check["steps"]] == [True, True, False]
    v = verdict({"tasks": {"flat": flat}})
    assert v["passing"] == [] and "flat CANNOT SEE KNOWLEDGE" in v["text"]
    assert "nothing is judged" in v["text"]


def test_source_also_needs_the_forgotten_model_below_theta0():
    offsets = {**LADDER, (NAIVE, 0.5): +0.5}        # Θ^1 above Θ^0: no forgetting
    check = ladder_check(_task("source", offsets, source=True))
    assert not check["passes"] and check["steps"][-1]["lower"] == "Θ^1"
    assert ladder_check(_task("source", LADDER, source=True))["passes"]


def test_a_gain_counts_only_beyond_its_matched_noise_and_with_source_intact():
    offsets = {**LADDER, ("known", 2.0): 1.5, ("noise:known", 2.0): 1.5,
               ("exp", 2.0): 1.5, ("noise:exp", 2.0): -1.0,
               ("linear", 2.0): 1.0, ("noise:linear", 2.0): 0.0}
    down = _task("toy", offsets)
    source = _task("source", {**offsets, ("linear", 2.0): -3.0}, source=True)
    v = verdict({"tasks": {"source": source, "toy": down}})
    rows = {r["method"]: r for r in v["tasks"]["toy"]["rows"]}
    assert rows["known"]["gain_resolved"] and not rows["known"]["beats_noise"]
    assert not rows["known"]["counts"]                          # noise does as well
    assert rows["exp"]["counts"]
    assert rows["linear"]["beats_noise"] and not rows["linear"]["source_not_below"]
    assert not rows["linear"]["counts"]                         # it broke the source task
    toy = v["tasks"]["toy"]
    assert toy["best_baseline"]["name"] == "ExpFit" and toy["known_counts"] is False
    assert toy["recovered"] == pytest.approx(1.5 / 2.0, abs=0.05)
    assert v["text"].startswith("Ladder check")
    assert "does not beat it" in v["text"] and v["passing"] == ["source", "toy"]


def test_compare_and_find_row():
    task = _task("toy", LADDER)
    two, four = find_row(task, MORE_DATA, 2.0), find_row(task, MORE_DATA, 4.0)
    c = compare(four, two)
    assert c["resolved"] and not c["resolved_below"]
    assert compare(two, four)["resolved_below"]
    assert find_row(task, "known", 2.0) is None
    naive = find_row(task, NAIVE, 1.0)
    assert naive["diff_mean"] == 0.0 and naive["diff_se"] == 0.0
    assert len(naive["acc"]) == REPLICATES and len(naive["acc"][0]) == SEEDS
