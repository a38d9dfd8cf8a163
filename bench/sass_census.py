"""What the GPU kernels ask of an SM, read off their machine code: no GPU needed.

    python bench/sass_census.py                    # CUDA kernels and Triton configs, sm_90
    python bench/sass_census.py --arch 80
    python bench/sass_census.py --cuda-root DIR    # the CUDA kernels of another checkout

Each kernel is compiled for the architecture (nvcc -cubin for csrc/cuda/nowcast.cu, the
Triton compiler for every autotune configuration at S = 5, wnn, bf16 rows, one step) and
disassembled with cuobjdump (Triton's copy).  Reported per kernel:

- registers per thread and spill bytes (ptxas), and the warps per SM that the registers
  (65,536 per SM, allocated per warp in units of 256) and block size allow, capped at 64;
- the hidden-unit loop (the innermost loops that hold the exps or the tensor-core
  products, one per stream):
  instructions per trip, and its tensor-core, SFU and memory ones;
- per row: the warp instructions of those loops (exact: they have no branches) plus those
  of the rest of a tile's work (its static count: an upper bound for one step, as every
  other instruction runs at most once per tile and step), divided by the rows a warp
  handles per tile;
- the issue bound: an SM issues at most 4 warp instructions per clock (one per
  scheduler), so a kernel needs at least (instructions per row) / 4 SM clocks per row.
  A measured time well above it means latency, not instruction count, bounds the kernel.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
ISSUE_PER_CLOCK = 4
TENSOR_OPS = ("HMMA", "HGMMA")


def triton_bin(tool: str) -> str:
    """A CUDA binary tool: on PATH, else the copy that ships with Triton."""
    found = shutil.which(tool)
    if found:
        return found
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        sys.exit(f"{tool} is neither on PATH nor shipped with triton ({path})")
    return str(path)


def opcode(text: str) -> str:
    """'@!P0 HMMA.1688.F32.TF32 R4, ...' -> 'HMMA'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction)] from cuobjdump -sass output."""
    out = {}
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(a, 16), t.strip())
                     for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    return out


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: a branch back to a lower address."""
    found = []
    for address, text in code:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            found.append((int(m.group(1), 16), address))
    return found


def count(code, lo, hi) -> collections.Counter:
    return collections.Counter(opcode(t) for a, t in code if lo <= a <= hi)


def census(code, *, trips: int, rows_per_warp: int, persistent: bool) -> dict:
    """Per-row instruction counts of one kernel (module docstring).  ``trips``: hidden
    loop trips per stream; ``persistent``: the tile is the outermost loop around the hidden
    loops (else the whole kernel runs once per tile)."""
    all_loops = loops(code)
    exps = [(lo, hi) for lo, hi in all_loops
            if any(count(code, lo, hi)[op] for op in ("MUFU", *TENSOR_OPS))]
    hot = [(lo, hi) for lo, hi in exps
           if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in exps)]
    if len(hot) != 2:
        raise RuntimeError(f"expected one hidden-unit loop per stream, found {len(hot)}")
    if persistent:
        around = [(lo, hi) for lo, hi in all_loops
                  if all(lo <= h0 and h1 <= hi for h0, h1 in hot)]
        region = (min(lo for lo, _ in around), max(hi for _, hi in around))
    else:
        region = (code[0][0], code[-1][0])
    loop_counts = [count(code, lo, hi) for lo, hi in hot]
    per_trip = sum(sum(c.values()) for c in loop_counts) / 2
    hot_total = trips * sum(sum(c.values()) for c in loop_counts)
    rest = sum(count(code, *region).values()) - sum(sum(c.values()) for c in loop_counts)
    trip = loop_counts[0]
    return {
        "trip": per_trip,
        "trip_tensor": sum(trip[op] for op in TENSOR_OPS),
        "trip_mufu": trip["MUFU"],
        "trip_lds": trip["LDS"],
        "trip_ldg": trip["LDG"],
        "trip_local": trip["LDL"] + trip["STL"],
        "hot_row": hot_total / rows_per_warp,
        "rest_row": rest / rows_per_warp,
    }


def warps_per_sm(regs: int, warps_per_block: int, blocks_cap: int = 32) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(blocks_cap, REGS_PER_SM // (per_warp * warps_per_block))
    return min(MAX_WARPS_PER_SM, blocks * warps_per_block)


def resources(cuobjdump: str, binary: Path, arch: int) -> dict[str, tuple[int, int]]:
    """Kernel name -> (registers, stack bytes) from cuobjdump -res-usage."""
    text = subprocess.run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", str(binary)],
                          capture_output=True, text=True, check=True).stdout
    out = {}
    for name, regs, stack in re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+)", text):
        out[name] = (int(regs), int(stack))
    return out


def disassemble(cuobjdump: str, binary: Path, arch: int) -> dict[str, list[tuple[int, str]]]:
    return functions(subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", str(binary)],
                                    capture_output=True, text=True, check=True).stdout)


def print_row(label, regs, stack, warps, c) -> None:
    total = c["hot_row"] + c["rest_row"]
    print(f"{label:34s} {regs:4d} {stack:5d} {warps:5d} {c['trip']:6.0f} {c['trip_tensor']:4d} "
          f"{c['trip_mufu']:4d} {c['trip_lds']:4d} {c['trip_ldg']:4d} {c['trip_local']:4d} "
          f"{c['hot_row']:7.1f} {c['rest_row']:7.1f} {total / ISSUE_PER_CLOCK:7.1f}")


