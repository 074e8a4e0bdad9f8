"""What the machine computes natively, and how torch shares its cores: the one home for both.

``native_bf16(device)`` answers whether bfloat16 matmuls run in hardware there: on a CUDA GPU,
torch's own check; on a CPU, the instruction-set flags the kernel reports in ``/proc/cpuinfo``
(x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``). Without them, torch emulates bfloat16 on the
CPU through float32 and it is slower than float32, not faster.

``one_torch_thread()`` is for a thread that runs torch beside the one that decodes (the server's
reward thread): every thread that runs a multi-threaded torch op keeps its own OpenMP team, and on
this 2-core machine a second team, even idle, halved the decoding thread's tokens/s (the engine
benchmark: 372 -> 180 tokens/s in bf16 after one reward call on another thread; 373 with the reward
thread at one intra-op thread). Its ops then run on the calling thread alone.

``decoding_threads(device)`` is how many intra-op threads the serving engine's decoding thread
uses. Decoding runs many small ops, and with ``OMP_WAIT_POLICY=PASSIVE`` (``bonbench/__init__.py``:
spinning threads slow torch 20-30x beside any busy process) every parallel region wakes a sleeping
thread. On this 2-core CPU one thread decoded faster than two at every batch size (the embedded
model in bf16, through the transformers backend: 1 row 14.6 vs 10.6 tokens/s, 8 rows 96 vs 62, 64
rows 373 vs 209) and leaves the other core to the reward and the event loop; with more cores the
split is not measured, and torch's setting is kept.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 BF16 and AMX; Arm FEAT_BF16


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | set[str]) -> bool:
    return bool(CPU_BF16_FLAGS & set(flags))


@lru_cache(maxsize=1)
def this_cpu_flags() -> frozenset[str]:
    """This machine's CPU flags; empty where ``/proc/cpuinfo`` does not exist (macOS, Windows)."""
    path = Path("/proc/cpuinfo")
    return cpu_flags(path.read_text()) if path.exists() else frozenset()


def native_bf16(device: str, flags: Iterable[str] | None = None) -> bool:
    """True if ``device`` ("cpu", "cuda", "cuda:1", ...) computes bfloat16 in hardware; ``flags``: the
    CPU's feature flags (this machine's when not given)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return cpu_has_native_bf16(set(this_cpu_flags() if flags is None else flags))
    return False


def one_torch_thread() -> None:
    """Run this thread's torch ops on it alone (no OpenMP team of its own); a ``ThreadPoolExecutor``
    initializer for threads that run torch beside a decoding thread (see the module docstring)."""
    import torch

    torch.set_num_threads(1)


def decoding_threads(device: str, cores: int | None = None) -> int:
    """Intra-op threads for the serving engine's decoding thread: 1 on a CPU of at most 2 cores,
    else torch's current setting (see the module docstring). ``cores``: this machine's when not given."""
    import os

    import torch

    cores = (os.cpu_count() or 1) if cores is None else cores
    return 1 if device == "cpu" and cores <= 2 else torch.get_num_threads()
