"""trainer.compile: torch.compile of the model's transformer blocks, and the compile time it costs.

Why the blocks and not DeepSpeed's `engine.compile()` (which compiles the whole module): the blocks hold nearly all
the arithmetic, and they are the one part whose graph does not change from step to step. The rest of a forward
reads host-side values that do (a packed row's example lengths, whether a batch has padding, the task's loss
bookkeeping), and a whole-module graph would be guarded on them and recompile. Each block is compiled in place
(`nn.Module.compile`), so parameter names, state dicts, checkpoints, peft's LoRA layers and ZeRO-3's hooks see
the same modules as in eager mode; activation checkpointing wraps the compiled block (its recompute runs the
compiled code again). Shapes are dynamic (`dynamic=True`): one graph serves every batch length and micro batch
size, with no per-length recompiles and no length bucketing. Under ZeRO-3 the parameter gather/release hooks run
eagerly (DeepSpeed marks them `torch.compiler.disable`), which splits each block's graph at every Linear.
Packed attention runs eagerly between the graphs for the same reason (see `finetune.model.gptj.packed_attention`).
"""
from __future__ import annotations

import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from finetune.config import ConfigError

_FIX = "or set trainer.compile=false to train eagerly (same results, no compile step)"


def check_toolchain(device_type: str) -> None:
    """Raise ConfigError when torch.compile's inductor backend cannot build kernels on `device_type` ("cpu" needs a
    C++ compiler and Python's headers; "cuda" needs Triton), before anything is built or trained."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"trainer.compile=true: torch.compile does not support this Python/torch ({torch.__version__}); "
            f"use a Python version that torch {torch.__version__} supports for compile, {_FIX}."
        )
    if device_type == "cpu":
        from torch._inductor import config as inductor_config
        from torch._inductor import exc
        from torch._inductor.cpp_builder import cpp_compiler_search

        candidates = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, (list, tuple)) else (
            inductor_config.cpp.cxx,)
        try:
            cpp_compiler_search(tuple(candidates))
        except exc.InvalidCxxCompiler:
            names = ", ".join(str(c) for c in candidates if c) or "g++"
            raise ConfigError(
                f"trainer.compile=true needs a C++ compiler on CPU (torch.compile's inductor builds each graph "
                f"into C++), but {names} was not found or does not run (the CXX environment variable picks "
                f"another one); install one (Debian/Ubuntu: apt-get install g++), {_FIX}."
            ) from None
        header = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not header.is_file():
            raise ConfigError(
                f"trainer.compile=true needs Python's C headers on CPU (inductor's kernels include {header}, "
                f"which is missing); install them (Debian/Ubuntu: apt-get install python3-dev), {_FIX}."
            )
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "trainer.compile=true needs Triton on a GPU (torch.compile's inductor writes its GPU kernels in "
                f"Triton), but it is not installed or does not match this GPU; pip install triton (the version "
                f"torch {torch.__version__} was built with), {_FIX}."
            )


def compile_blocks(model: nn.Module, *, backend: str = "inductor") -> int:
    """Compile every GPT-J block of `model` in place (see the module docstring); returns how many. `backend`:
    torch.compile's (tests check Dynamo's guards with "aot_eager", which builds no kernels)."""
    from torch.fx.experimental import _config as shape_config

    from finetune.model.gptj import GPTJBlock

    # Dynamic shapes give sizes that are equal when first traced one symbol ("duck shaping"): a micro batch of 4
    # rows would share the symbol of the tiny model's 4 rotary frequencies, which is a constant, and every other
    # micro batch size would recompile. Each size gets its own symbol instead (a process-wide torch setting).
    shape_config.use_duck_shape = False
    separate_cache_per_cpu_capability()
    blocks = [module for module in model.modules() if isinstance(module, GPTJBlock)]
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return len(blocks)


@dataclass
class _Totals:
    compiles: int = 0  # compilations started: traced frames (graph breaks and recompiles count) and lazy backwards
    seconds: float = 0.0
    started: float = 0.0


_TOTALS = _Totals()


def _start(_: Any) -> None:
    _TOTALS.compiles += 1
    _TOTALS.started = time.perf_counter()


def _end(_: Any) -> None:
    _TOTALS.seconds += time.perf_counter() - _TOTALS.started


def _process_totals() -> _Totals:
    """Compile count and wall time of this process, from torch's compile start/end callbacks. They cover Dynamo's
    tracing, AOT autograd and inductor's code generation and builds, and the backward graphs that compile at their
    first backward. Registered again if `torch._dynamo.reset()` cleared them."""
    from torch._dynamo.callback import callback_handler

    if _start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_start)
        callback_handler.register_end_callback(_end)
    return _TOTALS


class CompileWatch:
    """Compilations and their seconds since this watch was made (several runs may share one process)."""

    def __init__(self) -> None:
        totals = _process_totals()
        self._base = (totals.compiles, totals.seconds)

    @property
    def compiles(self) -> int:
        return _process_totals().compiles - self._base[0]

    @property
    def seconds(self) -> float:
        return _process_totals().seconds - self._base[1]

    def reporting(self, log: Callable[[int, str, Mapping[str, Any]], None], *, is_main: bool
                  ) -> Callable[[int, str, Mapping[str, Any]], None]:
        """`log` that adds `compile_s` (seconds so far) and `compiles` (graphs so far) to the first train record,
        by when the first step has compiled its forward and backward graphs, and prints them once on rank 0. A
        later train record carries them again only if more graphs were compiled since (the first evaluation
        compiles its own, gradient-free graphs; steps of other batch lengths reuse the compiled ones)."""
        reported = 0

        def log_with_compile_time(step: int, split: str, values: Mapping[str, Any]) -> None:
            nonlocal reported
            if split == "train" and self.compiles != reported:
                first, reported = reported == 0, self.compiles
                values = {**values, "compile_s": round(self.seconds, 3), "compiles": reported}
                if is_main:
                    print(f"torch.compile (trainer.compile=true): {reported} graphs compiled in {self.seconds:.1f} s "
                          + ("during the first step; later steps reuse them." if first else f"by step {step}."),
                          flush=True)
            log(step, split, values)

        return log_with_compile_time


def separate_cache_per_cpu_capability() -> None:
    """Inductor's on-disk cache does not key its entries on ATEN_CPU_CAPABILITY: a graph cached by a run at the
    CPU's native capability and reused under `ATEN_CPU_CAPABILITY=avx2` trained to NaN from the first step on the
    development machine (the same run without the cache was right). Runs that set the capability (make test-cpus,
    reproducing another CPU's arithmetic) get a cache directory of their own; TORCHINDUCTOR_CACHE_DIR, when set,
    wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    # inductor writes its default into the variable the first time it looks, so the default counts as unset
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{capability}"


def limit_compile_threads(device_type: str) -> None:
    """On CPU, inductor builds kernels in the calling process: its default pool of worker processes (one per core)
    competes with the ranks for cores that training already fills, and on 2 busy cores it took 40 s where one
    thread took 26 s. GPUs keep the pool. TORCHINDUCTOR_COMPILE_THREADS, when set, wins."""
    if device_type == "cpu" and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
