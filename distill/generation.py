"""Where a trainer's samples come from.

``transformers`` (the default) samples in-process with bonbench's batched sampler, from the very
weights being trained. Any other engine is an object with

    sample(policies, role, prompts, n, max_tokens, seed) -> list[list[Candidate]]

that returns token ids drawn at temperature 1 from the role's current weights (``policies.version``
tells it when they changed). The losses never use its log-probabilities: they are recomputed by the
trained model, so only the tokens must be exact samples.

``vllm`` (``distill/vllm_generation.py``) is such an engine: one vLLM instance beside the trainer,
re-synced to the role's weights whenever they changed.
"""

from __future__ import annotations


def make_generator(cfg, policies):
    """The engine ``cfg.generation`` names, or ``None`` for the in-process sampler."""
    if cfg.generation == "transformers":
        return None
    if cfg.generation == "vllm":
        from distill.vllm_generation import VLLMGenerator

        return VLLMGenerator(cfg, policies)
    raise ValueError(f"unknown generation engine {cfg.generation!r}: 'transformers' or 'vllm'")
