"""``python -m evals.benchmarks``: academic benchmarks for the reference, distilled policies and
Best-of-N itself, through lm-eval's Python API.

    python -m evals.benchmarks                                   # local tasks: reference and BoN-4
    python -m evals.benchmarks --tasks bonbench_qa gsm8k --policies runs/jbond/policy --bon-n 1 4 8 \\
        --bon-reward bonbench_qa=mypackage.rewards:concise --limit 200 --out runs/benchmarks
    python -m evals.benchmarks --tasks bonbench_qa --reference false --bon-n 1 4 \\
        --bon-selection bonbench_qa=majority bonbench_qa=self-certainty      # rules beside the reward's argmax

Methods. The reference (``--model``) and each policy (a merged checkpoint, or a LoRA adapter from
``distill`` put on the reference with lm-eval's ``peft=``) run as lm-eval's ``hf`` model, so every
task type works: log-likelihood and generation, greedy as each task says. Best-of-N runs as
lm-eval's ``local-chat-completions`` model against a ``bonbench serve`` that this command starts on
a free loopback port (one per reward) and stops; each request asks for ``best_of=N`` candidates
sampled at ``--bon-temperature``, and the server returns the one its reward prefers. Best-of-N
picks among samples, so it applies to generation tasks only: log-likelihood tasks are listed as not
run for it. ``--bon-n 1`` is plain sampling at the same temperature, the baseline Best-of-N must beat.

The reward decides what Best-of-N is worth: the default reward was built for one-sentence summaries
and is the wrong judge for short answers. ``--bon-reward TASK=SPEC`` chooses it per task (SPEC is
anything ``bonbench serve --reward-model`` takes); the table's ``reward`` column says which one
produced each Best-of-N row. ``--bon-selection TASK=RULE`` adds, for every N above 1, a row whose
answers a selection rule chose (a request's ``selection``; ``bonbench/select.py``): ``majority`` and
``self-certainty`` need no reward and the ``reward`` column names the rule alone; a rule that reads
the reward (``soft``, ``regularized``) reads the task's and is named ``RULE(REWARD)``.

Tasks. Any lm-eval task, group or tag name (``gsm8k``, ``ifeval``, ``mmlu``; these need the Hugging
Face hub) and the project's own offline ones in ``evals/tasks/`` (tag ``bonbench``): ``bonbench_qa``
(127 short answers, exact match), ``bonbench_mc`` (84 four-way choices, log-likelihood accuracy) and
``bonbench_if`` (60 instructions checked by code).

Output, in ``--out``: ``benchmarks.parquet`` and ``benchmarks.csv`` (task, metric, value, stderr,
method, n, reward, model, filter, docs), ``raw/<method>/<task>.json`` (lm-eval's results as it
returns them) and ``samples/<method>/<task>.jsonl`` (every document's prompt and answer). A rerun
skips the (method, task, reward) rows already on disk.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shlex
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

from bonbench.cli import log_level_option, run_command, setup_logging
from bonbench.config import option, parse_config
from bonbench.errors import UserError
from bonbench.samplestore import safe_name

log = logging.getLogger("evals.benchmarks")

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"
TABLE = "benchmarks"
COLUMNS = ["task", "metric", "value", "stderr", "method", "n", "reward", "model", "filter", "docs"]


class BenchmarkError(UserError, ValueError):
    """Bad input or an unreachable resource; the message is one sentence that says what to do."""


@dataclass
class BenchmarkConfig:
    tasks: list[str] = option(["bonbench_qa", "bonbench_mc", "bonbench_if"],
                             "lm-eval task, group or tag names; the local ones are bonbench_qa, bonbench_mc, "
                             "bonbench_if (tag: bonbench)")
    model: str = option("default", "the reference: 'default' (embedded SmolLM2-135M-Instruct), a hub id or a folder")
    reference: bool = option(True, "evaluate the reference itself (lm-eval's hf model)")
    policies: list[str] = option([], "policy folders to evaluate with lm-eval's hf model: merged checkpoints, or "
                                    "LoRA adapters (adapter_config.json) put on --model with peft=")
    bon_n: list[int] = option([4], "Best-of-N sizes, served by bonbench serve (0: no Best-of-N)")
    reward_model: str = option("default", "the reward that picks Best-of-N's answer on tasks without --bon-reward "
                                         "(any bonbench serve --reward-model spec)")
    bon_reward: list[str] = option([], "TASK=SPEC: the reward for Best-of-N on TASK (repeatable)")
    bon_selection: list[str] = option([], "TASK=RULE: also run Best-of-N on TASK with this selection rule (majority, "
                                         "self-certainty, soft, regularized; RULE:key=value,... for parameters), "
                                         "one row per rule beside the reward's argmax (repeatable)")
    bon_temperature: float = option(1.0, "sampling temperature of Best-of-N's candidates")
    bon_base_url: str = option("", "use this running bonbench server (…/v1) instead of starting one; its own "
                                  "reward picks the answers")
    serve_args: str = option("", "more arguments for the bonbench serve this command starts, e.g. "
                                "'--backend vllm --device cuda'")
    concurrent: int = option(4, "Best-of-N requests in flight (the server batches them)")
    limit: float = option(0, "documents per task: a count, a fraction below 1, or 0 for all")
    num_fewshot: int = option(-1, "few-shot examples (-1: each task's own default)")
    chat_template: bool = option(True, "wrap prompts in the model's chat template (Best-of-N needs it)")
    batch_size: int = option(8, "hf model: batch size")
    device: str = option("cpu", "cpu or cuda[:i] (the hf model and the started server)")
    dtype: str = option("auto", "auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16")
    bootstrap_iters: int = option(1000, "lm-eval's bootstrap draws for standard errors that need them")
    seed: int = option(1234, "lm-eval's random, numpy, torch and few-shot seeds")
    out: str = option("runs/benchmarks", "run folder")
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("--tasks is empty: name at least one task")
        if self.bon_n == [0]:
            self.bon_n = []
        if any(n < 1 for n in self.bon_n):
            raise ValueError(f"--bon-n values must be >= 1, got {self.bon_n}")
        if self.bon_n and not self.chat_template:
            raise ValueError("Best-of-N goes through the server's chat endpoint: it needs --chat-template true")
        if self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        if self.concurrent < 1:
            raise ValueError(f"--concurrent must be >= 1, got {self.concurrent}")
        if self.bon_temperature <= 0 and any(n > 1 for n in self.bon_n):
            raise ValueError("--bon-temperature 0 makes every candidate the same greedy answer")
        if self.bon_base_url and (self.bon_reward or self.serve_args):
            raise ValueError("--bon-reward and --serve-args configure the server this command starts; "
                             "the server at --bon-base-url scores with its own reward")
        self.task_rewards()  # a malformed --bon-reward is a usage error
        self.task_selections()  # as is a malformed --bon-selection

    def task_selections(self) -> dict[str, list[str]]:
        """``--bon-selection`` as {task: [rule spec, ...]}, each spec checked."""
        from bonbench.select import SelectionError, parse_rule

        selections: dict[str, list[str]] = {}
        for item in self.bon_selection:
            task, sep, spec = item.partition("=")
            if not sep or not task or not spec:
                raise ValueError(f"--bon-selection takes TASK=RULE, got {item!r}")
            try:
                parse_rule(spec)
            except SelectionError as exc:
                raise ValueError(f"--bon-selection {item}: {exc}") from exc
            selections.setdefault(task, []).append(spec)
        return selections

    def task_rewards(self) -> dict[str, str]:
        """``--bon-reward`` as {task: reward spec}."""
        rewards = {}
        for item in self.bon_reward:
            task, sep, spec = item.partition("=")
            if not sep or not task or not spec:
                raise ValueError(f"--bon-reward takes TASK=SPEC, got {item!r}")
            rewards[task] = spec
        return rewards


# ---------------------------------------------------------------------------------------
# Methods and units of work


@dataclass(frozen=True)
class Method:
    """One row group of the table: how answers are produced."""

    name: str  # reference | policy-<slug> | bon-<N>
    model: str  # the model column: the reference or the policy path
    n: int = 1
    path: str = ""  # hf: the folder or hub id loaded
    adapter: str = ""  # hf: a LoRA adapter folder put on ``path``

    @property
    def is_bon(self) -> bool:
        return self.name.startswith("bon-")


@dataclass(frozen=True)
class Unit:
    """One (method, task, reward) cell of work: one lm-eval run, one raw JSON file."""

    method: Method
    task: str
    reward: str = ""  # Best-of-N only
    selection: str = ""  # Best-of-N only: a rule spec (bonbench.select.parse_rule); "": the reward's argmax

    @property
    def label(self) -> str:
        """The table's ``reward`` column: the reward, the reward-free rule, or ``RULE(REWARD)``."""
        if not self.selection:
            return self.reward
        from bonbench.select import parse_rule

        return f"{self.selection}({self.reward})" if parse_rule(self.selection).needs_reward else self.selection

    @property
    def stem(self) -> str:
        return self.task if not self.label else f"{self.task}@{safe_name(self.label, 'x')}"

    def raw_path(self, out: Path) -> Path:
        return out / "raw" / self.method.name / f"{self.stem}.json"

    def samples_path(self, out: Path) -> Path:
        return out / "samples" / self.method.name / f"{self.stem}.jsonl"



