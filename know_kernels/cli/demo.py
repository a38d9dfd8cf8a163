"""``know demo``: pretrain, forget, predict KNOW and every baseline, and measure transfer.

    know demo [--quick] [--out DIR] [--jobs N] [--replicates P] [--known PATH] ...

Over P independent pretraining replicates (worker processes): pretrains a small ResNet on
its own 2,000 images of Fashion-MNIST's classes 0-4 to convergence, trains the same recipe
on really x0.5, x2 and x4 the images (the real-data ladder), runs progressive forgetting
(r = 0.5, S = 5), predicts x2/x4/x8 with KNOWN and the baselines (TaskVector, LinearFit,
LogFit, ExpFit), adds a matched-noise control per prediction, and scores every starting
point on held-out source images and by linear probes on data-scarce downstream tasks.
Prints the tables and a verdict that opens with the ladder check, with standard errors
clustered by replicate.  Writes results.json, results.md and results.png into --out.  See
docs/demo.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

from ..fileio import output_lock
from ..research.demo import check_lincomb, run_demo, write_outputs
from ..research.demo_config import FINETUNE, PRESETS, PROTOCOLS, TASKS
from ..known.heads import KNOWN
from ..research.lincomb import LinComb
from ..research.report import format_pooled_table
from ..research.stats import MIN_SEEDS
from ..research.transfer import PAPER_ORDER, check_methods


def register(sub) -> None:
    p = sub.add_parser("demo", help="the KNOW pipeline end to end on embedded data",
                       description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: less data and training, 2 replicates x 3 seeds "
                        "(about 1 minute on 2 cores)")
    p.add_argument("--out", default="know-demo", help="output directory (default know-demo)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"paired downstream seeds per task and replicate, >= {MIN_SEEDS} "
                        f"(default 8, --quick 3)")
    p.add_argument("--replicates", type=int, default=None,
                   help="independent pretraining replicates, >= 2 (default 4, --quick 2)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one replicate each at a time (default: the number "
                        "of cores); the numbers do not depend on it")
    p.add_argument("--protocol", choices=PROTOCOLS, default="probe",
                   help="downstream protocol: 'probe' (linear probe, default) or 'finetune' "
                        "(every weight fine-tuned, the paper's: 2,240 fine-tunes of 1-2 s at the default, about 30 minutes on 2 cores)")
    p.add_argument("--known", default=None,
                   help="KNOWN weights (.safetensors, see KNOWN.save); default: the weights "
                        "shipped with the package (KNOWN.pretrained())")
    p.add_argument("--data-dir", default=None,
                   help="directory holding Fashion-MNIST's four IDX files (default: Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated downstream tasks, from {','.join(TASKS)} (default all)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {','.join(PAPER_ORDER)} (default all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed every replicate's draws derive from (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per worker (default 1: these small networks gain "
                        "nothing from more, and lose 10x when another job shares the cores)")
    p.add_argument("--s-ablation", action="store_true",
                   help="also predict with the shipped KNOWN for S = 3 and 4 (the paper's "
                        "Table 6)")
    p.add_argument("--lincomb", default=None, metavar="FILE",
                   help="also predict with a lincomb file (`know meta-train --predictor "
                        "lincomb`), judged as a baseline")
    p.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    p.set_defaults(func=run)


def run(args) -> int:
    config = PRESETS["quick" if args.quick else "default"]
    changes = {"seed": args.seed}
    if args.seeds is not None:
        if args.seeds < MIN_SEEDS:
            raise ValueError(f"--seeds must be >= {MIN_SEEDS} (the paired differences need a "
                             f"standard error), got {args.seeds}")
        changes["seeds"] = args.seeds
    if args.replicates is not None:
        if args.replicates < 2:
            raise ValueError(f"--replicates must be >= 2 (the clustered standard error needs "
                             f"two pretraining replicates), got {args.replicates}")
        changes["replicates"] = args.replicates
    if args.protocol == "finetune":
        changes["protocol"] = FINETUNE
    if args.tasks is not None:
        changes["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.methods is not None:
        changes["methods"] = check_methods(args.methods)
    if args.s_ablation:
        changes["s_ablation"] = True
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    config = replace(config, **changes).check()
    # Loaded before any training, so a missing or unfit KNOWN fails in a second.
    known = source = None
    if "known" in config.methods:
        known = KNOWN.pretrained() if args.known is None else KNOWN.load(args.known)
        source = "KNOWN.pretrained()" if args.known is None else args.known
    lincomb = None if args.lincomb is None else LinComb.load(args.lincomb)
    check_lincomb(lincomb, config)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # Held for the whole run: a second demo into the same --out is refused at once rather
    # than mixing its results.json with this run's results.png.
    with output_lock(args.out):
        try:
            results = run_demo(config, known, known_source=source, lincomb=lincomb,
                               lincomb_source=args.lincomb, data_dir=args.data_dir,
                               jobs=args.jobs, threads=args.threads,
                               progress=not args.quiet, log=log)
        finally:
            torch.set_num_threads(threads)
        paths = write_outputs(results, args.out)
    for name, task in results["tasks"].items():
        print(f"\n## {name}\n")
        print(format_pooled_table(task, results["verdict"]["tasks"][name]["rows"]))
    print("\n" + results["verdict"]["text"])
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - started:.0f} s)")
    return 0
