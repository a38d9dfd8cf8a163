"""``know meta-train STORE --out PATH`` and ``know meta-eval STORE --known PATH``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ..fileio import atomic_path, output_lock, sweep_stale, write_json
from ..known.heads import KNOWN, PRETRAINED_S
from ..kernels.l1 import LOSS_SPACES
from ..research.metatrain import (MetaTrainConfig, baseline_predictors, known_predictor,
                                  meta_train, prediction_errors, split_runs, window_count)
from ..research.task_metatrain import (INITS, PREDICTORS, TaskTrainConfig, meta_train_task,
                                       validate)
from ..research.lincomb import LinComb
from ..research.task_objective import OBJECTIVES
from ..kernels.nowcast import BACKENDS
from ..kernels.reference import NORMS
from ..known.routing import HEADS
from ..io.store import MetaDataset

AUTHORS_FILES = {"conv": "KNOWN_Conv.h5", "fc": "KNOWN_FC.h5", "bias": "KNOWN_Bias.h5"}


def _csv(text: str) -> tuple:
    return tuple(t for t in text.split(",") if t)


def _add_split(p) -> None:
    p.add_argument("--val-arch", type=_csv, default=MetaTrainConfig.val_architectures,
                   help="held-out architectures, comma separated (default: "
                        f"{','.join(MetaTrainConfig.val_architectures)})")
    p.add_argument("--val-dataset", type=_csv, default=MetaTrainConfig.val_datasets,
                   help="held-out datasets, comma separated (default: "
                        f"{','.join(MetaTrainConfig.val_datasets) or 'none'})")
    p.add_argument("--authors", default=None,
                   help="directory with the authors' KNOWN_{Conv,FC,Bias}.h5, to compare with")


def register(sub) -> None:
    p = sub.add_parser("meta-train", help="meta-train KNOWN on a collected meta-dataset")
    p.add_argument("store", help="meta-dataset directory (from `know collect`)")
    p.add_argument("--out", required=True, help="where to write the KNOWN (.safetensors)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {MetaTrainConfig.epochs} (l1), {TaskTrainConfig.epochs} "
                        f"(task, mixed, lincomb)")
    p.add_argument("--batch-size", type=int, default=MetaTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=None,
                   help=f"default {MetaTrainConfig.lr:g} (l1), {TaskTrainConfig.lr:g} (task)")
    p.add_argument("--norm", choices=NORMS, default=MetaTrainConfig.norm)
    p.add_argument("--loss-space", choices=LOSS_SPACES, default=MetaTrainConfig.loss_space)
    p.add_argument("--heads", type=_csv, default=HEADS)
    p.add_argument("--S", type=int, default=MetaTrainConfig.S)
    p.add_argument("--seed", type=int, default=MetaTrainConfig.seed)
    p.add_argument("--sign-flip", action=argparse.BooleanOptionalAction,
                   default=MetaTrainConfig.sign_flip,
                   help="negate a random half of the training windows with their targets "
                        "(default: off)")
    p.add_argument("--backend", choices=BACKENDS + ("auto",), default=MetaTrainConfig.backend,
                   help="l1_loss backend (default auto: the fused kernel for the device)")
    p.add_argument("--checkpoint-every", type=int, default=MetaTrainConfig.checkpoint_every,
                   help="steps between the checkpoints (OUT.ckpt) that --resume continues "
                        f"from (default {MetaTrainConfig.checkpoint_every}; also after each head)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.ckpt (also when it was "
                        "interrupted after writing OUT: OUT.ckpt is removed last)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    t = p.add_argument_group(
        "the task objective", "score each prediction by the loss of the run's network on "
        "images it never saw (needs a store collected with --preset replay; "
        "docs/collection.md)")
    t.add_argument("--objective", choices=OBJECTIVES, default="l1",
                   help="l1: the paper's, per head (default); task; mixed: l1 + beta*task")
    t.add_argument("--predictor", choices=PREDICTORS, default="known",
                   help="known (default), or lincomb: S learned coefficients per head")
    t.add_argument("--init", choices=INITS, default=TaskTrainConfig.init,
                   help="KNOWN's start for task/mixed: l1 = the shipped KNOWN (default), "
                        "fresh = the authors' initialisation")
    t.add_argument("--beta", type=float, default=TaskTrainConfig.beta)
    t.add_argument("--runs-per-batch", type=int, default=TaskTrainConfig.runs_per_batch)
    t.add_argument("--images", type=int, default=TaskTrainConfig.images,
                   help="scored images per window")
    t.add_argument("--unroll", type=int, default=TaskTrainConfig.unroll,
                   help="predicted steps scored from the inference window")
    t.add_argument("--data-dir", default=None, help="where the runs' datasets are")
    t.add_argument("--validation", action=argparse.BooleanOptionalAction, default=True,
                   help="score the held-out runs when done (default); --no-validation "
                        "when they are held out for later, e.g. while selecting settings "
                        "with `know meta-eval --task` on other runs")
    _add_split(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser("meta-eval", help="validation table of a KNOWN against the baselines")
    e.add_argument("store", help="meta-dataset directory")
    e.add_argument("--known", action="append", default=[],
                   help="KNOWN weights (.safetensors); with --task, repeatable")
    e.add_argument("--lincomb", action="append", default=[],
                   help="with --task: a lincomb file from `know meta-train --predictor "
                        "lincomb` (repeatable)")
    e.add_argument("--task", action="store_true",
                   help="score each predictor's Θ̂^{-1}, Θ̂^{-2} by accuracy and cross-entropy "
                        "of the runs' networks on their extra pools E, beside the shipped "
                        "KNOWN (a replayable store)")
    e.add_argument("--data-dir", default=None, help="where the runs' datasets are (--task)")
    e.add_argument("--json", default=None, metavar="FILE",
                   help="with --task: also write the table, per run and pooled, to FILE")
    _add_split(e)
    e.set_defaults(func=run_eval)


def validation_table(store: MetaDataset, known: KNOWN, val_runs,
                     authors: Optional[str]) -> tuple[dict, dict]:
    """Per head: mean L1 to the true next snapshot for KNOWN, the baselines and, when given,
    the authors' released heads (under both normalisations), over all validation windows
    pooled; and the same per validation run, with its window count."""
    authors_known = None
    if authors:
        files = {h: Path(authors) / f for h, f in AUTHORS_FILES.items()}
        authors_known = KNOWN.from_keras_h5(**{h: p for h, p in files.items() if p.is_file()})
    table, per_run = {}, {}
    for head_name, head in known.items():
        predictors = {"KNOWN": known_predictor(head), **baseline_predictors()}
        if authors_known is not None and head_name in authors_known:
            for norm in ("raw", "wnn"):
                predictors[f"authors ({norm})"] = known_predictor(authors_known[head_name], norm)
        runs = {}
        for run in val_runs:
            n = window_count(store, head_name, [run], head.S)
            if n:
                runs[run] = {**prediction_errors(store, [run], head_name, head.S, predictors),
                             "windows": n}
        if not runs:
            raise ValueError(f"no validation windows for head {head_name!r}")
        total = sum(r["windows"] for r in runs.values())
        table[head_name] = {name: sum(r[name] * r["windows"] for r in runs.values()) / total
                            for name in predictors}
        per_run[head_name] = runs
    return table, per_run


def format_table(table: dict, per_run: dict) -> str:
    """The pooled means (ratio to copy-last), and per predictor how many validation runs it
    beats copy-last in and its median per-run ratio: pooled means weigh runs by their
    windows and their step sizes, so a few big, fast-moving runs can decide them."""
    lines = []
    for head_name, scores in table.items():
        base = scores["copy-last"]
        runs = per_run[head_name].values()
        lines.append(f"head {head_name}: mean L1 to the true next snapshot (ratio to copy-last); "
                     f"per run: below copy-last in, median ratio ({len(runs)} runs)")
        for name, value in scores.items():
            ratios = sorted(r[name] / r["copy-last"] for r in runs)
            wins = sum(x < 1.0 for x in ratios)
            lines.append(f"  {name:<16} {value:.4e}  ({value / base:.3f})   "
                         f"{wins:>3}/{len(ratios)}  {statistics.median(ratios):.3f}")
    return "\n".join(lines)


def _report(store, known, args) -> tuple[dict, dict]:
    _, val_runs = split_runs(store, args.val_arch, args.val_dataset)
    if not val_runs:
        raise ValueError("no validation runs: no run matches --val-arch/--val-dataset")
    table, per_run = validation_table(store, known, val_runs, args.authors)
    print(f"validation runs: {len(val_runs)} (held out: architectures {list(args.val_arch)}, "
          f"datasets {list(args.val_dataset)})")
    print(format_table(table, per_run))
    return table, per_run


def run_train(args) -> int:
    out = Path(args.out)
    # One run at a time per OUT (it and OUT.ckpt are rewritten throughout).
    with output_lock(out, file=True):
        return _train(args, out)


def _train(args, out: Path) -> int:
    ckpt = out.with_name(out.name + ".ckpt")
    report = out.with_name(out.name + ".validation.json")
    for path in (out, ckpt, report):
        sweep_stale(path)   # what a killed run was writing
    # A run removes its checkpoint last, so OUT beside OUT.ckpt is an unfinished run's.
    if out.exists() and not args.force and not (args.resume and ckpt.is_file()):
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    store = MetaDataset(args.store, create=False)
    if args.objective != "l1" or args.predictor != "known":
        return _train_task(args, store, out, ckpt, report)
    cfg = MetaTrainConfig(S=args.S, norm=args.norm, loss_space=args.loss_space,
                          heads=tuple(args.heads), batch_size=args.batch_size,
                          lr=MetaTrainConfig.lr if args.lr is None else args.lr,
                          epochs=MetaTrainConfig.epochs if args.epochs is None else args.epochs,
                          seed=args.seed, val_architectures=tuple(args.val_arch),
                          val_datasets=tuple(args.val_dataset), backend=args.backend,
                          sign_flip=args.sign_flip,
                          checkpoint_every=args.checkpoint_every).check()
    bars = {}

    def progress(head, step, total, loss):
        bar = bars.get(head)
        if bar is None:
            bar = bars[head] = tqdm(total=total, desc=f"meta-train {head}", unit="batch")
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4g}")

    try:
        known, state = meta_train(store, cfg, checkpoint=ckpt, resume=args.resume,
                                  progress=progress)
    finally:   # an error then starts a line of its own
        for bar in bars.values():
            bar.close()
    known.provenance = {"source": "know meta-train", "config": dataclasses.asdict(cfg),
                        "store": store.summary().get("rows", {}),
                        "train_seconds": round(state.seconds, 1)}
    table, per_run = _report(store, known, args)
    known.provenance["validation"] = table
    known.save(out)
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps({"validation": table, "per_run": per_run,
                                   "train_seconds": state.seconds,
                                   "history": state.history}, indent=1))
    ckpt.unlink(missing_ok=True)
    print(f"wrote {out} (training took {state.seconds:.0f} s)")
    return 0


def _train_task(args, store: MetaDataset, out: Path, ckpt: Path, report: Path) -> int:
    given = {k: getattr(args, k) for k in ("epochs", "lr") if getattr(args, k) is not None}
    cfg = TaskTrainConfig(S=args.S, objective=args.objective, predictor=args.predictor,
                          init=args.init, beta=args.beta, runs_per_batch=args.runs_per_batch,
                          images=args.images, unroll=args.unroll, norm=args.norm,
                          seed=args.seed, val_architectures=tuple(args.val_arch),
                          val_datasets=tuple(args.val_dataset), backend=args.backend,
                          checkpoint_every=args.checkpoint_every, **given).check()
    _, val_runs = split_runs(store, cfg.val_architectures, cfg.val_datasets)
    bar = tqdm(desc=f"meta-train {cfg.predictor} ({cfg.objective})", unit="batch")

    def progress(step, total, loss):
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4g}")

    try:
        predictor, state = meta_train_task(store, cfg, checkpoint=ckpt, resume=args.resume,
                                           data_dir=args.data_dir, progress=progress)
    finally:
        bar.close()
    provenance = {"source": "know meta-train", "config": dataclasses.asdict(cfg),
                  "train_seconds": round(state.seconds, 1)}
    table = None
    if val_runs and args.validation:
        table = validate(store, {cfg.predictor: predictor}, val_runs, S=cfg.S,
                         data_dir=args.data_dir, backend=cfg.backend)
        print(format_task_table(table))
        provenance["validation"] = table["pooled"]
    if isinstance(predictor, KNOWN):
        predictor.provenance = provenance
        predictor.save(out)
    else:
        predictor.save(out, provenance)
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps({"validation": table, "train_seconds": state.seconds,
                                   "history": state.history}, indent=1))
    ckpt.unlink(missing_ok=True)
    print(f"wrote {out} (training took {state.seconds:.0f} s)")
    return 0


def format_task_table(table: dict) -> str:
    """Mean change from Θ^0 over the validation runs, on their extra pools E."""
    n = len(table["runs"])
    lines = [f"validation runs: {n}; change from Θ^0 on the extra pool E, mean over runs "
             f"± s.e. (runs better than Θ^0)"]
    width = max(len(name) for name in table["pooled"])
    for name, steps in table["pooled"].items():
        for row in steps:
            lines.append(f"  {name:<{width}} step {row['step']}: accuracy "
                         f"{row['d_acc']:+.2f} ± {row['d_acc_se']:.2f} points "
                         f"({row['acc_better']}/{n}), cross-entropy {row['d_ce']:+.4f} ± "
                         f"{row['d_ce_se']:.4f} ({row['ce_better']}/{n})")
    return "\n".join(lines)


def run_eval(args) -> int:
    store = MetaDataset(args.store, create=False)
    if not args.task:
        if len(args.known) != 1 or args.lincomb:
            raise ValueError("meta-eval without --task takes exactly one --known and no "
                             "--lincomb")
        _report(store, KNOWN.load(args.known[0]), args)
        return 0
    predictors = {Path(p).stem: KNOWN.load(p) for p in args.known}
    predictors.update({Path(p).stem: LinComb.load(p) for p in args.lincomb})
    if len(predictors) != len(args.known) + len(args.lincomb):
        raise ValueError("two predictor files share a name; give them distinct file names")
    if not predictors:
        raise ValueError("--task needs at least one --known or --lincomb file")
    windows = {name: ({h.S for _, h in p.items()} if isinstance(p, KNOWN) else {p.S})
               for name, p in predictors.items()}
    sizes = set().union(*windows.values())
    if len(sizes) != 1:
        raise ValueError(f"the predictors read different numbers of snapshots: {windows}")
    (S,) = sizes
    if S in PRETRAINED_S:
        predictors = {"KNOWN (shipped)": KNOWN.pretrained(S), **predictors}
    _, val_runs = split_runs(store, args.val_arch, args.val_dataset)
    if not val_runs:
        raise ValueError("no validation runs: no run matches --val-arch/--val-dataset")
    table = validate(store, predictors, val_runs, S=S, data_dir=args.data_dir)
    print(format_task_table(table))
    if args.json:
        write_json(table, args.json)
    return 0
