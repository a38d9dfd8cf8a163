"""Predict KNOW weights for Hugging Face-style sharded checkpoints, then load them back.

Your five checkpoints, in the paper's order (Θ^0, trained on all the data, first), each a
directory with ``model.safetensors.index.json`` and its shards (config and tokenizer files
beside them are copied to the outputs):

    python python/predict_hf_checkpoint.py ck0 ck1 ck2 ck3 ck4 --known known.safetensors --out know

Without paths it first builds a small transformer, writes a 5-snapshot trajectory of it as
sharded bf16 checkpoints in a temporary directory, predicts, and loads the result back into
the model:

    python python/predict_hf_checkpoint.py

Nothing is loaded whole: checkpoints are read a chunk at a time (``--chunk-rows``) and the
outputs written as they are computed, so memory stays at a few hundred MB whatever the model
size.  To split the work over processes or GPUs, launch the same command with torchrun:

    torchrun --nproc-per-node 4 python/predict_hf_checkpoint.py ck0 … --out know --device cuda
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from know_kernels import KNOWN  # noqa: E402
from know_kernels import load_into, predict_files  # noqa: E402
from know_kernels.io.sinks import save_sharded  # noqa: E402
from know_kernels.pipeline.options import DEFAULT_CHUNK_ROWS, METHODS  # noqa: E402

S = 5


class TinyLM(nn.Module):
    """Embedding, a few transformer layers, a final norm and an untied output head."""

    def __init__(self, vocab: int = 512, dim: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 4, 4 * dim, batch_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def make_demo_trajectory(root: Path) -> list[Path]:
    """Θ^0 … Θ^4 of TinyLM: each stage (less data) a step further along a fixed direction,
    plus noise; bf16, sharded into ~100 kB files, with a config.json like a real export."""
    torch.manual_seed(0)
    theta0 = TinyLM().state_dict()
    drift = {k: 1e-3 * torch.randn_like(v) for k, v in theta0.items()}
    paths = []
    for s in range(S):
        state = {k: (v + s * drift[k] + 1e-4 * torch.randn_like(v)).to(torch.bfloat16)
                 for k, v in theta0.items()}
        path = save_sharded(state, root / f"checkpoint-{s}", max_shard_bytes=100_000)
        (path / "config.json").write_text('{"model_type": "tiny-lm", "vocab_size": 512}\n')
        paths.append(path)
    return paths


def copy_companions(theta0: Path, outputs: list[Path]) -> None:
    """Config, tokenizer and other non-weight files of Θ^0's directory, into each output
    directory, so it can be loaded the way Θ^0 is (e.g. ``from_pretrained``)."""
    if not theta0.is_dir():
        return
    for f in theta0.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            for out in outputs:
                if out.is_dir():
                    shutil.copy2(f, out / f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", help=f"{S} checkpoints, Θ^0 first (none: demo)")
    ap.add_argument("--out", default=None, help="output directory (demo: a temporary one)")
    ap.add_argument("--known", default=None, help="KNOWN weights (.safetensors)")
    ap.add_argument("--method", default="known", choices=METHODS)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    ap.add_argument("--out-dtype", default=None, help="e.g. float32 (default: as Θ^0)")
    ap.add_argument("--force", action="store_true", help="replace existing outputs")
    args = ap.parse_args()
    demo = not args.checkpoints
    if not demo and args.out is None:
        ap.error("--out is required with checkpoint paths")
    if not demo and args.method == "known" and args.known is None:
        ap.error("--method known needs --known PATH")
    rank0 = int(os.environ.get("RANK", "0")) == 0

    with tempfile.TemporaryDirectory(prefix="know-demo-") as tmp:
        known = args.known
        if demo:
            print(f"demo: writing a {S}-snapshot trajectory of TinyLM to {tmp}")
            args.checkpoints = make_demo_trajectory(Path(tmp))
            args.out = args.out or str(Path(tmp) / "know")
            if args.method == "known" and known is None:
                print("demo: untrained KNOWN heads (KNOWN.init): this shows the pipeline, "
                      "not the quality of the prediction")
                known = KNOWN.init(S=S, seed=0)
        with tqdm(unit="row", unit_scale=True, disable=not rank0, desc="KNOW predict") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            outputs = predict_files(args.checkpoints, args.out, known, method=args.method,
                                    steps=args.steps, device=args.device, force=args.force,
                                    chunk_rows=args.chunk_rows, out_dtype=args.out_dtype,
                                    progress=progress)
        if not rank0:
            return 0
        copy_companions(Path(args.checkpoints[0]), outputs)
        for out in outputs:
            print(f"wrote {out}")
        if demo:
            model = TinyLM()
            load_into(model, outputs[0])  # strict: every name and shape must match
            logits = model(torch.randint(0, 512, (2, 16)))
            print(f"loaded {outputs[0].name} into TinyLM; forward pass gives {tuple(logits.shape)}"
                  f" logits, all finite: {bool(torch.isfinite(logits).all())}")
        else:
            print("load in training code with know_kernels.load_into(model, "
                  f"{str(outputs[0])!r}), or from_pretrained on that directory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
