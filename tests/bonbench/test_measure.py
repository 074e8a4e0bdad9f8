"""``python -m bonbench measure`` (bonbench/measure.py) end to end: on a tiny random model, with a
judge on loopback, from the command line, and once on the embedded default; and its documented
commands against the committed report they made."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonbench import bon, measure
from bonbench.config import parse_config
from bonbench.cli import run_command
from bonbench.errors import UserError
from bonbench.measure import MeasureConfig, main
from bonbench.samplestore import POOL_SETTINGS, policy_slug
from bonbench.server.launch import child_env

REPO = Path(__file__).resolve().parents[2]
SUMMARY_COLUMNS = [
    "method", "n", "prompts", "reward", "reward_se", "log_quantile", "log_quantile_se", "log_quantile_theory",
    "win_rate", "win_low", "win_high", "win_pairs", "win_rate_all", "win_rate_theory", "kl_measured",
    "kl_measured_se", "kl_analytic", "duplicate_rate", "tokens_per_request", "seconds_per_request", "policy_path",
]
SAMPLE_COLUMNS = [
    "prompt_index", "prompt_id", "role", "policy", "sample_index", "text", "num_tokens", "finish_reason", "logprob",
    "ref_logprob", "self_certainty", "sample_seconds", "reward", "reward_seconds", "partial_seconds", "created",
]
TIMING = ["seconds_per_request"]


def hashed_reward(prompts, responses):
    """A deterministic, continuous reward: distinct answers (almost surely) get distinct rewards."""
    return [int(hashlib.sha256(r.encode()).hexdigest()[:12], 16) / 16**12 for r in responses]


def constant_reward(prompts, responses):
    return [0.5 for _ in responses]


def partial_reward(prompts, responses):
    """``hashed_reward``, able to score unfinished answers too (on another hash)."""
    return hashed_reward(prompts, responses)


partial_reward.score_partial = lambda prompts, responses: hashed_reward(prompts, [f"partial:{r}" for r in responses])

HASHED = f"{__name__}:hashed_reward"
CONSTANT = f"{__name__}:constant_reward"
PARTIAL = f"{__name__}:partial_reward"


# ---------------------------------------------------------------------------------------
# End to end on the tiny random model


def _run(model, out, *extra, limit=3, reward=HASHED):
    main(["--model", model, "--reward-model", reward, "--limit", str(limit), "--ns", "1", "2", "--k", "4",
          "--max-tokens", "6", "--batch-prompts", "2", "--out", str(out), *extra])
    return pd.read_parquet(out / "summary.parquet"), pd.read_parquet(out / "samples.parquet")


def test_writes_tables_with_sane_values(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    summary, samples = _run(tiny_model_path, out, "--policy", tiny_model_path, "--policy-samples", "2")
    for name in ("samples", "per_prompt", "summary"):
        assert (out / f"{name}.parquet").exists() and (out / f"{name}.csv").exists()
    assert (out / "summary.md").read_text().startswith("| method |")
    assert json.loads((out / "run.json").read_text())["settings"]["pool"] == 2
    assert "BoN-2" in capsys.readouterr().out

    slug = policy_slug(tiny_model_path)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["method"].tolist() == ["BoN-1", "BoN-2", f"policy:{slug}"]
    assert summary["policy_path"].tolist() == ["", "", tiny_model_path]
    assert list(samples.columns) == SAMPLE_COLUMNS
    assert len(samples) == 3 * (4 + 2 + 2)
    assert samples.groupby("role").size().to_dict() == {"reference": 12, "candidate": 6, "policy": 6}
    assert (samples["policy"] == samples["role"].map({"policy": slug}).fillna("")).all()
    assert sorted(p.name for p in (out / "samples" / f"policy-{slug}").iterdir()) == [
        f"prompt-0000{i}.parquet" for i in range(3)]
    per_prompt = pd.read_parquet(out / "per_prompt.parquet")
    assert len(per_prompt) == 3 * 3 and per_prompt["prompt_id"].nunique() == 3
    csv = pd.read_csv(out / "summary.csv").fillna({"policy_path": ""})
    pd.testing.assert_frame_equal(csv, summary, check_dtype=False)

    assert ((summary["win_rate"] >= 0) & (summary["win_rate"] <= 1)).all()
    assert ((summary["win_low"] <= summary["win_rate"]) & (summary["win_rate"] <= summary["win_high"])).all()
    assert summary["win_pairs"].tolist() == [3 * 2, 3 * 1, 3 * 2]
    assert (summary["log_quantile"] <= 0).all() and (summary["prompts"] == 3).all()
    assert summary["kl_analytic"].iloc[:2].tolist() == pytest.approx([0.0, bon.bon_kl(2)])
    assert summary["win_rate_theory"].iloc[:2].tolist() == pytest.approx([0.5, 2 / 3])
    assert (samples["num_tokens"].between(1, 6)).all()
    assert (summary["tokens_per_request"] <= summary["n"] * 6).all()
    assert (summary["seconds_per_request"] > 0).all()
    # The policy is the reference itself: log π − log π_ref vanishes sample by sample.
    policy = samples[samples["role"] == "policy"]
    assert (policy["logprob"] - policy["ref_logprob"]).abs().max() < 1e-3
    assert abs(summary.set_index("method").loc[f"policy:{slug}", "kl_measured"]) < 1e-3
    assert json.loads((out / "run.json").read_text())["policies"] == [
        {"slug": slug, "path": tiny_model_path, "resolved": tiny_model_path, "policy_samples": 2}]


def _snapshot(folder):
    """Every sample file under ``folder``: (modification time, bytes) by relative path."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*.parquet")}


