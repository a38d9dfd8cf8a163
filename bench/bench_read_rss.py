"""Peak resident memory of reading one large safetensors tensor in chunks, three ways: the
package's positional reads (``FileSource.read``), ``safetensors.safe_open(...).get_slice``,
and slicing a memory map of the file.  The reason ``io/formats.py`` parses the header itself.

    python bench/bench_read_rss.py              # a 1 GiB float32 tensor, 4 MiB chunks
    python bench/bench_read_rss.py --gib 4

Each way runs in its own process, and the file is written by another, so that peaks do not
mix (a child starts from its parent's peak: Linux carries ``ru_maxrss`` across fork and exec).
"""
import argparse
import mmap
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHUNK = 1 << 20  # float32 elements per read


def read(way: str, path: Path, n: int) -> None:
    buf = torch.empty(CHUNK)
    if way == "positional":
        from know_kernels.io.sources import open_checkpoint
        source = open_checkpoint(path)
        for s in range(0, n, CHUNK):
            source.read("w", s, min(n, s + CHUNK), buf[:min(n, s + CHUNK) - s])
    elif way == "safe_open":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            sl = f.get_slice("w")
            for s in range(0, n, CHUNK):
                buf[:min(n, s + CHUNK) - s].copy_(sl[s:s + CHUNK])
    else:
        from know_kernels.io.formats import safetensors_refs
        ref = safetensors_refs(path)[0]["w"]
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            data = torch.frombuffer(mm, dtype=torch.uint8)[ref.offset:ref.offset + 4 * n]
            flat = data.view(torch.float32)
            for s in range(0, n, CHUNK):
                buf[:min(n, s + CHUNK) - s].copy_(flat[s:s + CHUNK])
            del data, flat
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = int(args.gib * (1 << 30)) // 4
    if args.way == "write":
        from safetensors.torch import save_file
        save_file({"w": torch.randn(n)}, args.path)
        return
    if args.way:
        read(args.way, Path(args.path), n)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        subprocess.run([sys.executable, __file__, "--gib", str(args.gib), "--way", "write",
                        "--path", str(path)], check=True)
        print(f"reading a {args.gib:g} GiB float32 tensor in {CHUNK * 4 >> 20} MiB chunks")
        for way in ("positional", "safe_open", "mmap"):
            peak = subprocess.run([sys.executable, __file__, "--gib", str(args.gib), "--way", way,
                                   "--path", str(path)], capture_output=True, text=True,
                                  check=True).stdout.strip()
            print(f"  {way:<10} peak RSS {peak} MiB")


if __name__ == "__main__":
    main()
