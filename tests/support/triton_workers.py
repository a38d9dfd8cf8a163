"""Worker processes for the Triton tests (test_nowcast_triton.py, test_vjp_triton.py).

Triton fixes interpreter mode when it is first imported, so the kernel runs happen in
worker processes started with TRITON_INTERPRET set (or unset) before their imports; a test
sends its case there (a module-level function, pickled by name) and asserts on what comes
back.  The fixtures ``interpreter`` and ``compiler`` (tests/kernels/conftest.py) hold one
pool each per test module."""
import concurrent.futures
import multiprocessing
import os


def worker_pool(interpret: bool):
    """One spawned worker whose Triton interprets kernels on the CPU (or compiles them)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()  # start it now, while the environment is set
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return pool


def compile_ptx(kernel, signature, constexprs, cc, config):
    """Runs in the non-interpreting worker: the PTX of ``kernel`` (a module's lazy
    ``kernel``, autotuned or not) for compute capability ``cc`` with one configuration
    ``config``, or None and why not."""
    import triton
    from triton.compiler import ASTSource
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        return None, f"triton's NVIDIA backend is not installed ({exc})"
    block_m, chunk, warps, stages, *maxnreg = config
    constexprs = {**constexprs, "BLOCK_M": block_m, "HCHUNK": chunk}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    options = {"num_warps": warps, "num_stages": stages}
    if maxnreg and maxnreg[0] is not None:
        options["maxnreg"] = maxnreg[0]
    jitted = kernel()
    if isinstance(jitted, triton.runtime.Autotuner):
        jitted = jitted.fn
    compiled = triton.compile(ASTSource(fn=jitted, signature=signature,
                                        constexprs=constexprs),
                              target=GPUTarget("cuda", cc, 32), options=options)
    assert compiled.asm["cubin"], "no cubin produced"
    return compiled.asm["ptx"], ""