def test_policies_join_an_existing_pool_without_redrawing_it(tiny_model_path, tmp_path):
    """Best-of-N first; then two policies against the same pool, each in files of its own; then a
    grown --limit: only the new prompt is sampled, and the result is that of a fresh run."""
    from bonbench.models import save_random_model

    other = str(save_random_model(tmp_path / "other" / "policy", "tiny", seed=1))
    same, slug = policy_slug(tiny_model_path), policy_slug(other)
    assert slug == "other-policy" and same != slug
    out = tmp_path / "run"
    _, bon_only = _run(tiny_model_path, out, limit=2)
    pool = _snapshot(out / "samples")
    assert sorted(pool) == ["prompt-00000.parquet", "prompt-00001.parquet"]

    # the reference itself as the policy: only its own files are written
    summary, samples = _run(tiny_model_path, out, "--policy", tiny_model_path, "--policy-samples", "2", limit=2)
    files = _snapshot(out / "samples")
    assert {name: files[name] for name in pool} == pool
    assert sorted(set(files) - set(pool)) == [f"policy-{same}/prompt-0000{i}.parquet" for i in range(2)]
    pd.testing.assert_frame_equal(samples[samples["role"] != "policy"].reset_index(drop=True), bon_only)
    assert summary["method"].tolist() == ["BoN-1", "BoN-2", f"policy:{same}"]
    assert summary["policy_path"].tolist() == ["", "", tiny_model_path]
    assert summary["win_pairs"].iloc[2] == 2 * 2 and abs(summary["kl_measured"].iloc[2]) < 1e-3

    # a second policy adds a second row and touches nothing else
    summary, samples = _run(tiny_model_path, out, "--policy", other, "--policy-samples", "3", limit=2)
    more = _snapshot(out / "samples")
    assert {name: more[name] for name in files} == files
    assert sorted(set(more) - set(files)) == [f"policy-{slug}/prompt-0000{i}.parquet" for i in range(2)]
    assert summary["method"].tolist() == ["BoN-1", "BoN-2", f"policy:{same}", f"policy:{slug}"]
    assert summary["policy_path"].tolist() == ["", "", tiny_model_path, other]
    theirs = samples[samples["policy"] == slug]
    assert len(theirs) == 2 * 3 and (theirs["logprob"] - theirs["ref_logprob"]).abs().min() > 1e-3
    assert [p["slug"] for p in json.loads((out / "run.json").read_text())["policies"]] == [same, slug]
    with pytest.raises(UserError, match="drawn with --policy-samples 3, not 2"):
        _run(tiny_model_path, out, "--policy", other, "--policy-samples", "2", limit=2)

    # resume with a grown --limit: the new prompt's pool and the policy's samples of it, nothing else
    summary, samples = _run(tiny_model_path, out, "--policy", tiny_model_path, "--policy-samples", "2", limit=3)
    last = _snapshot(out / "samples")
    assert {name: last[name] for name in more} == more
    assert sorted(set(last) - set(more)) == [f"policy-{same}/prompt-00002.parquet", "prompt-00002.parquet"]
    new = samples[samples["prompt_index"] == 2]
    assert new["created"].min() > samples.loc[samples["prompt_index"] < 2, "created"].max()
    assert summary.set_index("method")["prompts"].to_dict() == {
        "BoN-1": 3, "BoN-2": 3, f"policy:{same}": 3, f"policy:{slug}": 2}

    fresh_summary, fresh_samples = _run(tiny_model_path, tmp_path / "fresh", "--policy", tiny_model_path,
                                        "--policy-samples", "2", limit=3)
    columns = [c for c in SAMPLE_COLUMNS if c not in ("created", "sample_seconds", "reward_seconds")]
    ours = samples[samples["policy"] != slug].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours[columns], fresh_samples[columns])
    ours = summary[summary["method"] != f"policy:{slug}"].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING), fresh_summary.drop(columns=TIMING))


