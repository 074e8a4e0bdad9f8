"""What the machine computes natively: the one home for hardware detection.

``native_bf16(device)`` answers whether bfloat16 matmuls run in hardware there: on a CUDA GPU,
torch's own check; on a CPU, the instruction-set flags the kernel reports in ``/proc/cpuinfo``
(x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``). Without them, torch emulates bfloat16 on the
CPU through float32 and it is slower than float32, not faster.
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