def policy_method(path: str, reference_path: str) -> Method:
    """The hf method for a policy folder: a merged checkpoint, or a LoRA adapter on the reference."""
    from bonbench.samplestore import policy_slug

    name, folder = f"policy-{policy_slug(path)}", Path(path)
    if not folder.exists():
        if folder.is_absolute() or path.startswith(".") or path.count("/") > 1:
            raise BenchmarkError(f"policy folder {path} does not exist")
        return Method(name, path, path=path)  # a hub id
    adapter = folder / "adapter_config.json"
    if adapter.exists():
        declared = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if declared != reference_path:
            log.info("LoRA adapter %s goes on the reference %s (it names %s as its base)", path, reference_path,
                     declared)
        return Method(name, path, path=reference_path, adapter=str(folder))
    if (folder / "config.json").exists():
        return Method(name, path, path=str(folder))
    raise BenchmarkError(f"policy folder {path} is not a model: it holds neither config.json (a merged "
                         "checkpoint) nor adapter_config.json (a LoRA adapter)")


def methods(cfg: BenchmarkConfig, bon_model: str) -> list[Method]:
    """The reference, the policies and Best-of-N for each N (of ``bon_model``, the model served)."""
    from bonbench.models import resolve_policy

    reference_path = resolve_policy(cfg.model)
    found = [Method("reference", cfg.model, path=reference_path)] if cfg.reference else []
    found += [policy_method(p, reference_path) for p in cfg.policies]
    found += [Method(f"bon-{n}", bon_model, n=n) for n in sorted(set(cfg.bon_n))]
    names = [m.name for m in found]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise BenchmarkError(f"two policies share the label {clashes[0]}: give their folders distinct names")
    return found