def test_resume_refuses_other_settings_and_ns_beyond_the_pool(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    _run(tiny_model_path, out, limit=1)
    with pytest.raises(UserError, match=r"other settings \(k: 4 -> 5\)"):
        main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "1", "2", "--k", "5",
              "--max-tokens", "6", "--out", str(out)])
    with pytest.raises(UserError, match=r"other settings \(max_tokens: 6 -> 7\)"):  # a policy changes no pool
        main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "1", "2", "--k", "4",
              "--max-tokens", "7", "--policy", tiny_model_path, "--out", str(out)])
    with pytest.raises(UserError, match="too few for Best-of-4"):
        main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "4", "--k", "4",
              "--max-tokens", "6", "--out", str(out)])
    # fewer Ns on the same pool is fine, and samples nothing new
    main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "2", "--k", "4",
          "--max-tokens", "6", "--out", str(out)])
    assert pd.read_parquet(out / "summary.parquet")["method"].tolist() == ["BoN-2"]


def test_tied_rewards_count_half(tiny_model_path, tmp_path):
    summary, _ = _run(tiny_model_path, tmp_path / "run", reward=CONSTANT)
    assert summary["win_rate"].tolist() == [0.5, 0.5]
    assert summary["win_rate_all"].tolist() == [0.5, 0.5]
    assert summary["log_quantile"].tolist() == [0.0, 0.0]  # every reference is <= a tied answer
    assert summary["reward"].tolist() == pytest.approx([0.5, 0.5])


