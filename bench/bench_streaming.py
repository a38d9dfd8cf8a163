"""Streaming ``know predict`` on a synthetic model larger than memory.

    python bench/bench_streaming.py                   # 2e9 parameters: ~20 GB of inputs
    python bench/bench_streaming.py --params 2e7      # quick check

1. Writes a synthetic trajectory: 5 bf16 snapshots of an N-parameter model (square weight
   matrices, biases and norm weights), each a Hugging Face-style sharded checkpoint with
   shards of about ``--shard-gb``.  Tensors are generated one at a time and written with the
   streaming safetensors writer, so no snapshot is ever held in memory.  A manifest lets a
   later run with the same settings reuse the files (``--keep``).
2. Runs ``know predict`` on it in a child process (under ``/usr/bin/time -v`` when present,
   else measured with ``getrusage``) and reports wall-clock, rows/s and peak RSS.  rows/s
   divides the predicted rows by the time ``know predict`` took inside the child (opening,
   planning, reading, predicting, writing, fsync), without interpreter start-up.
3. Runs the same predictor in memory on 10M rows of the same dtype in this process, chunk by
   chunk, and compares rows/s.  Targets: peak RSS <= 2 GB, rows/s >= 80% of in-memory.

Prints a block ready for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit  # noqa: E402

from know_kernels import KNOWN  # noqa: E402
from know_kernels.kernels.nowcast import resolve_backend  # noqa: E402
from know_kernels.io.sinks import OutFile, plan_shards, write_index  # noqa: E402
from know_kernels.pipeline.options import DEFAULT_CHUNK_ROWS, METHODS, Options  # noqa: E402
from know_kernels.pipeline.run import predict_rows  # noqa: E402

S = 5
DTYPE = torch.bfloat16
RSS_TARGET = 2 << 30
SPEED_TARGET = 0.8

CHILD = r"""
import sys, time
from know_kernels.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(f"PREDICT_SECONDS {time.perf_counter() - start:.3f}")
sys.exit(code)
"""


def model_layout(params: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer-ish blocks of (hidden x hidden weight, bias, norm weight) up to ``params``."""
    hidden = max(1, min(hidden, int(params ** 0.5)))
    per_block = hidden * hidden + 2 * hidden
    layout = []
    for i in range(max(1, round(params / per_block))):
        layout += [(f"layers.{i}.proj.weight", (hidden, hidden)),
                   (f"layers.{i}.proj.bias", (hidden,)),
                   (f"layers.{i}.norm.weight", (hidden,))]
    return layout


def generate(root: Path, layout, shard_bytes: int, seed: int) -> list[Path]:
    """Snapshot s (paper order: s = 0 is Θ^0, the most data) = base + s * drift, per tensor."""
    shapes = dict(layout)
    shards = plan_shards({n: DTYPE.itemsize * math.prod(s) for n, s in layout}, shard_bytes)
    snaps = [root / f"snapshot{s}" for s in range(S)]
    files = []  # [snapshot][shard]
    for snap in snaps:
        files.append([OutFile(snap / shard, [(n, DTYPE, shapes[n]) for n in names],
                              {"format": "pt"}) for shard, names in shards.items()])
        for f in files[-1]:
            f.create()
            f.open()
    gen = torch.Generator().manual_seed(seed)
    for i, names in enumerate(shards.values()):
        for name in names:
            n = math.prod(shapes[name])
            base = torch.randn(n, generator=gen) * 0.02
            drift = torch.randn(n, generator=gen) * 1e-3
            for s in range(S):
                files[s][i].write(name, 0, (base + s * drift).to(DTYPE))
    total = sum(DTYPE.itemsize * math.prod(shape) for _, shape in layout)
    for snap, per_snap in zip(snaps, files):
        for f in per_snap:
            f.close()
            f.commit()
        write_index(snap / "model.safetensors.index.json", shards, {"total_size": total})
    return snaps


def evict(paths) -> None:
    """Drop these files from the page cache (POSIX_FADV_DONTNEED), for a cold read."""
    for root in paths:
        for f in Path(root).glob("*"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_streaming(args, snaps, known_path, out_dir) -> dict:
    cmd = [sys.executable, "-c", CHILD, "predict", *map(str, snaps), "--out", str(out_dir),
           "--method", args.method, "--backend", args.backend, "--chunk-rows",
           str(args.chunk_rows), "--force", "--quiet"]
    if known_path is not None:
        cmd += ["--known", str(known_path)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    timer = Path("/usr/bin/time").exists()
    if timer:
        cmd = ["/usr/bin/time", "-v"] + cmd
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"know predict failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    if timer:
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1)) * 1024
        how = "/usr/bin/time -v"
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        how = "getrusage(RUSAGE_CHILDREN)"
    predict_s = float(re.search(r"PREDICT_SECONDS ([\d.]+)", res.stdout).group(1))
    return {"wall_s": wall, "predict_s": predict_s, "peak_rss": peak, "rss_from": how}


