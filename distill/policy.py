"""The three policies a BOND-style trainer needs: the trained policy, the anchor and the reference.

With LoRA the policy and the anchor are two adapters on one frozen base, and the reference is the
base with adapters disabled: one model in memory. With full fine-tuning the anchor is an EMA copy
of the weights and the reference a frozen copy. ``sample`` and ``logprobs`` take the role by name.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from bonbench.backends.base import Candidate, SamplingParams
from bonbench.backends.sampling import BASE, SampleRequest, sample
from bonbench.backends.transformers import eos_ids
from bonbench.logprobs import sequence_logprobs
from bonbench.seeds import derive_seed

Role = Literal["policy", "anchor", "ref"]
_ADAPTER = {"policy": "policy", "anchor": "anchor", "ref": BASE}


@dataclass(frozen=True)
class Draw:
    """``n`` answers per prompt from ``role``, each also scored under the roles in ``score_under``
    (``Candidate.logprob_under[role]``, no gradient)."""

    role: Role
    n: int
    seed: int
    score_under: tuple[Role, ...] = ()


class Policies:
    def __init__(self, model, tokenizer, *, lora: bool, lora_r: int = 16, lora_alpha: int = 32,
                 lora_targets: list[str] | None = None, lora_top_layers: int = 0, with_anchor: bool = True):
        self.tokenizer = tokenizer
        self.lora = lora
        self.with_anchor = with_anchor
        self.eos = eos_ids(model, tokenizer)
        if lora:
            from peft import LoraConfig, get_peft_model

            depth = model.config.num_hidden_layers
            layers = list(range(depth - lora_top_layers, depth)) if 0 < lora_top_layers < depth else None
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=lora_targets,
                                layers_to_transform=layers, task_type="CAUSAL_LM")
            self.model = get_peft_model(model, config, adapter_name="policy")
            if with_anchor:
                self.model.add_adapter("anchor", config)
                self._copy_adapter("policy", "anchor")
            self.model.set_adapter("policy")
            self.ref_model = self.anchor_model = None
        else:
            self.model = model
            model.requires_grad_(True)
            self.ref_model = copy.deepcopy(model).requires_grad_(False)
            self.anchor_model = copy.deepcopy(model).requires_grad_(False) if with_anchor else None
        self.train_model = self.model
        self.generator = None  # set by distill.generation: samples come from another engine (vLLM)
        self.version = 0  # bumped whenever the policy's or the anchor's weights change
        self.model.eval()  # no dropout: sampled and scored log-probabilities are the same policy

    # -- roles ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _role(self, role: Role) -> Iterator:
        if role == "anchor" and not self.with_anchor:
            raise ValueError("this run has no anchor")
        if not self.lora:
            yield {"policy": self.model, "anchor": self.anchor_model, "ref": self.ref_model}[role]
            return
        if role == "ref":
            with self.model.disable_adapter():
                yield self.model
        elif role == "anchor":
            self.model.set_adapter("anchor")
            try:
                yield self.model
            finally:
                self.model.set_adapter("policy")  # also makes the policy adapter trainable again
        else:
            yield self.model

    def sample(self, role: Role, prompts: list[list[int]], n: int, max_tokens: int, seed: int,
               score_under: tuple[Role, ...] = ()) -> list[list[Candidate]]:
        """``n`` answers per prompt from the role's policy (temperature 1, top_p 1: log-probs are log pi)."""
        return self.sample_together(prompts, [Draw(role, n, seed, score_under)], max_tokens)[0]

    def sample_together(self, prompts: list[list[int]], draws: Sequence[Draw], max_tokens: int) -> list[list[list[Candidate]]]:
        """Several draws over the same prompts; returns, per draw, the candidates per prompt.

        With LoRA and the in-process sampler all draws run as one mixed-adapter batch: each decoding
        step reads the weights once for every role, and ``score_under`` costs a shadow row each, not
        a second pass over the prompts. Otherwise each draw samples on its own and is scored after.
        """
        for d in draws:
            if "anchor" in (d.role, *d.score_under) and not self.with_anchor:
                raise ValueError("this run has no anchor")
        def requests(d: Draw, adapters: bool) -> list[SampleRequest]:
            extra = dict(adapter=_ADAPTER[d.role], score_with=tuple(_ADAPTER[r] for r in d.score_under)) if adapters else {}
            return [SampleRequest(p, SamplingParams(n=d.n, max_tokens=max_tokens, seed=derive_seed(d.seed, i)), **extra)
                    for i, p in enumerate(prompts)]

        if self.lora and self.generator is None:
            flat = sample(self.model, self.tokenizer, [r for d in draws for r in requests(d, True)], self.eos,
                          keep_tokens=False)
            role_of = {a: r for r, a in _ADAPTER.items()}
            for c in (c for row in flat for c in row):
                c.logprob_under = {role_of[a]: v for a, v in c.logprob_under.items()}
            return [flat[k * len(prompts) : (k + 1) * len(prompts)] for k in range(len(draws))]
        out = []
        for d in draws:
            if self.generator is not None:
                rows = self.generator.sample(self, d.role, prompts, d.n, max_tokens, d.seed)
            else:
                with self._role(d.role) as model:
                    rows = sample(model, self.tokenizer, requests(d, False), self.eos, keep_tokens=False)
            flat_prompts = [p for p, row in zip(prompts, rows) for _ in row]
            flat = [c for row in rows for c in row]
            for other in d.score_under:
                scores = self.logprobs(other, flat_prompts, [c.token_ids for c in flat]).tolist()
                for c, v in zip(flat, scores):
                    c.logprob_under[other] = v
            out.append(rows)
        return out

    def logprobs(self, role: Role, prompts: list[list[int]], answers: list[list[int]], *, grad: bool = False,
                 batch_size: int = 16) -> torch.Tensor:
        """Per-sequence log pi(answer | prompt) under the role, shape (len(answers),)."""
        with self._role(role) as model, torch.set_grad_enabled(grad):
            if grad and role == "policy":
                model = self.train_model  # under DDP, the wrapper whose backward syncs gradients
            return sequence_logprobs(model, self.tokenizer, prompts, answers, batch_size=batch_size)

    def prepare(self, accelerator) -> None:
        """Let ``accelerate`` wrap the trained model (DDP when several processes run)."""
        self.train_model = accelerator.prepare_model(self.model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def weights_changed(self) -> None:
        """Called after every optimiser step and anchor update: an external generator re-syncs."""
        self.version += 1

    # -- the anchor ---------------------------------------------------------------------------

    def _adapter_pairs(self):
        params = dict(self.model.named_parameters())
        for name, param in params.items():
            if ".policy." in name:
                yield param, params[name.replace(".policy.", ".anchor.")]

    def _copy_adapter(self, source: str, target: str) -> None:
        with torch.no_grad():
            for policy, anchor in self._adapter_pairs():
                (anchor if target == "anchor" else policy).copy_(policy if source == "policy" else anchor)

    @torch.no_grad()
    def update_anchor(self, eta: float) -> None:
        """EMA: theta_anchor <- (1 - eta) theta_anchor + eta theta (eta = 1 copies the policy)."""
        if self.lora:
            pairs = list(self._adapter_pairs())
        else:
            pairs = list(zip(self.model.parameters(), self.anchor_model.parameters()))
        for policy, anchor in pairs:
            anchor.lerp_(policy.detach(), eta)

    # -- saving -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must restore: the trainable weights and the anchor's."""
        if self.lora:
            return {k: v.detach().clone() for k, v in self.model.named_parameters() if "lora_" in k}
        state = {f"policy.{k}": v for k, v in self.model.state_dict().items()}
        if self.anchor_model is not None:
            state.update({f"anchor.{k}": v for k, v in self.anchor_model.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights_changed()
        if self.lora:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in state.items():
                    params[k].copy_(v)
            return
        self.model.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("policy.")})
        if self.anchor_model is not None:
            self.anchor_model.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("anchor.")})

    def save_policy(self, folder: Path) -> None:
        """The trained policy alone, loadable by ``bonbench serve --model`` / ``bonbench measure``:
        a LoRA adapter folder (with ``--policy``) or, for full fine-tuning, a whole model folder."""
        if self.lora:
            self.model.save_pretrained(folder, selected_adapters=["policy"])
            # peft writes a non-default adapter into a sub-folder; keep the adapter at the top level
            nested = folder / "policy"
            if nested.is_dir():
                for f in nested.iterdir():
                    f.replace(folder / f.name)
                nested.rmdir()
        else:
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
