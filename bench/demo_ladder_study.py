"""Validation study for ``know demo``'s settings: the real-data rows only.

Runs the demo's replicates with one cheap prediction method on validation seeds (``--seed``
other than the default demo's 0) and prints the ladder check and the forgetting record, so
that |D^0|, the forgetting recipe and the protocol are chosen on real data alone, never on
KNOWN's or a baseline's rows, nor on the default demo's replicates.

    python bench/demo_ladder_study.py --seed 1 --source-size 1000 --out study_1000.json
"""
import argparse
import json
import os
from dataclasses import replace

from know_kernels.research.demo import run_demo
from know_kernels.research.demo_config import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="validation seed (not 0)")
    ap.add_argument("--source-size", type=int, default=2000, help="|D^0|")
    ap.add_argument("--replicates", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", required=True, help="results.json-shaped output")
    args = ap.parse_args()
    if args.seed == 0:
        ap.error("seed 0 is the default demo's: choose settings on other seeds")
    config = replace(PRESETS["default"], seed=args.seed, source_size=args.source_size,
                     methods=("taskvector",))
    for name in ("replicates", "seeds"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    results = run_demo(config, None, jobs=args.jobs, progress=False, log=lambda line: None)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f)
    print(results["source"]["forgetting"])
    print(results["verdict"]["text"].split(" On ")[0])


if __name__ == "__main__":   # worker processes are spawned: they import this file
    main()