# ---------------------------------------------------------------------------------------
# Tasks


@cache
def task_manager(with_lm_eval_tasks: bool):
    """lm-eval's task index with the local tasks; lm-eval's own ~15,000 are indexed only when needed
    (that takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=with_lm_eval_tasks)


def local_task_names() -> set[str]:
    return set(task_manager(False).all_tasks)


def resolve_tasks(names: list[str]):
    """(task manager, the task or group names to run): tags expand to their tasks, groups stay whole
    (lm-eval aggregates them); an unknown name is an error before any model loads."""
    manager = task_manager(not set(names) <= local_task_names())
    index = manager.task_index
    resolved: list[str] = []
    for name in names:
        if name not in index:
            raise BenchmarkError(f"unknown task {name!r}: neither one of lm-eval's tasks nor a local one "
                                 f"({', '.join(sorted(local_task_names()))}); `lm-eval ls tasks` lists lm-eval's")
        members = sorted(index[name].tags) if name in manager.all_tags else [name]
        resolved += [m for m in members if m not in resolved]
    return manager, resolved


def generates(manager, task: str) -> bool:
    """Whether every document of a task (or every task of a group) is answered by generation."""
    entry = manager.task_index[task]
    if entry.cfg is not None and "output_type" in entry.cfg:
        return entry.cfg["output_type"] == "generate_until"
    loaded = _load_tasks(manager, task)
    return all(t.OUTPUT_TYPE == "generate_until" for t in loaded["tasks"].values())


def _load_tasks(manager, task: str):
    try:
        return manager.load([task])
    except ConnectionError as exc:
        raise hub_error(task, exc) from exc


def hub_error(task: str, exc: ConnectionError) -> BenchmarkError:
    return BenchmarkError(f"task {task} needs its dataset from the Hugging Face hub, which cannot be reached "
                          f"({exc}); the local tasks ({', '.join(sorted(local_task_names()))}) run offline")


# ---------------------------------------------------------------------------------------
# Models: lm-eval's hf model, and local-chat-completions against a bonbench server


def hf_model(method: Method, cfg: BenchmarkConfig):
    from lm_eval.models.huggingface import HFLM

    from bonbench.models import pick_dtype

    log.info("loading %s%s", method.path, f" with the LoRA adapter {method.adapter}" if method.adapter else "")
    return HFLM(pretrained=method.path, peft=method.adapter or None, device=cfg.device,
                dtype=pick_dtype(cfg.dtype, cfg.device), batch_size=cfg.batch_size)


@dataclass(frozen=True)
class Server:
    base_url: str  # …/v1
    model: str  # the name it serves


def check_server(base_url: str, n: int) -> tuple[Server, str]:
    """The server's model name and the reward it reports, from one Best-of-N request of ``best_of=n``;
    an unreachable server or a refusal is a ``BenchmarkError``."""
    import openai

    # lm-eval's chat client sends $OPENAI_API_KEY too (for a server started with --api-key)
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "unused", max_retries=1,
                           timeout=120)
    try:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=1,
            temperature=1.0, extra_body={"best_of": n, "return_candidates": True})
    except openai.APIConnectionError as exc:
        raise BenchmarkError(f"the Best-of-N server at {base_url} is unreachable ({exc}); start one with "
                             "`python -m bonbench serve` or leave out --bon-base-url") from exc
    except openai.APIStatusError as exc:
        raise BenchmarkError(f"the Best-of-N server at {base_url} refused best_of={n}: {exc.message}") from exc
    bon = (reply.model_extra or {}).get("bon")
    if not bon:
        raise BenchmarkError(f"the server at {base_url} is not a Best-of-N server: its replies carry no 'bon' field")
    return Server(base_url, model), bon.get("reward_model") or "none"  # null fields are left out


@contextlib.contextmanager
def bon_server(cfg: BenchmarkConfig, reward: str, out: Path) -> Iterator[Server]:
    """A ``bonbench serve`` of ``--model`` scoring with ``reward`` on a free loopback port, stopped on exit."""
    from bonbench.models import served_name
    from bonbench.server.launch import ServerStartError, launch_server

    largest = max(cfg.bon_n)
    args = ["--model", cfg.model, "--reward-model", reward, "--n", str(largest),
            "--max-best-of", str(max(64, largest)), "--max-tokens", "4096", "--device", cfg.device,
            "--dtype", cfg.dtype, *shlex.split(cfg.serve_args)]
    log_path = out / "logs" / f"serve-{safe_name(reward, 'x')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with launch_server(args, log_path=log_path) as process:
            yield Server(process.base_url, served_name(cfg.model))
    except ServerStartError as exc:
        raise BenchmarkError(f"bonbench serve with reward {reward!r} did not start ({str(exc).splitlines()[0]}); "
                             f"its log is {log_path}") from exc


def chat_model(server: Server, cfg: BenchmarkConfig):
    from lm_eval.models.openai_completions import LocalChatCompletion

    return LocalChatCompletion(base_url=f"{server.base_url}/chat/completions", model=server.model,
                               num_concurrent=cfg.concurrent, max_retries=3, seed=cfg.seed)


# ---------------------------------------------------------------------------------------
# One unit: lm-eval, then its raw results and samples on disk


def evaluate(lm, unit: Unit, manager, cfg: BenchmarkConfig, out: Path) -> None:
    """Run one task on one model with lm-eval; write its raw JSON last (its presence marks the unit done)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    gen_kwargs = None
    if unit.method.is_bon:
        gen_kwargs = {"best_of": unit.method.n, "temperature": cfg.bon_temperature, "do_sample": True}
        if unit.selection:  # extra fields of lm-eval's chat payload; the server's request names them
            from bonbench.select import describe, parse_rule

            rule = parse_rule(unit.selection)
            gen_kwargs.update(selection=rule.name, selection_params=describe(rule))
    limit = None if cfg.limit == 0 else (int(cfg.limit) if cfg.limit >= 1 else cfg.limit)
    seeds = dict(random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                 fewshot_random_seed=cfg.seed)
    try:
        results = simple_evaluate(
            model=lm, tasks=[unit.task], task_manager=manager, limit=limit,
            num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, gen_kwargs=gen_kwargs,
            apply_chat_template=cfg.chat_template, fewshot_as_multiturn=cfg.chat_template,
            bootstrap_iters=cfg.bootstrap_iters, log_samples=True, **seeds)
    except ConnectionError as exc:
        raise hub_error(unit.task, exc) from exc
    samples = results.pop("samples")
    results["bonbench"] = {"method": unit.method.name, "task": unit.task, "n": unit.method.n,
                           "reward": unit.label, "model": unit.method.model}
    samples_path = unit.samples_path(out)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with open(samples_path, "w") as f:
        for task, docs in samples.items():
            for doc in docs:
                f.write(json.dumps({"task": task, **doc}, default=handle_non_serializable) + "\n")
    _write_text(unit.raw_path(out), json.dumps(results, indent=2, default=handle_non_serializable))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# The table


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no standard error
        return float("nan")


