"""The three policies a BOND-style trainer needs: the trained policy, the anchor and the reference.

With LoRA the policy and the anchor are two adapters on one frozen base, and the reference is the
base with adapters disabled: one model in memory. With full fine-tuning the anchor is an EMA copy
of the weights and the reference a frozen copy. ``logprobs`` takes the role by name; samples come
from a generator (``distill/generation.py``) built from ``role_modules`` or ``save_role``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping

import torch

from bonbench.backends.prefill import PromptState, prompt_states
from bonbench.backends.sampling import BASE
from bonbench.backends.transformers import eos_ids
from bonbench.logprobs import sequence_logprobs
from distill.precision import Precision, bf16_frozen_trunk

log = logging.getLogger(__name__)

Role = Literal["policy", "anchor", "ref"]
_ADAPTER = {"policy": "policy", "anchor": "anchor", "ref": BASE}


@dataclass(frozen=True)
class Draw:
    """``n`` answers per prompt from ``role``, each also scored by the trained model under the roles in
    ``score_under`` (``Candidate.logprob_under[role]``, no gradient). Naming the draw's own role gives
    the trained model's log-prob, where an external engine's ``Candidate.logprob`` may differ in precision."""

    role: Role
    n: int
    seed: int
    score_under: tuple[Role, ...] = ()


class Policies:
    def __init__(self, model, tokenizer, *, lora: bool, lora_r: int = 16, lora_alpha: int = 32,
                 lora_targets: list[str] | None = None, lora_top_layers: int = 0, with_anchor: bool = True,
                 precision: Precision = "fp32"):
        self.tokenizer = tokenizer
        self.timings: dict[str, float] = {}  # seconds in ``logprobs`` (logprob_s), ``prompt_states`` (prompt_s)
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
        # bf16 for the layers nothing trains (distill/precision.py); all of them are frozen base layers.
        self.bf16_layers = bf16_frozen_trunk(self.model) if precision == "bf16" else 0
        if precision == "bf16" and not self.bf16_layers:
            log.warning("precision bf16: every layer trains (LoRA on all layers or full fine-tuning), so all run in fp32")
        self.model.eval()  # no dropout: sampled and scored log-probabilities are the same policy

    # -- roles ------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[Role, ...]:
        return ("policy", "anchor", "ref") if self.with_anchor else ("policy", "ref")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def role_modules(self) -> dict[Role, tuple[torch.nn.Module, str | None]]:
        """Per role, the module that computes it and the PEFT adapter it runs under (``BASE``: adapters
        off; ``None``: the module as it is). With LoRA every role is the one shared model."""
        if self.lora:
            return {r: (self.model, _ADAPTER[r]) for r in self.roles}
        models = {"policy": self.model, "anchor": self.anchor_model, "ref": self.ref_model}
        return {r: (models[r], None) for r in self.roles}

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

    def logprobs(self, role: Role, prompts: list[list[int]], answers: list[list[int]], *, grad: bool = False,
                 batch_size: int = 16, states: Mapping[tuple[int, ...], PromptState] | None = None) -> torch.Tensor:
        """Per-sequence log pi(answer | prompt) under the role, shape (len(answers),); ``states``: the
        role's ``prompt_states`` of these prompts, with the same ``grad``, read instead of run again."""
        started = time.perf_counter()
        with self._role(role) as model, torch.set_grad_enabled(grad):
            if grad and role == "policy":
                model = self.train_model  # under DDP, the wrapper whose backward syncs gradients
            out = sequence_logprobs(model, self.tokenizer, prompts, answers, batch_size=batch_size, states=states)
        self.timings["logprob_s"] = self.timings.get("logprob_s", 0.0) + time.perf_counter() - started
        return out

    def prompt_states(self, role: Role, prompts: list[list[int]], *, grad: bool = False,
                      trunk_from: Mapping[tuple[int, ...], PromptState] | None = None
                      ) -> dict[tuple[int, ...], PromptState]:
        """Each distinct prompt run once under the role (``bonbench.backends.prefill.prompt_states``):
        for ``logprobs`` with the same ``grad``, and, detached, for the generator to continue instead of
        prefilling. ``trunk_from``: another role's states of the same prompts, whose frozen trunk (LoRA
        on the top layers) this pass reads instead of running. Empty for a model whose cache cannot be
        laid side by side."""
        started = time.perf_counter()
        with self._role(role) as model, torch.set_grad_enabled(grad):
            if grad and role == "policy":
                model = self.train_model
            states = prompt_states(model, prompts, trunk_from if self.lora else None) or {}
        self.timings["prompt_s"] = self.timings.get("prompt_s", 0.0) + time.perf_counter() - started
        return states

    def prepare(self, accelerator) -> None:
        """Let ``accelerate`` wrap the trained model (DDP when several processes run)."""
        self.train_model = accelerator.prepare_model(self.model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

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
        if self.lora:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in state.items():
                    params[k].copy_(v)
            return
        self.model.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("policy.")})
        if self.anchor_model is not None:
            self.anchor_model.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("anchor.")})

    def save_role(self, role: Role, folder: Path) -> None:
        """The role's current weights as a folder ``from_pretrained`` reads: with LoRA a PEFT adapter
        (the reference, which has none, is refused), with full fine-tuning a whole model."""
        if role not in self.roles:
            raise ValueError(f"this run has no {role}")
        folder = Path(folder)
        if not self.lora:
            {"policy": self.model, "anchor": self.anchor_model, "ref": self.ref_model}[role].save_pretrained(folder)
            return
        if role == "ref":
            raise ValueError("with LoRA the reference is the base model: it has no adapter to save")
        self.model.save_pretrained(folder, selected_adapters=[role])
        # peft writes a non-default adapter into a sub-folder; keep the adapter at the top level
        nested = folder / role
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(folder / f.name)
            nested.rmdir()

    def save_policy(self, folder: Path) -> None:
        """The trained policy alone, loadable by ``bonbench serve --model`` / ``bonbench measure``:
        a LoRA adapter folder (with ``--policy``) or, for full fine-tuning, a whole model folder."""
        self.save_role("policy", folder)
        self.tokenizer.save_pretrained(folder)
