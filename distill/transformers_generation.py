"""The in-process sampling engine (``--generation transformers``, the default).

Samples with bonbench's batched sampler from the very modules being trained, so ``sync`` has
nothing to copy. Draws whose roles live in one module (LoRA: the policy and anchor adapters and the
adapter-free reference on one base) run as one mixed-adapter batch: each decoding step reads the
weights once for every role. A ``score_under`` role in the same module is scored by a shadow row per
candidate where the module has a frozen trunk (LoRA on the top layers, distill's default), and by
the caller's teacher-forced pass otherwise (``shadow_rows_pay``). Full fine-tuning has one module
per role, so each role samples on its own and the caller scores ``score_under``. A draw continues
the trainer's own pass over its prompts (``prefixes``, one per role) instead of prefilling them
where that pass covers the draw's role and its shadow rows' roles: a step's sampling then costs
its decoding alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from bonbench.backends.base import Candidate, SamplingParams
from bonbench.backends.sampling import SampleRequest, sample
from bonbench.backends.trunk import first_adapted_layer
from bonbench.seeds import derive_seed
from distill.generation import Prefixes, check_draws
from distill.policy import Draw, Role


def shadow_rows_pay(module: torch.nn.Module) -> bool:
    """Whether shadow rows score a draw more cheaply than a teacher-forced pass after it: where the
    module has a frozen trunk. There the layers below the adapters run in bf16 where the CPU has it
    and prefill once for every adapter: J-BOND's sampling call, its shadow rows and second adapter
    included, took 1.16x the time of the sampler alone on the same drawn rows
    (``reports/bench/trainer-sampling-fused.md``), and RLOO with LoRA on the top 8 layers stepped in
    44.2 s with them against 47.1 s with the pass (``benchmarks/README.md``, an AVX2 CPU). With LoRA on
    every layer each shadow row is a whole row through every layer at every decoding step: RLOO's step
    took 30.8 s with them against 27.3 s with the pass (``reports/bench/trainer_step-rloo-reference.md``)."""
    return first_adapted_layer(module) > 0


class TransformersGenerator:
    """Samples each role from ``modules[role]``: ``(module, adapter)``, adapter ``None`` for a plain
    module, else the PEFT adapter name the role runs under (``BASE`` for adapters off)."""

    def __init__(self, modules: Mapping[Role, tuple[torch.nn.Module, str | None]], tokenizer, eos: Sequence[int]):
        self._modules: dict[Role, tuple[torch.nn.Module, str | None]] | None = dict(modules)
        self.tokenizer = tokenizer
        self.eos = list(eos)
        self.version = 0

    @property
    def closed(self) -> bool:
        return self._modules is None

    def generate(self, prompts: Sequence[list[int]], draws: Sequence[Draw], max_tokens: int,
                 prefixes: Prefixes | None = None) -> list[list[list[Candidate]]]:
        """See ``distill.generation.Generator.generate``. A draw continues the trainer's prompt pass
        (``prefixes``; the gradient pass reads it too) where it covers the draw's role and its shadow
        rows' roles."""
        check_draws(draws, self._modules or (), self.closed)
        out: list[list[list[Candidate]] | None] = [None] * len(draws)
        by_module: dict[int, list[int]] = {}
        for k, d in enumerate(draws):
            by_module.setdefault(id(self._modules[d.role][0]), []).append(k)
        for ks in by_module.values():
            module = self._modules[draws[ks[0]].role][0]
            requests = [r for k in ks for r in self._requests(prompts, draws[k], max_tokens, prefixes or {})]
            flat = sample(module, self.tokenizer, requests, self.eos, keep_tokens=False)
            for j, k in enumerate(ks):
                out[k] = flat[j * len(prompts) : (j + 1) * len(prompts)]
        for d, rows in zip(draws, out):
            self._name_scores(d, rows)
        return out

    def _requests(self, prompts: Sequence[list[int]], d: Draw, max_tokens: int,
                  prefixes: Prefixes) -> list[SampleRequest]:
        module, adapter = self._modules[d.role]
        # Shadow rows score under another adapter of the same module; other roles are the caller's.
        shadow_roles: list[Role] = []
        if adapter is not None and shadow_rows_pay(module):
            shadow_roles = [r for r in d.score_under if r != d.role and self._modules[r][0] is module]
        role_of = {adapter: d.role, **{self._modules[r][1]: r for r in shadow_roles}}  # the request's adapters
        requests = []
        for i, p in enumerate(prompts):
            known = [prefixes.get(r, {}).get(tuple(p)) for r in role_of.values()]
            prefix = None if None in known else {a: s.detached() for a, s in zip(role_of, known)}
            requests.append(SampleRequest(list(p), SamplingParams(n=d.n, max_tokens=max_tokens,
                                                                  seed=derive_seed(d.seed, i)),
                                          adapter=adapter, score_with=tuple(role_of)[1:], prefix=prefix))
        return requests

    def _name_scores(self, d: Draw, rows: list[list[Candidate]]) -> None:
        """Key the sampler's ``logprob_under`` (by adapter) by role; the draw's own role is free."""
        role_of = {adapter: role for role, (_, adapter) in self._modules.items() if adapter is not None}
        for c in (c for row in rows for c in row):
            c.logprob_under = {role_of[a]: v for a, v in c.logprob_under.items()}
            if d.role in d.score_under:
                c.logprob_under[d.role] = c.logprob

    def sync(self, version: int) -> None:
        """Nothing to copy: the modules are the trained ones."""
        self.version = version

    def close(self) -> None:
        """Drop the references to the trained modules."""
        self._modules = None
