"""In-process generation with Hugging Face transformers (the CPU default).

Requests from concurrent clients are queued and one worker thread drives a continuously batched
``bonbench.backends.engine.Engine``: at every decoding step, requests that arrived join the batch
(up to ``max_batch_rows`` candidates; their prompts prefilled in chunks within ``max_batch_tokens``
tokens per step) and finished ones leave, so a short request never waits for a long batch to end.

It runs early rejection (``SamplingParams.early_rejection``): the engine calls the request's
``score_partial`` from the worker thread at each checkpoint, and the batch waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from bonbench.backends import kv
from bonbench.backends.base import (CancelledWork, Generation, PartialScorer, Prompt, SamplingParams, check_context,
                                    is_chat)
from bonbench.backends.engine import Engine
from bonbench.backends.rows import SampleRequest
from bonbench.hardware import decoding_threads

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: SampleRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    prompt_tokens: int
    cancelled: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def _set():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        if not self.loop.is_closed():  # else whoever awaited it has gone (its event loop ended)
            self.loop.call_soon_threadsafe(_set)


def load_causal_lm(path: str, dtype: str = "auto", device: str = "cpu", adapter_base: str | None = None, *,
                   for_serving: bool = False):
    """Load a model and its tokenizer from a Hugging Face id or folder, ready for sampling.

    A folder holding a PEFT LoRA adapter (``adapter_config.json``, as ``distill`` saves) is loaded
    onto its base model and merged, so a distilled policy serves and measures like any model. The
    base is ``adapter_base`` if given (``bonbench measure`` puts the adapter on the reference it
    compares with), else the one the adapter names. ``for_serving`` lets ``dtype="auto"`` pick
    bfloat16 on a CPU that computes it natively (``bonbench.models.pick_dtype``).
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonbench.models import pick_dtype

    torch_dtype = pick_dtype(dtype, device, for_serving=for_serving)
    adapter = Path(path) / "adapter_config.json"
    declared = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.exists() else None
    # an adapter saved by peft alone has no tokenizer: the base's is the one it was trained with
    bare = adapter.exists() and not (Path(path) / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained((adapter_base or declared) if bare else path)
    if adapter.exists():
        from peft import PeftModel

        if adapter_base and adapter_base != declared:
            log.info("LoRA adapter %s goes on %s (it names %s as its base)", path, adapter_base, declared)
        model = AutoModelForCausalLM.from_pretrained(adapter_base or declared, dtype=torch_dtype)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    return model, tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model defines no end-of-sequence token")
    return ids


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the tokenizer's chat template, text as is."""
    if is_chat(prompt):
        if tokenizer.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


class CountedPrompts:
    """Token ids of prompts counted and not yet generated from.

    The server counts a prompt's tokens (``count_prompt_tokens``, to refuse one that does not fit)
    and then generates from it: ``generate`` takes the ids counted instead of encoding the prompt a
    second time. Prompts are keyed by a digest of their JSON form; past ``size`` entries the oldest
    go (prompts counted for requests that were then refused, or counted twice and generated once).
    Counting and generating run on different threads.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._ids: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, prompt: Prompt, ids: list[int]) -> None:
        key = self._key(prompt)
        with self._lock:
            self._ids[key] = tuple(ids)
            self._ids.move_to_end(key)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def take(self, prompt: Prompt) -> list[int] | None:
        """The ids counted for ``prompt`` (forgotten now), or ``None`` if it was not counted."""
        with self._lock:
            ids = self._ids.pop(self._key(prompt), None)
        return None if ids is None else list(ids)

    @staticmethod
    def _key(prompt: Prompt) -> bytes:
        return hashlib.sha256(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).digest()


class TransformersBackend:
    """Samples in-process; one worker thread owns the model."""

    supports_early_rejection = True

    def __init__(self, model, tokenizer, model_name: str, *, max_batch_rows: int = 64, max_batch_tokens: int = 512,
                 threads: int | None = None):
        """``threads``: the decoding thread's torch intra-op threads (default:
        ``bonbench.hardware.decoding_threads`` for the model's device)."""
        if max_batch_tokens <= max_batch_rows:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must exceed max_batch_rows ({max_batch_rows})")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self._eos = eos_ids(model, tokenizer)
        self._context = kv.engine_context(model)
        self._counted = CountedPrompts()
        self._engine = self._new_engine()
        self.cancelled_work = CancelledWork()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads = threads or decoding_threads(next(model.parameters()).device.type)
        self._worker = threading.Thread(target=self._serve, name="bonbench-generate", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(cls, path: str, model_name: str | None = None, dtype: str = "auto", device: str = "cpu", **kw):
        model, tokenizer = load_causal_lm(path, dtype, device, for_serving=True)
        return cls(model, tokenizer, model_name or path, **kw)

    @property
    def max_context(self) -> int | None:
        """The model's context, or its sliding window where that is shorter (``kv.engine_context``)."""
        return self._context.tokens

    @property
    def running_rows(self) -> int:
        """Rows decoding at this moment (read from another thread: a snapshot)."""
        return self._engine.running_rows

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        ids = encode_prompt(self.tokenizer, prompt)
        self._counted.put(prompt, ids)
        return len(ids)

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       score_partial: PartialScorer | None = None) -> Generation:
        """``score_partial`` (with ``params.early_rejection``) is called from the worker thread."""
        ids = self._counted.take(prompt)
        if ids is None:
            ids = encode_prompt(self.tokenizer, prompt)
        check_context(len(ids), params.max_tokens, self.max_context, self._context.hint)
        loop = asyncio.get_running_loop()
        job = _Job(SampleRequest(ids, params, score_partial=score_partial), loop.create_future(), loop, len(ids))
        job.request.is_cancelled = job.cancelled.is_set
        self._queue.put(job)
        try:
            candidates = await job.future
        except asyncio.CancelledError:
            job.cancelled.set()  # the worker skips it, or stops its rows at the next token
            raise
        return Generation(prompt_tokens=job.prompt_tokens, candidates=candidates)

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._worker.join, 30)

    # -- worker thread ------------------------------------------------------------------------

    def _new_engine(self) -> Engine:
        return Engine(self.model, self.tokenizer, self._eos, max_rows=self.max_batch_rows,
                      max_step_tokens=self.max_batch_tokens)

    def _take_queued(self, block: bool) -> bool:
        """Hand queued jobs to the engine (waiting for one if ``block``); False once asked to stop."""
        while True:
            try:
                job = self._queue.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            if job.cancelled.is_set():
                self.cancelled_work.add(never_started=job.request.params.n)
                continue
            try:
                self._engine.add(job.request, lambda candidates, job=job: self._finish(job, candidates),
                                 lambda exc, job=job: job.resolve(error=exc))
            except ValueError as exc:
                job.resolve(error=exc)

    def _finish(self, job: _Job, candidates) -> None:
        if job.cancelled.is_set():
            self.cancelled_work.add(candidates)
        job.resolve(candidates)

    def _serve(self) -> None:
        torch.set_num_threads(self._threads)
        running = True
        while running or not self._engine.idle:
            if running:
                running = self._take_queued(block=self._engine.idle)
            if self._engine.idle:
                continue
            try:
                self._engine.step()
            except Exception as exc:  # a failed step fails the requests inside, not the worker
                log.exception("generation failed")
                engine, self._engine = self._engine, self._new_engine()
                engine.fail(RuntimeError(f"{type(exc).__name__}: {exc}"))
