"""Hardware detection (``bonbench.hardware``) and the ``--dtype auto`` rule built on it."""

from __future__ import annotations

import pytest
import torch

from bonbench.hardware import cpu_flags, cpu_has_native_bf16, native_bf16, this_cpu_flags
from bonbench.models import pick_dtype

# the flags line of this machine's CPU (Sapphire Rapids), cut to the ones that matter plus neighbours
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1
"""
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(SAPPHIRE_RAPIDS, True), (ZEN3, False), (GRAVITON3, True), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(text, native):
    assert cpu_has_native_bf16(cpu_flags(text)) is native


def test_flags_come_from_the_flags_line_only():
    assert cpu_flags(SAPPHIRE_RAPIDS) >= {"avx512_bf16", "amx_bf16"}
    assert "spectre_v1" not in cpu_flags(SAPPHIRE_RAPIDS)


def test_auto_is_bf16_on_a_native_bf16_cpu_only_for_serving():
    native = native_bf16("cpu")
    assert native == cpu_has_native_bf16(this_cpu_flags())
    assert pick_dtype("auto", "cpu", for_serving=True) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("auto", "cpu") == torch.float32  # training and measure keep float32 unless asked
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert pick_dtype("float32", "cpu", for_serving=True) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("float7", "cpu")


def test_the_decoding_thread_runs_alone_on_a_cpu_of_two_cores_and_keeps_torchs_setting_elsewhere():
    import torch

    from bonbench.hardware import decoding_threads

    assert decoding_threads("cpu", cores=2) == 1
    assert decoding_threads("cpu", cores=1) == 1
    assert decoding_threads("cpu", cores=16) == torch.get_num_threads()
    assert decoding_threads("cuda", cores=2) == torch.get_num_threads()


def test_one_torch_thread_leaves_a_side_thread_a_single_intra_op_thread():
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from bonbench.hardware import one_torch_thread

    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1, initializer=one_torch_thread) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)
