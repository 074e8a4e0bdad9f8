"""``python -m bonbench measure`` (bonbench/measure.py): its estimators against brute force and
theory, and end to end on a tiny random model and on the embedded default."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from bonbench import bon
from bonbench.measure import (
    MeasureConfig,
    bon_pairs,
    duplicate_rate,
    log_quantile_theory,
    main,
    policy_slug,
    prompt_stats,
    summarize,
)

SUMMARY_COLUMNS = [
    "method", "n", "prompts", "reward", "reward_se", "log_quantile", "log_quantile_se", "log_quantile_theory",
    "win_rate", "win_low", "win_high", "win_pairs", "win_rate_all", "win_rate_theory", "kl_measured",
    "kl_measured_se", "kl_analytic", "duplicate_rate", "tokens_per_request", "seconds_per_request", "policy_path",
]
SAMPLE_COLUMNS = [
    "prompt_index", "prompt_id", "role", "policy", "sample_index", "text", "num_tokens", "finish_reason", "logprob",
    "ref_logprob", "sample_seconds", "reward", "reward_seconds", "created",
]
TIMING = ["seconds_per_request"]


def hashed_reward(prompts, responses):
    """A deterministic, continuous reward: distinct answers (almost surely) get distinct rewards."""
    return [int(hashlib.sha256(r.encode()).hexdigest()[:12], 16) / 16**12 for r in responses]


def constant_reward(prompts, responses):
    return [0.5 for _ in responses]


HASHED = f"{__name__}:hashed_reward"
CONSTANT = f"{__name__}:constant_reward"


# ---------------------------------------------------------------------------------------
# Estimators


def test_log_quantile_theory_matches_simulation():
    rng = np.random.default_rng(0)
    k, draws = 16, 400_000
    for n in (1, 2, 8):
        quantile = rng.random((draws, n)).max(axis=1)  # the BoN sample's p≤ for continuous rewards
        counts = rng.binomial(k, quantile)
        values = np.log((counts + 1) / (k + 1))
        assert abs(values.mean() - log_quantile_theory(n, k)) < 4 * values.std() / math.sqrt(draws)
    # k -> infinity: E[log p≤] of the largest of n uniforms is -1/n
    assert log_quantile_theory(4, 20_000) == pytest.approx(-0.25, abs=1e-3)


def test_bon_pairs_take_disjoint_groups_in_draw_order():
    cand, ref = [1.0, 5.0, 2.0, 3.0, 9.0, 0.0, 4.0], [10.0, 11.0, 12.0]
    best, theirs = bon_pairs(cand, ref, 2)
    assert best.tolist() == [5.0, 3.0, 9.0] and theirs.tolist() == [10.0, 11.0, 12.0]
    best, theirs = bon_pairs(cand, ref[:1], 1)  # never more groups than references
    assert best.tolist() == [1.0] and theirs.tolist() == [10.0]


def test_duplicate_rate_counts_identical_pairs():
    assert duplicate_rate(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert duplicate_rate(["a", "b", "c", "d"]) == 0
    assert math.isnan(duplicate_rate(["a"]))


def _fake_samples(rewards_by_role: dict[str, np.ndarray], prompt_index: int = 0) -> pd.DataFrame:
    rows = []
    for role, rewards in rewards_by_role.items():
        for j, r in enumerate(rewards):
            rows.append({"prompt_index": prompt_index, "prompt_id": f"p{prompt_index}", "role": role,
                         "sample_index": j, "text": f"{role}-{j}-{r}", "num_tokens": 10 + j,
                         "finish_reason": "stop", "logprob": -5.0 - j, "ref_logprob": -5.5 - j,
                         "sample_seconds": 0.1, "reward": float(r), "reward_seconds": 0.01})
    return pd.DataFrame(rows)


def test_prompt_stats_equal_brute_force_over_all_subsets():
    rng = np.random.default_rng(1)
    ref, cand, pol = rng.normal(size=6), rng.normal(size=5), rng.normal(size=3)
    cand[3] = ref[2]  # a tie between a candidate and a reference
    rows, pairs = prompt_stats(_fake_samples({"reference": ref, "candidate": cand, "policy": pol}), [1, 2, 3])
    by_method = {row["method"]: row for row in rows}
    pool = np.concatenate([ref, cand])
    for n in (1, 2, 3):
        row = by_method[f"BoN-{n}"]
        subsets = list(itertools.combinations(range(len(cand)), n))
        best = [max(cand[list(s)]) for s in subsets]
        log_q = [np.log((np.sum(ref <= b) + 1) / (len(ref) + 1)) for b in best]
        win_all = [np.mean((ref < b) + 0.5 * (ref == b)) for b in best]
        reward = np.mean([max(pool[list(s)]) for s in itertools.combinations(range(len(pool)), n)])
        assert row["log_quantile"] == pytest.approx(np.mean(log_q))
        assert row["win_rate_all"] == pytest.approx(np.mean(win_all))
        assert row["reward"] == pytest.approx(reward)
        assert row["win_pairs"] == len(cand) // n
        assert row["tokens_per_request"] == pytest.approx(n * np.mean([10 + j for j in range(6)] + [10 + j for j in range(5)]))
    policy = by_method["policy"]
    assert policy["reward"] == pytest.approx(pol.mean())
    assert policy["kl_measured"] == pytest.approx(0.5)
    assert policy["log_quantile"] == pytest.approx(np.mean([np.log((np.sum(ref <= p) + 1) / 7) for p in pol]))
    assert pairs["policy"][1].tolist() == ref[:3].tolist()  # policy sample i faces reference i


def test_bon_rank_metrics_agree_with_theory_on_continuous_rewards():
    """With continuous rewards every BoN rank metric is distribution-free: the pipeline must
    reproduce N/(N+1) and the log-quantile expectation within its own error bars."""
    rng = np.random.default_rng(2)
    k, pool, ns = 16, 8, [1, 2, 4, 8]
    frames = [_fake_samples({"reference": rng.random(k), "candidate": rng.random(pool)}, prompt_index=i)
              for i in range(600)]
    per_prompt, summary = summarize(pd.concat(frames, ignore_index=True), ns, k)
    assert len(per_prompt) == 600 * len(ns)
    for row in summary.itertuples():
        assert row.win_low <= row.win_rate_theory <= row.win_high
        assert abs(row.log_quantile - row.log_quantile_theory) < 4 * row.log_quantile_se
        assert abs(row.win_rate_all - row.win_rate_theory) < 0.02
        assert row.kl_analytic == pytest.approx(bon.bon_kl(row.n)) and math.isnan(row.kl_measured)
    assert summary["reward"].is_monotonic_increasing


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
    with pytest.raises(ValueError, match="drawn with --policy-samples 3, not 2"):
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
    with pytest.raises(ValueError, match=r"other settings \(k: 4 -> 5\)"):
        main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "1", "2", "--k", "5",
              "--max-tokens", "6", "--out", str(out)])
    with pytest.raises(ValueError, match=r"other settings \(max_tokens: 6 -> 7\)"):  # a policy changes no pool
        main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "1", "2", "--k", "4",
              "--max-tokens", "7", "--policy", tiny_model_path, "--out", str(out)])
    with pytest.raises(ValueError, match="too few for Best-of-4"):
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


@pytest.mark.parametrize("argv, message", [
    (["--ns", "1", "4", "--pool", "2"], "cannot hold a Best-of-4"),
    (["--policy", "x", "--temperature", "0.7"], "needs --temperature 1"),
    (["--k", "0"], "--k must be >= 1"),
    (["--temperature", "0"], "distinct random samples"),
])
def test_bad_settings_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_defaults_match_the_documented_command():
    cfg = MeasureConfig()
    assert (cfg.ns, cfg.k, cfg.max_tokens, cfg.split, cfg.model, cfg.reward_model) == (
        [1, 2, 4, 8, 16], 16, 48, "test", "default", "default")


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
