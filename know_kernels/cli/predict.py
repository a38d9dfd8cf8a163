"""``know predict CKPT0 CKPT1 … --steps K --out DIR``: one .safetensors (or one directory of
shards) per predicted step, streamed so the model never has to fit in memory; under
``torchrun`` the processes share the work."""
from __future__ import annotations

import os

from tqdm import tqdm

from ..kernels.baselines import DEFAULT_LAMBDA
from ..kernels.nowcast import BACKENDS, PRECISIONS
from ..pipeline.options import DEFAULT_CHUNK_ROWS, METHODS, NONFINITE, OUT_DTYPES
from ..pipeline.predict import predict_files
from ..pipeline.distributed import RankFailed
from ..pipeline.run import PASSTHROUGH, NonFiniteError


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict KNOW weights from forgetting checkpoints",
                       description="Checkpoints in the paper's order: Θ^0 (full data) first, "
                                   "then Θ^1 … Θ^{S-1}. Writes DIR/know_step{k}.safetensors "
                                   "for k = 1 … steps (×1/r, ×1/r², …), or DIR/know_step{k}/ "
                                   "with Θ^0's shard files and index when Θ^0 is sharded. "
                                   "Checkpoints are read a chunk at a time; run under "
                                   "`torchrun --nproc-per-node N -m know_kernels predict …` "
                                   "to split the work over N processes.")
    p.add_argument("checkpoints", nargs="+",
                   help=".safetensors, a torch file (.pt, .pth, .bin, Lightning .ckpt; loaded "
                        "weights-only), a sharded checkpoint (its directory or *.index.json) "
                        "or a model directory (save_pretrained); with more than the KNOWN's "
                        "S, the first S are used")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=1, help="prediction steps (default 1)")
    p.add_argument("--method", default="known", choices=METHODS,
                   help="KNOWN (default) or a baseline extrapolation")
    p.add_argument("--known", default=None,
                   help="KNOWN weights (.safetensors, see `KNOWN.save`); default: the weights "
                        "shipped with the package for S = the number of checkpoints (3, 4 or 5)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="TaskVector's λ (default 0.2)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="lowest precision of the kernels' matrix products: float32 "
                        "(default, within 1e-5 of float64), or the faster tensor-core modes "
                        "tf32 and bf16 (errors in bench/RESULTS.md); on the CPU, bf16 runs "
                        "bfloat16 products where the processor has them (AVX512_BF16; "
                        "`know info` says) and is refused elsewhere, tf32 computes in float32")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="copy entries whose name matches this glob (e.g. 'classifier.*') from "
                        "Θ^0 unchanged; repeatable")
    p.add_argument("--nonfinite", default="error", choices=NONFINITE,
                   help="rows with NaN/Inf: refuse (default) or keep them at Θ^0")
    p.add_argument("--out-dtype", default=None, choices=[str(d).removeprefix("torch.") for d in OUT_DTYPES],
                   help="dtype of every floating-point output (default: Θ^0's, per tensor)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                   help=f"rows predicted per chunk; memory grows with it "
                        f"(default {DEFAULT_CHUNK_ROWS})")
    p.add_argument("--device", default="cpu",
                   help="where to compute: cpu (default) or cuda (each rank its LOCAL_RANK GPU)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    # Under torchrun only rank 0 talks; the others would print the same lines again.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with tqdm(unit="row", unit_scale=True, disable=args.quiet or not rank0,
              desc="KNOW predict") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            targets = predict_files(args.checkpoints, args.out, args.known, steps=args.steps,
                                    method=args.method, lam=args.lam, backend=args.backend,
                                    keep=args.keep, nonfinite=args.nonfinite,
                                    threads=args.threads, precision=args.precision,
                                    out_dtype=args.out_dtype, chunk_rows=args.chunk_rows,
                                    device=args.device, force=args.force, progress=progress)
        except (NonFiniteError, RankFailed) as exc:  # another rank's may be a NonFiniteError
            raise ValueError(str(exc).replace(PASSTHROUGH, "--nonfinite passthrough")) from None
    if rank0:
        for target in targets:
            print(f"wrote {target}")
    return 0
