"""The one training loop every recipe runs on.

A recipe says how to turn a batch of prompts into a ``LossOutput`` (its rollout and its loss) and
what to do after each optimiser step (anchor updates). The loop owns the rest: data order,
gradient accumulation, clipping, learning-rate warm-up, evaluation, metrics (JSONL, TensorBoard,
the progress bar), atomic checkpoints and resume. Resuming continues the same run: the data order
and every sampling seed are functions of (seed, step), so a resumed run repeats an uninterrupted
one's metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from bonbench.backends.base import Candidate, Prompt
from bonbench.errors import UserError
from bonbench.rewards.base import RewardModel, checked_scores
from bonbench.seeds import derive_seed
from distill.config import TrainConfig
from distill.generation import Generator, Prefixes, make_generator
from distill.losses import LossOutput
from distill.policy import Draw, Policies, Role
from distill.precision import resolve_precision
from distill.reference_cache import ReferenceCache

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a config that contradicts the checkpoint)."""


@dataclass
class Batch:
    ids: list[list[int]]  # prompt token ids, chat template applied
    messages: list[Prompt]  # the same prompts as the reward model reads them


class Recipe(Protocol):
    name: str
    needs_anchor: bool

    def loss(self, ctx: "Context", batch: Batch, seed: int) -> LossOutput:
        """Sample, score and return the loss of one micro-batch (grad attached)."""
        ...

    def after_step(self, ctx: "Context", step: int) -> None:
        """Called after optimiser step ``step`` (1-based): anchor updates go here."""
        ...


@dataclass
class Context:
    """What a run holds while it trains; it owns the generator and closes it (``close``, or ``with``)."""

    cfg: TrainConfig
    policies: Policies
    reward: RewardModel
    generator: Generator
    accelerator: "Accelerator"  # noqa: F821  (accelerate's; one process unless launched with several)
    timings: dict[str, float] = dataclass_field(default_factory=dict)
    version: int = 0  # weight updates so far (optimiser steps, anchor updates, a restored checkpoint)
    reference_cache: ReferenceCache | None = None  # --reference-cache: ref draws shared across runs

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> torch.Tensor:
        started = time.perf_counter()
        scores = checked_scores(self.reward, list(prompts), list(texts))
        self.timings["reward_s"] = self.timings.get("reward_s", 0.0) + time.perf_counter() - started
        return torch.tensor(scores, dtype=torch.float64)

    def sample(self, role: Role, batch: Batch, n: int, seed: int, score_under: tuple[Role, ...] = (),
               prefixes: Prefixes | None = None):
        return self.sample_together(batch, [Draw(role, n, seed, score_under)], prefixes)[0]

    def sample_together(self, batch: Batch, draws: Sequence[Draw],
                        prefixes: Prefixes | None = None) -> list[list[list[Candidate]]]:
        """Per draw, the candidates per prompt, each scored under the draw's ``score_under`` roles.
        With a reference cache, ``ref`` draws it holds are read back instead of sampled. ``prefixes``:
        the batch's prompts already run under a role (``prompt_states``), for the engine to continue."""
        started = time.perf_counter()
        cache, max_tokens = self.reference_cache, self.cfg.max_tokens
        cacheable = [cache is not None and d.role == "ref" for d in draws]
        out: list = [cache.get(batch.ids, d, max_tokens) if ok else None for d, ok in zip(draws, cacheable)]
        drawn = [k for k, rows in enumerate(out) if rows is None]
        fresh = self.generator.generate(batch.ids, [draws[k] for k in drawn], max_tokens, prefixes) if drawn else []
        for k, rows in zip(drawn, fresh):
            out[k] = rows
        self.timings["sample_s"] = self.timings.get("sample_s", 0.0) + time.perf_counter() - started
        for d, rows in zip(draws, out):
            flat = [(p, c) for p, row in zip(batch.ids, rows) for c in row]
            for role in d.score_under:
                todo = [(p, c) for p, c in flat if role not in c.logprob_under]
                if todo:  # the roles the engine did not score itself
                    scores = self.policies.logprobs(role, [p for p, _ in todo], [c.token_ids for _, c in todo],
                                                    states=(prefixes or {}).get(role))
                    for (_, c), v in zip(todo, scores.tolist()):
                        c.logprob_under[role] = v
        for k in drawn:
            if cacheable[k]:
                cache.put(batch.ids, draws[k], max_tokens, out[k])
        return out

    def weights_changed(self) -> None:
        """The policy's or the anchor's weights moved: the generator samples the new ones from now on."""
        self.version += 1
        self.generator.sync(self.version)

    def close(self) -> None:
        self.generator.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- set-up ------------------------------------------------------------------------------------