def test_lora_adapter_policy_is_loaded_on_the_reference(tiny_model_path, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from bonbench.backends.transformers import load_causal_lm

    base, _ = load_causal_lm(tiny_model_path, "float32")
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()

    summary, samples = _run(tiny_model_path, tmp_path / "run", "--policy", str(adapter), "--policy-samples", "3")
    policy = samples[samples["role"] == "policy"]
    gap = policy["logprob"] - policy["ref_logprob"]
    assert len(policy) == 9 and gap.abs().min() > 1e-3  # a different policy from the reference
    kl = summary.set_index("method").loc[f"policy:{policy_slug(str(adapter))}", "kl_measured"]
    assert np.isfinite(kl) and kl > 0


# ---------------------------------------------------------------------------------------
# Selection rules and early rejection on the same pool


VARIANTS = ["--partial-at", "2", "4", "--rules", "argmax", "soft:temperature=0.1", "self-certainty", "majority",
            "--early-rejection", "2:0.5", "2,4:1"]


def _variant_run(model, out, limit=3):
    # one prompt a batch: a prompt's log-probabilities and self-certainties then carry no float noise from
    # the padding of other prompts, so a resumed run and a fresh one agree to the last bit
    main(["--model", model, "--reward-model", PARTIAL, "--limit", str(limit), "--ns", "1", "2", "4", "--k", "4",
          "--max-tokens", "6", "--batch-prompts", "1", "--out", str(out), *VARIANTS])
    return pd.read_parquet(out / "summary.parquet"), pd.read_parquet(out / "samples.parquet")


@pytest.fixture(scope="module")
def variant_run(tiny_model_path, tmp_path_factory) -> Path:
    """A run of three prompts with four rules and two early-rejection plans (kept whole: tests copy it)."""
    out = tmp_path_factory.mktemp("variants") / "run"
    _variant_run(tiny_model_path, out)
    return out


def test_rules_and_early_rejection_are_rows_measured_on_the_same_candidates(variant_run):
    summary = pd.read_parquet(variant_run / "summary.parquet").set_index("method")
    samples = pd.read_parquet(variant_run / "samples.parquet")
    assert summary.index.tolist() == [
        "BoN-1", "BoN-2", "BoN-4",
        "BoN-2:argmax", "BoN-4:argmax", "BoN-2:soft(temperature=0.1)", "BoN-4:soft(temperature=0.1)",
        "BoN-2:self-certainty", "BoN-4:self-certainty", "BoN-2:majority", "BoN-4:majority",
        "ER-2:2:0.5", "ER-4:2:0.5", "ER-2:2,4:1", "ER-4:2,4:1"]
    assert list(samples.columns) == SAMPLE_COLUMNS + ["partial_reward_2", "partial_reward_4"]
    assert samples["self_certainty"].notna().all() and (samples["self_certainty"] > 0).all()
    candidates = samples["role"] == "candidate"
    for c in (2, 4):
        scored = samples[f"partial_reward_{c}"].notna()
        assert (scored == (candidates & (samples["num_tokens"] > c))).all()
    for n in (2, 4):
        argmax, plain = summary.loc[f"BoN-{n}:argmax"], summary.loc[f"BoN-{n}"]
        # the argmax on the disjoint groups makes Best-of-N's own comparisons
        win = ["win_rate", "win_low", "win_high", "win_pairs"]
        assert argmax[win].tolist() == plain[win].tolist()
        # early rejection that keeps every candidate serves what the argmax serves, for as many tokens
        keep_all = summary.loc[f"ER-{n}:2,4:1"]
        pd.testing.assert_series_equal(keep_all.drop("seconds_per_request"), argmax.drop("seconds_per_request"),
                                       check_names=False)
        assert keep_all["seconds_per_request"] >= argmax["seconds_per_request"]  # and scores partial answers
        rejecting = summary.loc[f"ER-{n}:2:0.5"]
        assert rejecting["tokens_per_request"] < argmax["tokens_per_request"]
        assert rejecting["tokens_per_request"] <= plain["tokens_per_request"]
        assert rejecting["win_pairs"] == plain["win_pairs"]
    variants = summary[summary.index.str.contains(":")]
    assert variants[["kl_measured", "kl_analytic", "win_rate_theory", "log_quantile_theory"]].isna().all().all()
    assert ((variants["win_low"] <= variants["win_rate"]) & (variants["win_rate"] <= variants["win_high"])).all()


def test_a_run_with_partial_rewards_resumes_and_refuses_other_checkpoints(tiny_model_path, variant_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(variant_run, out)
    before = _snapshot(out / "samples")
    summary, samples = _variant_run(tiny_model_path, out, limit=4)
    after = _snapshot(out / "samples")
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["prompt-00003.parquet"]
    fresh_summary, fresh_samples = _variant_run(tiny_model_path, tmp_path / "fresh", limit=4)
    columns = [c for c in samples.columns if c not in ("created", "sample_seconds", "reward_seconds",
                                                       "partial_seconds")]
    pd.testing.assert_frame_equal(samples[columns], fresh_samples[columns])
    pd.testing.assert_frame_equal(summary.drop(columns=TIMING), fresh_summary.drop(columns=TIMING))
    with pytest.raises(UserError, match=r"other settings \(partial_at: \[2, 4\] -> \[2\]\)"):
        main(["--model", tiny_model_path, "--reward-model", PARTIAL, "--limit", "4", "--ns", "1", "2", "--k", "4",
              "--max-tokens", "6", "--partial-at", "2", "--out", str(out)])


def test_an_old_run_folder_resumes_with_the_new_options_at_their_defaults(tiny_model_path, tmp_path):
    """A folder written before pools stored self-certainty and partial rewards: its run.json has no
    partial_at and its samples lack the new columns. It resumes, grows, and measures the rules that
    read what it holds; the others, and other checkpoints, are refused in a sentence."""
    out = tmp_path / "run"
    _run(tiny_model_path, out, limit=2, reward=PARTIAL)
    run_json = json.loads((out / "run.json").read_text())
    del run_json["settings"]["partial_at"]
    for key in ("partial_at", "rules", "early_rejection"):
        del run_json["config"][key]
    (out / "run.json").write_text(json.dumps(run_json))
    for path in (out / "samples").glob("*.parquet"):
        pd.read_parquet(path).drop(columns=["self_certainty", "partial_seconds"]).to_parquet(path, index=False)

    summary, samples = _run(tiny_model_path, out, "--rules", "argmax", limit=2, reward=PARTIAL)  # nothing to draw
    assert summary["method"].tolist() == ["BoN-1", "BoN-2", "BoN-2:argmax"]
    assert list(samples.columns) == SAMPLE_COLUMNS and samples["self_certainty"].isna().all()
    summary, samples = _run(tiny_model_path, out, "--rules", "argmax", "majority", reward=PARTIAL)
    assert summary["method"].tolist() == ["BoN-1", "BoN-2", "BoN-2:argmax", "BoN-2:majority"]
    assert samples.groupby("prompt_index")["self_certainty"].count().tolist() == [0, 0, 6]  # only the new pool's
    with pytest.raises(UserError, match="lacks for 2 prompts"):
        _run(tiny_model_path, out, "--rules", "self-certainty", reward=PARTIAL)
    with pytest.raises(UserError, match=r"other settings \(partial_at: \[\] -> \[2\]\)"):
        _run(tiny_model_path, out, "--partial-at", "2", "--early-rejection", "2:0.5", reward=PARTIAL)


def test_partial_rewards_need_a_reward_that_scores_unfinished_answers(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"--partial-at needs a reward that scores unfinished answers "
                                        f"\\(score_partial\\); --reward-model {HASHED} has none"):
        _run(tiny_model_path, out, "--partial-at", "2")
    assert not (out / "samples").exists()


def test_the_early_rejection_report_is_written_from_a_run(variant_run, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_report", REPO / "reports/early-rejection/make_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.main([str(variant_run), str(tmp_path)])
    text = (tmp_path / "README.md").read_text()
    summary = pd.read_parquet(variant_run / "summary.parquet")
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert sorted(line.split(" | ")[0].removeprefix("| ") for line in table) == sorted(summary["method"])
    assert (tmp_path / "cost_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the command it prints makes the same pool, prompts and rows as the one that made the run
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith("python -m bonbench measure"))
    cfg = dataclasses.asdict(parse_config(MeasureConfig, shlex.split(line.removeprefix("python -m bonbench measure "))))
    made = json.loads((variant_run / "run.json").read_text())["config"]
    same = [*POOL_SETTINGS, "limit", "ns", "rules", "early_rejection"]
    assert {k: cfg[k] for k in same} == {k: made[k] for k in same}


@pytest.mark.parametrize("argv, message", [
    (["--ns", "1", "4", "--pool", "2"], "cannot hold a Best-of-4"),
    (["--rules", "best"], "unknown selection rule 'best'"),
    (["--rules", "soft:temperature=-1"], "needs temperature > 0"),
    (["--rules", "majority:beta=1"], "selection 'majority' takes no parameters"),
    (["--early-rejection", "8"], "CHECKPOINTS:KEEP"),
    (["--early-rejection", "8:1.5", "--partial-at", "8"], "in (0, 1]"),
    (["--early-rejection", "8,16:0.5", "--partial-at", "8"], "each checkpoint must be one of --partial-at (now 8)"),
    (["--early-rejection", "8:0.5"], "must be one of --partial-at (now none)"),
    (["--partial-at", "48"], "--partial-at needs token counts from 1 to --max-tokens - 1 (47)"),
    (["--rules", "majority", "--ns", "1"], "measured at each N > 1 of --ns; it has none"),
    (["--policy", "x", "--temperature", "0.7"], "needs --temperature 1"),
    (["--k", "0"], "--k must be >= 1"),
    (["--temperature", "0"], "distinct random samples"),
    (["--reward-model", "judge"], "--reward-model judge needs --judge-model"),
    (["--judge-model", "g"], "read only with --reward-model judge"),
])
def test_bad_settings_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m bonbench measure`` command in the module's docstring and the READMEs,
    as (where, argv): continued lines joined, comments cut, ``<placeholders>`` filled in."""
    sources = {"bonbench/measure.py": measure.__doc__}
    sources |= {str(path.relative_to(REPO)): path.read_text()
                for path in [REPO / "README.md", *sorted((REPO / "reports").glob("*/README.md"))]}
    commands = []
    for where, text in sources.items():
        for line in text.replace("\\\n", " ").splitlines():
            command = line.strip().removeprefix("$ ")
            if command.startswith("python -m bonbench measure "):
                rest = command.removeprefix("python -m bonbench measure ").split("#")[0]
                commands.append((where, shlex.split(re.sub(r"<[^>]*>", "X", rest))))
    return commands


def test_documented_commands_parse_and_share_the_pool_of_the_committed_report():
    """Each documented command is valid (every option exists and passes the config's checks), and
    those that write to ``reports/measure-default`` are the command that report's ``run.json``
    records, so its tables are what they reproduce."""
    commands = documented_commands()
    wheres = {where for where, _ in commands}
    assert {"bonbench/measure.py", "README.md", "reports/measure-default/README.md"} <= wheres
    report = json.loads((REPO / "reports/measure-default/run.json").read_text())
    into_report = 0
    for where, argv in commands:
        cfg = parse_config(MeasureConfig, argv)
        if cfg.out != "reports/measure-default":
            continue
        into_report += 1
        config = dataclasses.asdict(cfg)  # the options the report records (its policies come and go)
        assert {k: config[k] for k in report["config"] if k not in ("policy", "policy_samples")} == {
            k: v for k, v in report["config"].items() if k not in ("policy", "policy_samples")}, where
    assert into_report >= 4


def test_a_missing_policy_folder_is_one_sentence_before_any_model_work(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "bonbench", "measure", "--policy", "/nonexistent/policy",
                           "--out", str(out)], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the policy folder /nonexistent/policy does not exist: pass an existing folder or a Hugging Face "
        "id (organisation/name).")
    assert "Traceback" not in done.stderr and not out.exists()


@contextlib.contextmanager
def loopback_judge():
    """An OpenAI-compatible chat endpoint on a loopback port that grades each answer
    ``1 + len(answer) % 10``; yields its base URL and the (path, auth header, model, answer) of
    each request it served."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][0]["content"]
            answer = content.split("\n\nAnswer:\n", 1)[1].rsplit("\n\nReply with", 1)[0]
            seen.append((self.path, self.headers.get("Authorization"), body["model"], answer))
            reply = json.dumps({"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                    "role": "assistant", "content": str(1 + len(answer) % 10)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_judge_reward_reaches_the_named_judge_with_the_key_from_the_environment(tiny_model_path, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "s3cret-key")
    out = tmp_path / "run"
    with loopback_judge() as (url, seen):
        summary, samples = _run(tiny_model_path, out, "--judge-model", "grader", "--judge-base-url", url,
                                "--judge-api-key-env", "JUDGE_KEY", limit=2, reward="judge")
    assert len(seen) == len(samples) == 2 * (4 + 2)
    assert {(path, auth, model) for path, auth, model, _ in seen} == {
        ("/v1/chat/completions", "Bearer s3cret-key", "grader")}
    assert samples["reward"].tolist() == [1 + len(text) % 10 for text in samples["text"]]
    run_json = (out / "run.json").read_text()
    assert json.loads(run_json)["settings"]["judge_model"] == "grader" and "s3cret-key" not in run_json
    with pytest.raises(UserError, match=r"other settings \(judge_model: 'grader' -> 'other'\)"):
        _run(tiny_model_path, out, "--judge-model", "other", limit=2, reward="judge")


def test_an_unset_judge_key_variable_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, ["--reward-model", "judge", "--judge-model", "g", "--judge-api-key-env",
                           "NO_SUCH_KEY_VARIABLE"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --judge-api-key-env NO_SUCH_KEY_VARIABLE: no such "
                                               "environment variable is set")


# ---------------------------------------------------------------------------------------
# The embedded default, end to end


@pytest.mark.slow
def test_embedded_default_end_to_end(default_model_path, tmp_path):
    out = tmp_path / "run"
    main(["--model", default_model_path, "--policy", default_model_path, "--policy-samples", "2",
          "--limit", "2", "--ns", "1", "2", "--k", "4", "--max-tokens", "24", "--out", str(out)])
    summary = pd.read_parquet(out / "summary.parquet").set_index("method")
    samples = pd.read_parquet(out / "samples.parquet")
    slug = policy_slug(default_model_path)
    assert summary.index.tolist() == ["BoN-1", "BoN-2", f"policy:{slug}"]
    assert len(samples) == 2 * (4 + 2 + 2)
    assert samples["reward"].between(-1, 1).all() and samples["num_tokens"].between(1, 24).all()
    assert (samples["text"].str.len() > 0).any()
    assert ((summary["win_low"] <= summary["win_rate"]) & (summary["win_rate"] <= summary["win_high"])).all()
    policy = samples[samples["role"] == "policy"]
    assert (policy["logprob"] - policy["ref_logprob"]).abs().max() < 1e-3
    assert abs(summary.loc[f"policy:{slug}", "kl_measured"]) < 1e-3