def run_in_memory(args, known, rows_total: int) -> dict:
    """The predictor alone on rows already in memory, in the same chunks as streaming."""
    torch.manual_seed(0)
    base = torch.randn(rows_total, 1) * 0.02
    drift = torch.randn(rows_total, 1) * 1e-3
    rows = (base + drift * torch.arange(S - 1, -1, -1, dtype=torch.float32)).to(DTYPE)
    del base, drift
    options = Options(method=args.method, steps=1, lam=0.2, backend=args.backend,
                      threads=args.threads, nonfinite="error")
    predict_rows(rows[:1024], "fc", known, options)  # warm-up: first-call costs
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for at in range(0, rows_total, args.chunk_rows):
            predict_rows(rows[at:at + args.chunk_rows], "fc", known, options)
        best = min(best, time.perf_counter() - start)
    return {"rows": rows_total, "seconds": best, "rows_per_s": rows_total / best}




def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=2e9, help="model size (default 2e9)")
    ap.add_argument("--hidden", type=int, default=4096, help="width of the square weights")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size (default 2 GB)")
    ap.add_argument("--dir", default=None, help="where to put the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the data for another run")
    ap.add_argument("--cold", action="store_true",
                    help="evict the inputs from the page cache before predicting")
    ap.add_argument("--method", default="known", choices=METHODS)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    ap.add_argument("--memory-rows", type=float, default=1e7,
                    help="rows of the in-memory comparison (default 1e7)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each measurement; the fastest counts (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    layout = model_layout(int(args.params), args.hidden)
    params = sum(math.prod(shape) for _, shape in layout)
    rows = sum(math.prod(shape) for name, shape in layout if "proj" in name)
    data_bytes = params * DTYPE.itemsize * (S + 1)  # five inputs and one output
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="know-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"params": params, "hidden": args.hidden, "shard_gb": args.shard_gb,
                "seed": args.seed, "dtype": str(DTYPE)}
    known = KNOWN.init(S=S, seed=args.seed) if args.method == "known" else None
    known_path = None
    try:
        snaps = [root / f"snapshot{s}" for s in range(S)]
        manifest_path = root / "manifest.json"
        if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
            print(f"reusing the trajectory in {root}")
        else:
            free = shutil.disk_usage(root).free
            if free < data_bytes * 1.05:
                sys.exit(f"{root}: needs {data_bytes / 1e9:.1f} GB free, has {free / 1e9:.1f} GB")
            start = time.perf_counter()
            generate(root, layout, int(args.shard_gb * 1e9), args.seed)
            manifest_path.write_text(json.dumps(manifest))
            print(f"generated {params:.3g} parameters x {S} snapshots "
                  f"({params * DTYPE.itemsize * S / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
        if known is not None:
            known_path = root / "known.safetensors"
            known.save(known_path)
        runs = []
        for _ in range(args.repeat):
            if args.cold:
                evict(snaps)
            runs.append(run_streaming(args, snaps, known_path, root / "out"))
        stream = min(runs, key=lambda r: r["predict_s"])
        stream["peak_rss"] = max(r["peak_rss"] for r in runs)
        memory = run_in_memory(args, known, int(min(args.memory_rows, max(rows, 1))))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    backend = (resolve_backend(args.backend, torch.device("cpu"), DTYPE)
               if args.method == "known" else f"{args.method} (float64 baseline)")
    stream_rate = rows / stream["predict_s"]
    ratio = stream_rate / memory["rows_per_s"]
    print()
    print(f"### Streaming predict, {params:.3g} parameters ({datetime.date.today()})")
    print()
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {args.threads or torch.get_num_threads()}")
    print(f"- command: `python bench/bench_streaming.py {' '.join(sys.argv[1:])}`")
    print(f"- commit: {commit()}")
    print(f"- model: {params:,} parameters, {rows:,} predicted rows, {S} bf16 snapshots of "
          f"{params * DTYPE.itemsize / 1e9:.2f} GB in shards of <= {args.shard_gb} GB; "
          f"method {args.method}, backend {backend}, chunk {args.chunk_rows} rows"
          f"{', cold page cache' if args.cold else ''}")
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    best = f" (best of {args.repeat})" if args.repeat > 1 else ""
    print(f"| wall-clock (child process, incl. start-up){best} | {stream['wall_s']:.2f} s | |")
    print(f"| predict time (inside the child) | {stream['predict_s']:.2f} s | |")
    print(f"| streaming rows/s | {stream_rate:,.0f} | |")
    print(f"| in-memory rows/s ({memory['rows']:,} rows) | {memory['rows_per_s']:,.0f} | |")
    print(f"| streaming / in-memory | {ratio:.2f} | >= {SPEED_TARGET} "
          f"{'PASS' if ratio >= SPEED_TARGET else 'FAIL'} |")
    print(f"| peak RSS ({stream['rss_from']}, max of runs) | {stream['peak_rss'] / 2**20:,.0f} MiB | "
          f"<= {RSS_TARGET / 2**30:.0f} GiB {'PASS' if stream['peak_rss'] <= RSS_TARGET else 'FAIL'} |")


if __name__ == "__main__":
    main()