def result_rows(results: dict) -> list[dict]:
    """The table's rows for one raw results file: one per (task, metric, filter)."""
    meta = results["bonbench"]
    rows = []
    for task, metrics in results["results"].items():
        docs = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue  # "alias", "name", "sample_len", and the standard errors read below
            rows.append({"task": task, "metric": metric, "value": _number(value),
                         "stderr": _number(metrics.get(f"{metric}_stderr,{filter_name}")),
                         "method": meta["method"], "n": meta["n"], "reward": meta["reward"], "model": meta["model"],
                         "filter": filter_name, "docs": docs})
    return rows


def write_table(out: Path):
    """``benchmarks.parquet`` and ``.csv`` from every raw results file in the run folder."""
    import pandas as pd

    rows = [row for path in sorted((out / "raw").glob("*/*.json"))
            for row in result_rows(json.loads(path.read_text()))]
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"n": "int64", "docs": "Int64"})
    kind = table["method"].map(lambda m: 0 if m == "reference" else 2 if m.startswith("bon-") else 1)
    table = (table.assign(kind=kind).sort_values(["task", "metric", "filter", "kind", "n", "method", "reward"])
             .drop(columns="kind").reset_index(drop=True))
    for suffix, write in ((".parquet", table.to_parquet), (".csv", table.to_csv)):
        path = out / f"{TABLE}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp, index=False)
        tmp.replace(path)
    return table


