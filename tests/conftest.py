"""Shared fixtures: a tiny random model with SmolLM2's tokenizer, and the embedded default."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bonbench  # noqa: F401, E402  (before torch loads: it sets OMP_WAIT_POLICY)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (a folder)."""
    from bonbench.models import save_random_model

    return str(save_random_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0))


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted into the cache on first use."""
    from bonbench.models import embedded_policy_path

    return str(embedded_policy_path())
