r"""``python -m evals.judge``: side-by-side of two methods' answers, judged by an LLM in both orders.

    python -m evals.judge --a runs/xsum/answers-bon4.parquet --b runs/xsum/answers-policy.parquet
    python -m evals.judge --a bon4.jsonl --b policy.jsonl --judge-base-url https://api.openai.com/v1 \
        --judge-model gpt-4o-mini                      # a real judge (key in $OPENAI_API_KEY)
    python -m evals.judge --a answers.parquet --a-method BoN-4 --b answers.parquet --b-method reference

Inputs: two answer tables (.parquet, .csv or .jsonl) with columns ``prompt_id``, ``prompt``,
``answer`` and optionally ``reference`` (a human answer the judge is shown); a table with a
``method`` column holding several methods is filtered with ``--a-method``/``--b-method``. Pairs
are the prompt ids both tables have, with the same prompt text.

Every pair is judged twice, A shown first and B shown first; ``P(A ≻ B) = ½ (p_ab + 1 − p_ba)``
(``evals.metrics``). The judge: any OpenAI-compatible server (``--judge-base-url``,
``--judge-model``, the key in the environment variable ``--judge-api-key-env``), which by default
writes its verdict as a label (``--read label``, ties allowed). Without a URL, the judge is the
embedded SmolLM2-135M-Instruct served by ``bonbench serve`` on a free loopback port, and the
preference is read from its exact log-probabilities of the labels ``A`` and ``B``
(``--read sampled-logprobs``; see ``evals.judge_client``). That judge is weak: a 135M model
barely reads two answers, has a strong position bias (the ``position_bias`` column), and its
verdicts are a smoke test of the pipeline, not evidence; the summary says so.

Outputs in ``--out`` (default ``runs/judge/<A>-vs-<B>``), as .parquet and .csv:
``judgments`` (one row per prompt and order: ``p_first``, the label log-probabilities, the reply,
whether it came from the cache), ``preferences`` (one row per prompt: ``preference`` = P(A ≻ B),
``outcome`` win/tie/loss, the lengths, ``lc_preference`` at zero length difference) and
``summary`` (one row), plus ``summary.md`` and ``run.json``. Columns of ``summary``:
``win_rate`` (the mean preference, a tie ½) with a bootstrap interval ``[win_low, win_high]``;
``discrete_win_rate`` (each prompt a win, tie or loss) with its Wilson interval; ``lc_win_rate``,
AlpacaEval's length-controlled win rate (``evals.metrics``), with a bootstrap interval that refits
the GLM on each draw, ``length_coef`` its length term; ``invalid``: prompts left out because a
judgment in either order named no label.

Resuming: judgments are cached in ``--cache`` (default ``OUT/judgments.jsonl``) by a hash of the
judge and the judged text, so a rerun asks the judge only for what is missing (nothing when all
is cached: then no judge is started or contacted) and recomputes the tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from bonbench.cli import log_level_option, run_command, setup_logging
from bonbench.config import option, parse_config
from bonbench.errors import UserError
from bonbench.samplestore import safe_name
from bonbench.tables import write_tables
from evals import metrics
from evals.judge_client import READ_MODES, TEMPLATE, Comparison, JudgeSpec, JudgmentCache, judge_all

log = logging.getLogger("evals.judge")

ANSWER_COLUMNS = ("prompt_id", "prompt", "answer")
WEAK_JUDGE_NOTE = ("weak judge: the embedded SmolLM2-135M-Instruct, read from its log-probabilities of 'A' and "
                   "'B'; a smoke test of the pipeline, not evidence (use --judge-base-url/--judge-model)")


class InputError(UserError, ValueError):
    """An answer table or judge template that cannot be used; the message says which and why."""


@dataclass
class JudgeConfig:
    a: str = option("", "answers of method A: .parquet, .csv or .jsonl with prompt_id, prompt, answer [, reference]")
    b: str = option("", "answers of method B, the same format; the win rate is A's over B")
    a_name: str = option("", "method A's name in the tables (default: --a-method, else the file's stem)")
    b_name: str = option("", "method B's name in the tables (default: --b-method, else the file's stem)")
    a_method: str = option("", "keep only the rows of --a whose 'method' column equals this")
    b_method: str = option("", "keep only the rows of --b whose 'method' column equals this")
    judge_base_url: str = option("", "OpenAI-compatible base URL of the judge, e.g. https://api.openai.com/v1 "
                                    "(empty: the embedded model, served by bonbench on loopback; a weak judge)")
    judge_model: str = option("", "the judge model's name at --judge-base-url (empty: the server's first); "
                                 "without a URL, what bonbench serves: 'default', a Hugging Face id or a folder")
    judge_api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the judge's API key")
    read: str = option("auto", "how the preference is read: label (the letter the judge writes, ties allowed), "
                              "top-logprobs (the first token's top_logprobs of A and B), sampled-logprobs (exact "
                              "log-probabilities of A and B among one-token samples, for servers without "
                              "top_logprobs such as bonbench); auto: sampled-logprobs for the embedded judge, "
                              "label for a URL")
    label_draws: int = option(32, "sampled-logprobs: one-token samples per judgment")
    max_tokens: int = option(16, "label: most tokens of the judge's reply")
    template: str = option("", "a file with the judge's prompt, using {prompt}, {first}, {second} and optionally "
                              "{reference} (default: the built-in template)")
    limit: int = option(0, "judge only the first N shared prompts (0: all)")
    concurrency: int = option(8, "requests to the judge at once")
    max_retries: int = option(6, "retries of a request on a connection error, 429 or 5xx (exponential backoff)")
    timeout: float = option(120.0, "seconds before a request to the judge times out")
    length_unit: str = option("chars", "length for the length control: chars (as AlpacaEval) or words")
    instruction_l2: float = option(1.0, "ridge on the per-instruction term of the length-control GLM")
    bootstrap: int = option(1000, "bootstrap draws for the intervals (the LC interval refits per draw)")
    confidence: float = option(0.95, "confidence of the intervals")
    seed: int = option(0, "seed of the bootstrap")
    out: str = option("", "output folder (default: runs/judge/<A>-vs-<B>); a rerun resumes from its cache")
    cache: str = option("", "JSONL file of cached judgments (default: OUT/judgments.jsonl); shareable")
    threads: int = option(0, "embedded judge: torch CPU threads of the server (0: torch's default)")
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        if not self.a or not self.b:
            raise ValueError("give both answer tables: --a PATH --b PATH")
        if self.read not in ("auto", *READ_MODES):
            raise ValueError(f"--read must be auto or one of {', '.join(READ_MODES)}, got {self.read!r}")
        if self.length_unit not in ("chars", "words"):
            raise ValueError(f"--length-unit must be chars or words, got {self.length_unit!r}")
        if min(self.label_draws, self.max_tokens, self.concurrency, self.bootstrap) < 1:
            raise ValueError("--label-draws, --max-tokens, --concurrency and --bootstrap must be >= 1")
        if self.limit < 0 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("--limit and --max-retries must be >= 0 and --timeout > 0")
        if not 0 < self.confidence < 1 or not self.instruction_l2 > 0:
            raise ValueError("--confidence must lie in (0, 1) and --instruction-l2 be > 0")
        self.a_name = self.a_name or self.a_method or Path(self.a).stem
        self.b_name = self.b_name or self.b_method or Path(self.b).stem
        if self.a_name == self.b_name:
            raise ValueError(f"both methods are called {self.a_name!r}; name them with --a-name and --b-name")

    @property
    def embedded(self) -> bool:
        return not self.judge_base_url


# ---------------------------------------------------------------------------------------
# Inputs


def read_answers(path: str, method: str = ""):
    """An answer table: prompt_id (as text), prompt, answer and, if present, reference."""
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(file)
    elif suffix == ".csv":
        frame = pd.read_csv(file, dtype={"prompt_id": str}, keep_default_na=False)
    elif suffix in (".jsonl", ".json"):
        frame = pd.read_json(file, lines=suffix == ".jsonl", dtype={"prompt_id": str})
    else:
        raise InputError(f"{path}: answers must be .parquet, .csv or .jsonl, not {suffix or 'no suffix'}")
    if method:
        if "method" not in frame.columns:
            raise InputError(f"{path} has no 'method' column to pick {method!r} from")
        frame = frame[frame["method"] == method]
        if frame.empty:
            raise InputError(f"{path} has no rows of method {method!r}")
    elif "method" in frame.columns and frame["method"].nunique() > 1:
        raise InputError(f"{path} holds several methods ({', '.join(map(str, frame['method'].unique()[:5]))}); "
                         "pick one with --a-method / --b-method")
    missing = [c for c in ANSWER_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path} has no column {', '.join(missing)}; an answer table needs "
                         f"{', '.join(ANSWER_COLUMNS)} (and optionally reference)")
    columns = [*ANSWER_COLUMNS, *(["reference"] if "reference" in frame.columns else [])]
    frame = frame[columns].copy()
    frame["prompt_id"] = frame["prompt_id"].astype(str)
    if frame["prompt_id"].duplicated().any():
        raise InputError(f"{path}: {int(frame['prompt_id'].duplicated().sum())} prompt_id values repeat; "
                         "give one answer per prompt")
    for column in ("prompt", "answer"):
        if frame[column].isna().any():
            raise InputError(f"{path}: {int(frame[column].isna().sum())} rows have no {column}")
        frame[column] = frame[column].astype(str)
    return frame.reset_index(drop=True)


def pair_answers(a, b, names: tuple[str, str], limit: int = 0):
    """Rows of A and B with the same prompt_id (A's order): prompt_id, prompt, reference, answer_a, answer_b."""
    merged = a.merge(b, on="prompt_id", suffixes=("_a", "_b"), validate="one_to_one")
    if merged.empty:
        raise InputError(f"{names[0]} and {names[1]} share no prompt_id; are they answers to the same prompts?")
    different = merged["prompt_a"] != merged["prompt_b"]
    if different.any():
        raise InputError(f"{int(different.sum())} prompt_ids have different prompts in {names[0]} and {names[1]} "
                         f"(first: {merged.loc[different, 'prompt_id'].iloc[0]!r})")
    for name, table in zip(names, (a, b)):
        if len(table) > len(merged):
            log.warning("%s: %d of its %d prompts have no answer from the other method and are left out", name,
                        len(table) - len(merged), len(table))
    pairs = merged[["prompt_id"]].assign(prompt=merged["prompt_a"], answer_a=merged["answer_a"],
                                         answer_b=merged["answer_b"], reference=None)
    for column in ("reference", "reference_a", "reference_b"):  # A's reference first, then B's
        if column in merged.columns:
            pairs["reference"] = pairs["reference"].where(pairs["reference"].map(_is_text), merged[column])
    pairs["reference"] = pairs["reference"].map(lambda v: v if _is_text(v) else None)
    return pairs.head(limit) if limit else pairs


def _is_text(value) -> bool:
    return isinstance(value, str) and value != ""


def comparisons(pairs, spec: JudgeSpec) -> list[tuple[str, str, Comparison]]:
    """``(prompt_id, order, comparison)`` for both orders of every pair: ``ab`` shows A first."""
    out = []
    for row in pairs.itertuples(index=False):
        for order, first, second in (("ab", row.answer_a, row.answer_b), ("ba", row.answer_b, row.answer_a)):
            key = spec.key(row.prompt, first, second, row.reference)
            out.append((row.prompt_id, order, Comparison(key, row.prompt, first, second, row.reference)))
    return out


# ---------------------------------------------------------------------------------------
# Tables (numbers from evals.metrics)


def length_of(text: str, unit: str) -> int:
    return len(text) if unit == "chars" else len(text.split())


def judgment_table(items: list[tuple[str, str, Comparison]], cache: JudgmentCache, cached_before: set[str]):
    import pandas as pd

    rows = []
    for prompt_id, order, item in items:
        entry = cache[item.key]
        p_first = entry["p_first"]
        rows.append({"prompt_id": prompt_id, "order": order, "p_first": math.nan if p_first is None else p_first,
                     "valid": p_first is not None, "logprob_a": entry["logprob_a"], "logprob_b": entry["logprob_b"],
                     "reply": entry["reply"], "judge": entry["judge"], "read": entry["read"],
                     "cached": item.key in cached_before, "key": item.key})
    return pd.DataFrame(rows)


def preference_table(pairs, judgments, cfg: JudgeConfig):
    """One row per prompt: P(A ≻ B) from both orders, the outcome, the lengths."""
    wide = judgments.pivot(index="prompt_id", columns="order", values="p_first")
    table = pairs[["prompt_id"]].copy()
    table["p_ab"] = table["prompt_id"].map(wide["ab"])
    table["p_ba"] = table["prompt_id"].map(wide["ba"])
    table["valid"] = table["p_ab"].notna() & table["p_ba"].notna()
    table["preference"] = np.nan
    if table["valid"].any():
        valid = table["valid"].to_numpy()
        table.loc[valid, "preference"] = metrics.pair_preference(table.loc[valid, "p_ab"], table.loc[valid, "p_ba"])
    table["outcome"] = np.select([table["preference"] > 0.5, table["preference"] < 0.5, table["preference"] == 0.5],
                                 ["win", "loss", "tie"], default="invalid")
    table["len_a"] = [length_of(t, cfg.length_unit) for t in pairs["answer_a"]]
    table["len_b"] = [length_of(t, cfg.length_unit) for t in pairs["answer_b"]]
    table["lc_preference"] = np.nan
    return table


def summarize(preferences, cfg: JudgeConfig, judge: str, read: str):
    """The one-row summary; fills ``preferences['lc_preference']`` for the valid prompts."""
    import pandas as pd

    from bonbench import bon

    valid = preferences[preferences["valid"]]
    row = {"method_a": cfg.a_name, "method_b": cfg.b_name, "judge": judge, "read": read,
           "prompts": len(preferences), "judged": len(valid), "invalid": len(preferences) - len(valid)}
    numbers = ["win_rate", "win_low", "win_high", "discrete_win_rate", "discrete_low", "discrete_high", "wins",
               "ties", "losses", "lc_win_rate", "lc_low", "lc_high", "length_coef", "lc_converged", "position_bias"]
    row.update(dict.fromkeys(numbers, math.nan))
    if len(valid):
        y = valid["preference"].to_numpy()
        win = metrics.mean_preference(y, resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
        discrete = bon.win_rate(y, np.full_like(y, 0.5), confidence=cfg.confidence)
        fit, lc = metrics.length_controlled_win_rate(
            y, valid["len_a"], valid["len_b"], instruction_l2=cfg.instruction_l2, resamples=cfg.bootstrap,
            confidence=cfg.confidence, seed=cfg.seed)
        preferences.loc[valid.index, "lc_preference"] = fit.zero_length_preferences
        row.update(win_rate=win.estimate, win_low=win.low, win_high=win.high, discrete_win_rate=discrete.rate,
                   discrete_low=discrete.low, discrete_high=discrete.high, wins=discrete.wins, ties=discrete.ties,
                   losses=discrete.losses, lc_win_rate=lc.estimate, lc_low=lc.low, lc_high=lc.high,
                   length_coef=fit.length_coef, lc_converged=fit.converged,
                   position_bias=metrics.position_bias(valid["p_ab"], valid["p_ba"]))
        if not fit.converged:
            log.warning("the length-control fit did not converge; lc_win_rate is unreliable")
    else:
        log.warning("no prompt has a valid judgment in both orders: the win rates are empty")
    row.update(mean_len_a=float(preferences["len_a"].mean()), mean_len_b=float(preferences["len_b"].mean()),
               length_unit=cfg.length_unit, note=WEAK_JUDGE_NOTE if cfg.embedded else "")
    return pd.DataFrame([row])


# ---------------------------------------------------------------------------------------
# The judge


def judge_spec(cfg: JudgeConfig, api_key: str) -> JudgeSpec:
    from bonbench.models import served_name
    from evals.judge_client import resolve_model

    if cfg.embedded:
        model = served_name(cfg.judge_model or "default")
    else:
        model = cfg.judge_model or resolve_model(cfg.judge_base_url, api_key)
    read = cfg.read if cfg.read != "auto" else ("sampled-logprobs" if cfg.embedded else "label")
    if cfg.template and not Path(cfg.template).is_file():
        raise InputError(f"--template {cfg.template}: no such file")
    template = Path(cfg.template).read_text() if cfg.template else TEMPLATE
    try:
        return JudgeSpec(model=model, read=read, template=template, draws=cfg.label_draws, max_tokens=cfg.max_tokens)
    except ValueError as exc:
        raise InputError(f"--template {cfg.template}: {exc}") from exc


@contextlib.contextmanager
def judge_endpoint(cfg: JudgeConfig, out: Path) -> Iterator[str]:
    """The judge's base URL: ``--judge-base-url``, or an embedded ``bonbench serve`` for the block."""
    if not cfg.embedded:
        yield cfg.judge_base_url
        return
    from bonbench.server.launch import launch_server

    args = ["--model", cfg.judge_model or "default", "--n", "1", "--reward-model", "none",
            "--max-best-of", str(max(64, cfg.label_draws)), "--log-level", "warning"]
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    log.info("starting the embedded judge (%s) on loopback; its log: %s", cfg.judge_model or "default",
             out / "judge-server.log")
    with launch_server(args, log_path=out / "judge-server.log") as server:
        yield server.base_url


def run(cfg: JudgeConfig):
    """Judge what is not cached, write the tables, return the summary DataFrame."""
    from tqdm import tqdm

    pairs = pair_answers(read_answers(cfg.a, cfg.a_method), read_answers(cfg.b, cfg.b_method),
                         (cfg.a_name, cfg.b_name), cfg.limit)
    out = Path(cfg.out or f"runs/judge/{safe_name(cfg.a_name, 'method')}-vs-{safe_name(cfg.b_name, 'method')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    api_key = "unused" if cfg.embedded else os.environ.get(cfg.judge_api_key_env, "") or "EMPTY"
    spec = judge_spec(cfg, api_key)
    cache = JudgmentCache(Path(cfg.cache) if cfg.cache else out / "judgments.jsonl")
    items = comparisons(pairs, spec)
    cached_before = {item.key for _, _, item in items if item.key in cache}
    todo = list({item.key: item for _, _, item in items if item.key not in cache}.values())
    log.info("%s vs %s: %d prompts, %d judgments (both orders), %d cached, %d to ask %s", cfg.a_name, cfg.b_name,
             len(pairs), len(items), len(items) - len(todo), len(todo), spec.model)
    if todo:
        with judge_endpoint(cfg, out) as base_url, tqdm(total=len(todo), unit="judgment", desc="judging") as bar:
            judge_all(base_url, api_key, spec, todo, cache, concurrency=cfg.concurrency,
                      max_retries=cfg.max_retries, timeout=cfg.timeout, on_done=lambda: bar.update(1))

    judgments = judgment_table(items, cache, cached_before)
    preferences = preference_table(pairs, judgments, cfg)
    summary = summarize(preferences, cfg, spec.model, spec.read)
    write_tables(out, {"judgments": judgments, "preferences": preferences, "summary": summary})
    shown = summary.drop(columns=["note"]).T.to_string(header=False, float_format=lambda v: f"{v:.4f}")
    print(shown)
    if cfg.embedded:
        print(f"\nnote: {WEAK_JUDGE_NOTE}")
    print(f"\nwritten to {out}/ (judgments, preferences, summary: .parquet and .csv; summary.md)")
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(JudgeConfig, argv, prog="python -m evals.judge",
                       description="Side-by-side of two methods' answers by an LLM judge, both orders, with "
                                   "win rate and AlpacaEval's length-controlled win rate.")
    setup_logging(cfg.log_level)
    run(cfg)


if __name__ == "__main__":
    run_command(main)