# ---------------------------------------------------------------------------------------
# The run


SETTINGS = ("model", "limit", "num_fewshot", "chat_template", "bon_temperature", "seed")


def check_settings(cfg: BenchmarkConfig, out: Path) -> None:
    """A run folder holds results of one setting: resuming with another would mix them in one table."""
    path = out / "run.json"
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    if path.exists():
        saved = json.loads(path.read_text())["settings"]
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise BenchmarkError(f"{out} holds results made with other settings ({', '.join(changed)}); "
                                 "use a new --out")
    _write_text(path, json.dumps({"settings": settings, "config": asdict(cfg)}, indent=2))


def plan(cfg: BenchmarkConfig, manager, tasks: list[str], external: Server | None,
         reward_of) -> tuple[list[Unit], list[str]]:
    """Every unit the config asks for, and the ones Best-of-N cannot run (log-likelihood tasks).
    Selection rules run for N > 1 only: of one candidate every rule keeps that one."""
    units, not_run = [], []
    selections = cfg.task_selections()
    for method in methods(cfg, bon_model=external.model if external else cfg.model):
        for task in tasks:
            if not method.is_bon:
                units.append(Unit(method, task))
            elif generates(manager, task):
                units.append(Unit(method, task, reward_of(task)))
                if method.n > 1:
                    units += [Unit(method, task, reward_of(task), rule) for rule in selections.get(task, [])]
            else:
                not_run.append(f"{method.name} x {task}")
    return units, not_run