def build_context(cfg: TrainConfig, recipe: Recipe) -> Context:
    """Models, reward, the generation engine and (under ``accelerate launch``) the process group.
    The caller owns the context: close it, or use it in a ``with`` block."""
    from accelerate import Accelerator

    from bonbench.backends.transformers import load_causal_lm
    from bonbench.models import resolve_policy
    from bonbench.rewards import load_reward

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Without CUDA the process group must be told it is CPU-only (gloo), or each process trains alone.
    accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    micro = cfg.batch_prompts // cfg.grad_accum
    if micro % accelerator.num_processes:
        raise ValueError(f"a micro-batch of {micro} prompts does not split over {accelerator.num_processes} processes")
    log.info("training on %d process(es), device %s", accelerator.num_processes, accelerator.device)
    torch.manual_seed(cfg.seed)  # LoRA initialisation, the same in every process
    device = str(accelerator.device) if cfg.device == "auto" else cfg.device
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), cfg.dtype, device)
    precision = resolve_precision(cfg.precision, device)
    policies = Policies(model, tokenizer, lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                        lora_targets=cfg.lora_targets, lora_top_layers=cfg.lora_top_layers,
                        with_anchor=recipe.needs_anchor, precision=precision)
    log.info("precision %s (--precision %s): %d frozen layers in bf16", precision, cfg.precision, policies.bf16_layers)
    policies.prepare(accelerator)
    reward = load_reward(cfg.reward_model, device=device, judge_model=cfg.judge_model or None,
                         judge_base_url=cfg.judge_base_url or None,
                         judge_api_key=os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None)
    if reward is None:
        raise ValueError("distillation needs a reward model; --reward-model none is for serving")
    # Last: nothing that can fail comes after the engine starts, so the caller always gets it to close.
    cache = None
    if cfg.reference_cache:
        cache = ReferenceCache(cfg.reference_cache, {
            "model": cfg.model, "resolved": str(resolve_policy(cfg.model)), "dtype": str(policies.dtype),
            "precision": precision, "eos": list(policies.eos), "torch": torch.__version__})
    generator = make_generator(cfg, policies)
    return Context(cfg, policies, reward, generator, accelerator, reference_cache=cache)


def load_prompts(cfg: TrainConfig, tokenizer, split: str, limit: int = 0) -> Batch:
    from bonbench.backends.transformers import encode_prompt
    from bonbench.tasks import load_task, summary_prompt

    rows = load_task(cfg.task, split, limit or None)
    messages = [summary_prompt(doc) for doc in rows["document"]]
    return Batch(ids=[encode_prompt(tokenizer, m) for m in messages], messages=messages)


def step_indices(num_prompts: int, batch: int, step: int, seed: int) -> list[int]:
    """The prompts of (0-based) step ``step``: epochs of seeded permutations, laid end to end."""
    out, position = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(position, num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        take = min(batch - len(out), num_prompts - offset)
        out.extend(int(i) for i in order[offset : offset + take])
        position += take
    return out


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "constant") -> float:
    """The lr of (0-based) optimiser step ``step`` of ``steps``, as a fraction of ``--lr``: a linear
    warm-up over the first ``warmup`` steps, then 1 (``constant``) or a decay that reaches 1/(R+1) of
    the lr at the last step (R = steps - warmup) on a line (``linear``) or half a cosine (``cosine``)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup + 1) / (max(steps - warmup, 0) + 1)  # in (0, 1) over the decay
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def make_optimizer(cfg: TrainConfig, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``--optimizer``: AdamW without weight decay, or SGD with ``--momentum``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def _subset(batch: Batch, indices: Sequence[int]) -> Batch:
    return Batch([batch.ids[i] for i in indices], [batch.messages[i] for i in indices])


# -- the run folder ----------------------------------------------------------------------------

MIN_FREE_BYTES = 100 * 2**20  # metrics, a LoRA checkpoint and the saved adapter; full weights need more


class RunFolderError(TrainingError, UserError):
    """The run folder cannot be created, written or filled."""


def check_run_folder(out: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Create ``out`` and make sure a file can be written in it and the disk has room, so a bad
    ``--out`` fails in a sentence before any model loads rather than after the first steps."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {out} ({exc.strerror or exc}): "
                             "choose a writable --out") from exc
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise RunFolderError(f"cannot write in the run folder {out} ({exc.strerror or exc}): "
                             "choose a writable --out") from exc
    free = shutil.disk_usage(out).free
    if free < min_free_bytes:
        raise RunFolderError(f"the disk of the run folder {out} has {free / 2**20:.0f} MiB free, less than the "
                             f"{min_free_bytes / 2**20:.0f} MiB a run needs: free some space or choose another --out")


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, ctx: Context, optimizer, scheduler) -> None:
    """Write ``out/checkpoint`` atomically: a crash mid-write leaves the previous one intact."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "weights": ctx.policies.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "config": asdict(ctx.cfg)}, tmp / "state.pt")
    old = out / "checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_snapshot(out: Path, step: int, ctx: Context) -> Path:
    """Keep this step's policy in ``out/snapshots/step-NNNN`` (written aside, then renamed into place)."""
    final = out / "snapshots" / f"step-{step:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ctx.policies.save_policy(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_checkpoint(out: Path, ctx: Context, optimizer, scheduler) -> int:
    """Restore the run in ``out``; returns the number of steps already done (0 if none).

    A run killed between ``save_checkpoint``'s two renames has ``checkpoint.old`` and no
    ``checkpoint``: the old one is then the last whole checkpoint, and the run resumes from it.
    """
    path = out / "checkpoint" / "state.pt"
    if not path.exists():
        path = out / "checkpoint.old" / "state.pt"
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    ctx.policies.load_state_dict(state["weights"])
    ctx.weights_changed()
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# -- metrics -----------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (one line per step or evaluation) plus TensorBoard events."""

    def __init__(self, out: Path, resume_step: int):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # drop what came after the checkpoint: the resumed run redoes it
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a dependency; tolerate its absence in odd installs
            self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -- the loop ----------------------------------------------------------------------------------


