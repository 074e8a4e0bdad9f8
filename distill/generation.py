"""Where a trainer's samples come from: the ``Generator`` protocol and the engines behind it.

The training loop builds one generator per run (``make_generator``), tells it after every
optimiser step and anchor update that the weights moved (``sync``), asks it for samples through
``Context.sample_together`` (``generate``) and closes it when the run ends, however it ends
(``close``). A generator gets what it needs when it is built: the tokenizer, the end-of-sequence
ids, and either the modules themselves (in-process) or a way to export a role's weights (an
external engine); it never sees the trainer's ``Policies``.

* ``transformers`` (the default, ``distill/transformers_generation.py``): bonbench's batched
  sampler, in-process, on the very weights being trained. With LoRA, every draw of a call runs as
  one mixed-adapter batch.
* ``vllm`` (``distill/vllm_generation.py``): one vLLM engine beside the trainer, re-synced to a
  role's weights when the role is next sampled after a ``sync``.

The losses never use a generator's own log-probabilities for gradients: they are recomputed by the
trained model, so only the tokens must be exact samples.
"""

from __future__ import annotations

from typing import Collection, Mapping, Protocol, Sequence

from bonbench.backends.base import Candidate
from bonbench.backends.prefill import PromptState
from distill.policy import Draw, Role

# Per role, prompts already run under that role's current weights (``Policies.prompt_states``).
Prefixes = Mapping[Role, Mapping[tuple[int, ...], PromptState]]


class Generator(Protocol):
    def generate(self, prompts: Sequence[list[int]], draws: Sequence[Draw], max_tokens: int,
                 prefixes: Prefixes | None = None) -> list[list[list[Candidate]]]:
        """Sample every draw over the same prompts; returns, per draw, per prompt, ``draw.n`` candidates.

        prompts: token ids, chat template applied. Each candidate is drawn at temperature 1, top_p 1
        from ``draw.role``'s weights as of the last ``sync``, with a seed derived from ``draw.seed``
        and the prompt's index; ``token_ids`` end with the end-of-sequence token when the answer
        stopped on one. ``logprob_under[role]`` may be filled for roles in ``draw.score_under`` that
        the engine scores with the trained weights themselves; the caller scores the roles left out.
        ``prefixes``: prompts the trainer has already run under a role's weights as of the last
        ``sync``; an engine may continue them instead of prefilling (the draws do not change beyond
        float rounding) or ignore them.
        Raises ``ValueError`` for a role the run does not have, ``RuntimeError`` once closed.
        """
        ...

    def sync(self, version: int) -> None:
        """The trained weights (policy or anchor) changed; ``version`` counts the changes so far and
        only grows. Samples drawn after this call come from the new weights. Cheap: an engine
        that copies weights does it lazily, when a role is next sampled."""
        ...

    def close(self) -> None:
        """Release what the engine holds (worker processes, GPU memory, exported weights).
        Idempotent; ``generate`` raises afterwards."""
        ...


ENGINES = ("transformers", "vllm")


def check_draws(draws: Sequence[Draw], roles: Collection[str], closed: bool) -> None:
    """What every engine refuses before it samples: any call once closed, a role the run lacks."""
    if closed:
        raise RuntimeError("this generator is closed")
    for d in draws:
        missing = [r for r in (d.role, *d.score_under) if r not in roles]
        if missing:
            raise ValueError(f"this run has no {missing[0]}")


def make_generator(cfg, policies) -> Generator:
    """The engine ``cfg.generation`` names, built from the parts of ``policies`` it needs."""
    if cfg.generation == "transformers":
        from distill.transformers_generation import TransformersGenerator

        return TransformersGenerator(policies.role_modules(), policies.tokenizer, policies.eos)
    if cfg.generation == "vllm":
        from distill.vllm_generation import VLLMGenerator

        return VLLMGenerator(cfg, roles=policies.roles, tokenizer=policies.tokenizer, eos=policies.eos,
                             dtype=policies.dtype, export=policies.save_role)
    raise ValueError(f"unknown generation engine {cfg.generation!r}: one of {ENGINES}")