def run(cfg: BenchmarkConfig):
    """Evaluate every (method, task) not yet on disk; return the whole table."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    manager, tasks = resolve_tasks(cfg.tasks)
    for task in set(tasks) - local_task_names():
        _load_tasks(manager, task)  # fetch hub datasets now: fail before any model loads, not after hours
    for flag, named in (("--bon-reward", cfg.task_rewards()), ("--bon-selection", cfg.task_selections())):
        stray = sorted(set(named) - set(tasks))
        if stray:
            raise BenchmarkError(f"{flag} names {stray[0]}, which is not among the tasks to run ({', '.join(tasks)})")
    external, server_reward = None, None
    if cfg.bon_base_url and cfg.bon_n:
        external, server_reward = check_server(cfg.bon_base_url, max(cfg.bon_n))
    rewards = cfg.task_rewards()
    units, not_run = plan(cfg, manager, tasks, external,
                          lambda task: server_reward or rewards.get(task, cfg.reward_model))
    check_settings(cfg, out)
    todo = [u for u in units if not u.raw_path(out).exists()]
    log.info("%d of %d (method, task) results on disk in %s; %d to run", len(units) - len(todo), len(units), out,
             len(todo))
    if not_run:
        log.warning("not run: %s (Best-of-N chooses among sampled answers; log-likelihood tasks score "
                    "fixed choices)", ", ".join(not_run))
    with tqdm(total=len(todo), desc="benchmarks", unit="task") as progress:
        for lm, batch in _models(todo, cfg, out, external):
            for unit in batch:
                progress.set_postfix_str(f"{unit.method.name} {unit.task}")
                evaluate(lm, unit, manager, cfg, out)
                progress.update()
    return write_table(out)


def _models(todo: list[Unit], cfg: BenchmarkConfig, out: Path,
            external: Server | None) -> Iterator[tuple[object, list[Unit]]]:
    """(model, its units) one model at a time: each hf model loaded once and released, each Best-of-N
    server started once per reward and stopped (or the ``external`` one used)."""
    for method in dict.fromkeys(u.method for u in todo if not u.method.is_bon):
        lm = hf_model(method, cfg)
        yield lm, [u for u in todo if u.method == method]
        del lm
        gc.collect()
    bon = [u for u in todo if u.method.is_bon]
    for reward in dict.fromkeys(u.reward for u in bon):
        batch = [u for u in bon if u.reward == reward]
        with contextlib.ExitStack() as stack:
            server = external or stack.enter_context(bon_server(cfg, reward, out))
            for n in dict.fromkeys(u.method.n for u in batch):
                yield chat_model(server, cfg), [u for u in batch if u.method.n == n]


class _QuietCustomLoaders(logging.Filter):
    """lm-eval warns, for every task with a custom loader, that the loader may take ``--metadata``;
    the local tasks' loader takes none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchmarkConfig, argv, prog="python -m evals.benchmarks", description=__doc__.split("\n\n")[0])
    setup_logging(cfg.log_level)
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomLoaders())
    table = run(cfg)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.drop(columns=["model", "filter"]).to_string(index=False, float_format="{:.4f}".format))
    print(f"\nwrote {Path(cfg.out) / TABLE}.parquet and .csv")


if __name__ == "__main__":
    run_command(main)