def _mean_over_processes(acc, values: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return values
    keys = sorted(values)
    means = acc.reduce(torch.tensor([values[k] for k in keys], device=acc.device), "mean")
    return dict(zip(keys, means.tolist()))


def term_gradient_stats(terms: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, float]:
    """How the parts of a loss pull on the trained weights: per term its gradient's norm
    (``diag/grad_norm_<term>``), per pair of terms the cosine of their gradients
    (``diag/grad_cos_<a>_<b>``; negative: they fight). One backward pass per term, with the graph
    kept for the training backward that follows; ``.grad`` is left untouched. Empty for fewer than
    two terms."""
    if len(terms) < 2:
        return {}
    names = [n for n, t in terms.items() if t.requires_grad]
    per_term = [torch.autograd.grad(terms[n], params, retain_graph=True, allow_unused=True) for n in names]
    # Sums over parameters, one at a time: no flattened copy of the model per term.
    dots = torch.zeros(len(names), len(names), dtype=torch.float64)
    for k in range(len(params)):
        g = torch.stack([(gs[k] if gs[k] is not None else torch.zeros_like(params[k])).flatten().double()
                         for gs in per_term])
        dots += (g @ g.T).cpu()
    norms = dots.diagonal().sqrt()
    out = {f"diag/grad_norm_{n}": float(norms[i]) for i, n in enumerate(names)}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            cos = dots[i, j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else torch.tensor(0.0)
            out[f"diag/grad_cos_{a}_{names[j]}"] = float(cos)
    return out


def _micro_step(ctx: Context, recipe: Recipe, batch: Batch, seed: int, sync: bool, out: Path) -> dict[str, float]:
    """Loss and backward of one micro-batch; every process stops together on a non-finite loss."""
    acc, cfg = ctx.accelerator, ctx.cfg
    result = recipe.loss(ctx, batch, seed=seed)
    bad = torch.tensor([0.0 if torch.isfinite(result.loss) else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    if bad.item():
        raise TrainingError(f"non-finite loss {result.loss.item()} (metrics {result.metrics}); "
                            f"the last checkpoint in {out} is intact")
    metrics = dict(result.metrics)
    if cfg.diagnostics:
        started = time.perf_counter()
        metrics.update(term_gradient_stats(result.terms, ctx.policies.trainable_parameters()))
        ctx.timings["diagnostics_s"] = ctx.timings.get("diagnostics_s", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.nullcontext() if sync else acc.no_sync(ctx.policies.train_model):
        acc.backward(result.loss / cfg.grad_accum)
    ctx.timings["backward_s"] = ctx.timings.get("backward_s", 0.0) + time.perf_counter() - started
    return metrics


def train(cfg: TrainConfig, recipe: Recipe, ctx: Context | None = None) -> Path:
    """Run (or resume) a training run; returns the run folder.

    The run folder is checked first, before any model loads. Without ``ctx`` the run builds its
    context and closes it (the generator with it) however the run ends; a ``ctx`` passed in stays
    open for its owner, who closes it.

    Under ``accelerate launch`` each process takes its share of every step's prompts, gradients
    are averaged by DDP, and the main process alone evaluates, logs and writes checkpoints.
    """
    check_run_folder(Path(cfg.out))
    if ctx is not None:
        return _train(cfg, recipe, ctx)
    with build_context(cfg, recipe) as ctx:
        return _train(cfg, recipe, ctx)


def _train(cfg: TrainConfig, recipe: Recipe, ctx: Context) -> Path:
    from tqdm.auto import tqdm

    from distill.evaluate import Evaluator

    out = Path(cfg.out)
    acc = ctx.accelerator
    main = acc.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"method": recipe.name, **asdict(cfg)}, indent=2))
    acc.wait_for_everyone()
    train_set = load_prompts(cfg, ctx.policies.tokenizer, "train", cfg.train_limit)
    evaluator = Evaluator(ctx, load_prompts(cfg, ctx.policies.tokenizer, cfg.eval_split, cfg.eval_prompts), out) \
        if cfg.eval_prompts and main else None

    params = ctx.policies.trainable_parameters()
    optimizer = make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
    done = load_checkpoint(out, ctx, optimizer, scheduler) if cfg.resume else 0
    if done >= cfg.steps:
        log.info("%s already finished %d steps", out, done)
    metrics_log = MetricsLog(out, done) if main else None
    if done == 0 and evaluator is not None:
        metrics_log.write(0, evaluator.run(seed=cfg.seed))

    micro = cfg.batch_prompts // cfg.grad_accum
    bar = tqdm(range(done, cfg.steps), initial=done, total=cfg.steps, desc=recipe.name, dynamic_ncols=True,
               disable=not main)
    for step in bar:
        started = time.perf_counter()
        ctx.timings.clear()
        ctx.policies.timings.clear()
        indices = step_indices(len(train_set.ids), cfg.batch_prompts, step, cfg.seed)
        sums: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            mine = indices[m * micro : (m + 1) * micro][acc.process_index :: acc.num_processes]
            metrics = _micro_step(ctx, recipe, _subset(train_set, mine),
                                  seed=derive_seed(cfg.seed, step * cfg.grad_accum + m),
                                  sync=m == cfg.grad_accum - 1, out=out)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient at step {step + 1}; the last checkpoint in {out} is intact")
        lr = scheduler.get_last_lr()[0]  # the lr this step used; scheduler.step() sets the next one
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        anchor_started = time.perf_counter()
        recipe.after_step(ctx, step + 1)
        ctx.weights_changed()
        ctx.timings["anchor_update_s"] = time.perf_counter() - anchor_started
        row = _mean_over_processes(acc, {**sums, "grad_norm": float(grad_norm), "lr": lr,
                                         "step_s": time.perf_counter() - started, **ctx.timings,
                                         **ctx.policies.timings})
        last = step + 1 == cfg.steps
        if main:
            metrics_log.write(step + 1, row)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward_mean", "kl_ref_estimate",
                                                           "kl_anchor_estimate") if k in row})
            if evaluator is not None and ((step + 1) % cfg.eval_every == 0 or last):
                metrics_log.write(step + 1, evaluator.run(seed=cfg.seed))
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
                save_snapshot(out, step + 1, ctx)
            if (step + 1) % cfg.save_every == 0 or last:
                save_checkpoint(out, step + 1, ctx, optimizer, scheduler)
        acc.wait_for_everyone()
    bar.close()
    if main:
        metrics_log.close()
        ctx.policies.save_policy(out / "policy")
        log.info("policy saved in %s", out / "policy")
        if ctx.reference_cache is not None:
            log.info("reference cache %s: %d draws read back, %d drawn and stored", ctx.reference_cache.folder,
                     ctx.reference_cache.hits, ctx.reference_cache.misses)
    acc.wait_for_everyone()
    return out


def run_recipe(config_cls: type, recipe_cls: type, argv: list[str] | None, prog: str, doc: str) -> Path:
    """A recipe's command line: logging, the config from flags and YAML, then ``train``."""
    from bonbench.cli import setup_logging
    from bonbench.config import parse_config

    cfg = parse_config(config_cls, argv, prog=prog, description=doc.split("\n\n")[0])
    setup_logging(cfg.log_level)
    return train(cfg, recipe_cls(cfg))