HEADER = (f"{'kernel':34s} {'regs':>4s} {'stack':>5s} {'warps':>5s} {'trip':>6s} {'mma':>4s} "
          f"{'mufu':>4s} {'lds':>4s} {'ldg':>4s} {'ldl':>4s} {'hot/row':>7s} {'rest/row':>7s} "
          f"{'clk/row':>7s}")


def cuda_census(binary: Path, arch: int) -> list[tuple[str, int, int, int, dict]]:
    """(label, registers, stack bytes, warps per SM, census) of every instantiation of the
    CUDA nowcast kernel in a cubin or object file: 8 warps per block, 32 rows per warp
    tile, 4 trips of the hidden loop (two slices each) per stream."""
    cuobjdump = triton_bin("cuobjdump")
    usage = resources(cuobjdump, binary, arch)
    rows = []
    for name, code in disassemble(cuobjdump, binary, arch).items():
        m = re.search(r"nowcast_kernelILb([01])ELi(\d+)E(?:Li(\d+)E)?", name)
        if not m:
            continue
        precise, second, blocks = m.group(1) == "1", int(m.group(2)), m.group(3)
        if blocks is None:  # kernels templated on <precise, exp mode> (before the variants)
            label = f"{'precise' if precise else 'fast'} exp={('sfu', 'poly', 'mixed')[second]}"
        else:
            label = (f"{'precise' if precise else 'fast'} S={second or 'any'} "
                     f"blocks/SM={blocks}")
        regs, stack = usage[name]
        rows.append((label, regs, stack, warps_per_sm(regs, 8),
                     census(code, trips=4, rows_per_warp=32, persistent=True)))
    return rows


def cuda_kernels(arch: int, cuda_root: Path, tmp: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("CUDA kernels: nvcc is not installed")
        return
    cubin = tmp / "nowcast.cubin"
    src = cuda_root / "csrc" / "cuda" / "nowcast.cu"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}",
                    "-I", str(src.parent), "-I", str(src.parent.parent), str(src),
                    "-o", str(cubin)], check=True)
    print(f"CUDA kernels of {src} (sm_{arch}):")
    print(HEADER)
    for row in cuda_census(cubin, arch):
        print_row(*row)


def triton_kernels(arch: int, precisions: list[str]) -> None:
    """Every autotune configuration of the Triton nowcast kernel."""
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError as exc:
        print(f"Triton kernels: triton's NVIDIA backend is not importable ({exc})")
        return
    from know_kernels.kernels.ops import nowcast_triton as nt
    from know_kernels.kernels.reference import HIDDEN
    cuobjdump = triton_bin("cuobjdump")
    signature = {"rows_ptr": "*bf16", "packed_ptr": "*fp32", "out_ptr": "*fp32", "N": "i64",
                 "steps": "i32", "n_bucket": "i32"}
    print(f"Triton kernels (triton {triton.__version__}, sm_{arch}, S = 5, wnn, bf16 rows):")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            for block_m, chunk, warps, stages, maxnreg in nt.AUTOTUNE_CONFIGS:
                constexprs = {"S": 5, "KP": 16, "WNN": True, "ALL_STEPS": False,
                              "PRECISION": precision, "BLOCK_M": block_m, "HCHUNK": chunk}
                options = {"num_warps": warps, "num_stages": stages}
                if maxnreg is not None:
                    options["maxnreg"] = maxnreg
                compiled = triton.compile(
                    ASTSource(fn=nt.kernel().fn, constexprs=constexprs,
                              signature={**signature, **{k: "constexpr" for k in constexprs}}),
                    target=GPUTarget("cuda", arch, 32), options=options)
                cubin = Path(tmp) / "kernel.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                (name, code), = disassemble(cuobjdump, cubin, arch).items()
                regs, stack = resources(cuobjdump, cubin, arch)[name]
                # Shared memory bounds the blocks per SM too (1 KB reserved per block).
                smem = compiled.metadata.shared + 1024
                blocks_cap = (228 if arch >= 90 else 164) * 1024 // smem
                c = census(code, trips=HIDDEN // chunk, rows_per_warp=block_m // warps,
                           persistent=False)
                label = (f"{precision} M={block_m} H={chunk} w={warps} st={stages}"
                         + (f" r={maxnreg}" if maxnreg else ""))
                print_row(label, regs, stack, warps_per_sm(regs, warps, blocks_cap), c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (80, 90)")
    parser.add_argument("--cuda-root", type=Path, default=ROOT,
                        help="checkout whose csrc/cuda/nowcast.cu to read (default: this one)")
    parser.add_argument("--precisions", default="tf32,bf16,ieee",
                        help="Triton input precisions, comma-separated")
    args = parser.parse_args()
    print("columns: registers per thread, stack (spill) bytes, warps per SM the registers "
          "allow; per trip of a hidden loop: instructions, tensor-core, SFU, shared loads, "
          "global loads, local (spill) accesses; per row: warp instructions of the hidden "
          "loops and of the rest (upper bound), and the SM clocks per row at 4 issues per "
          "clock")
    with tempfile.TemporaryDirectory() as tmp:
        cuda_kernels(args.arch, args.cuda_root, Path(tmp))
    print()
    triton_kernels(args.arch, args.precisions.split(","))


if __name__ == "__main__":
    main()
