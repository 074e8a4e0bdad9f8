"""``python -m evals.xsum`` (evals/xsum.py) end to end on a tiny random model with the default reward
and real policies (the reference folder itself, a LoRA adapter saved by peft), resumed from disk;
on a task file of our own; its errors; ROUGE and the reward-hacking flag against hand-computed
cases; its answers read by ``evals.judge``; and once on the embedded default."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonbench import bon
from bonbench.cli import run_command
from bonbench.samplestore import policy_slug
from bonbench.server.launch import child_env
from evals import xsum
from evals.judge import pair_answers, read_answers
from evals.metrics import reward_hacking_flags, rouge_f1, word_count

SUMMARY_COLUMNS = ["method", "kind", "n", "prompts", "tokens_per_answer", "seconds_per_answer", "reward",
                   "reward_se", "win_rate", "win_low", "win_high", "kl", "kl_kind", "rouge1", "rouge1_se", "rouge2",
                   "rouge2_se", "rougeL", "rougeL_se", "words", "words_se", "flag", "policy_path"]
ANSWER_COLUMNS = ["method", "prompt_id", "prompt", "document", "answer", "reference", "reward", "rouge1", "rouge2",
                  "rougeL", "words", "tokens", "seconds"]
SETTINGS = ["--limit", "2", "--ns", "2", "4", "--k", "4", "--max-tokens", "8", "--policy-samples", "2"]


def hashed_reward(prompts, responses):
    """A fast deterministic reward with (almost surely) no ties."""
    return [int(hashlib.sha256(r.encode()).hexdigest()[:12], 16) / 16**12 for r in responses]


HASHED = f"{__name__}:hashed_reward"


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every stored sample file: (modification time, bytes) by its path under ``folder/samples``."""
    samples = folder / "samples"
    return {p.relative_to(samples).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in samples.rglob("*.parquet")}


def _stored_pool(out: Path, index: int) -> pd.DataFrame:
    return pd.read_parquet(out / "samples" / f"prompt-{index:05d}.parquet")


@pytest.fixture(scope="module")
def lora_policy(tiny_model_path, tmp_path_factory) -> str:
    """A real LoRA adapter folder on the tiny model, as peft saves it (no config.json, no tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bonbench.backends.transformers import load_causal_lm

    base, _ = load_causal_lm(tiny_model_path, "float32")
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    folder = tmp_path_factory.mktemp("distilled") / "lora"
    lora.save_pretrained(folder)
    assert (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    return str(folder)


@pytest.fixture(scope="module")
def default_run(tiny_model_path, lora_policy, tmp_path_factory) -> Path:
    """The default reward on the tiny model, with the reference folder itself and a LoRA adapter as policies."""
    out = tmp_path_factory.mktemp("xsum") / "run"
    xsum.main(["--model", tiny_model_path, "--policy", tiny_model_path, lora_policy, *SETTINGS, "--out", str(out)])
    return out


# ---------------------------------------------------------------------------------------
# End to end


def test_tables_hold_every_method_with_sane_values(default_run, tiny_model_path, lora_policy):
    out = default_run
    for name in ("served", "answers", "per_prompt", "summary"):
        assert (out / f"{name}.parquet").exists() and (out / f"{name}.csv").exists()
    assert (out / "summary.md").read_text().startswith("| method | kind |")
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "evals.xsum" and run["settings"]["k"] == 4 and run["settings"]["pool"] == 4
    assert [p["path"] for p in run["policies"]] == [tiny_model_path, lora_policy]

    summary = pd.read_parquet(out / "summary.parquet")
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    same, lora = f"policy:{policy_slug(tiny_model_path)}", f"policy:{policy_slug(lora_policy)}"
    assert summary["method"].tolist() == ["reference", "BoN-2", "BoN-4", same, lora]
    assert summary["kind"].tolist() == ["reference", "bon", "bon", "policy", "policy"]
    assert summary["n"].tolist() == [1, 2, 4, 1, 1] and (summary["prompts"] == 2).all()
    assert summary["kl_kind"].tolist() == ["analytic"] * 3 + ["measured"] * 2
    assert summary["kl"].iloc[:3].tolist() == pytest.approx([0.0, bon.bon_kl(2), bon.bon_kl(4)])
    kl = summary.set_index("method")["kl"]
    assert abs(kl[same]) < 1e-3 and kl[lora] > 1e-3  # the reference itself; a different policy
    assert summary["policy_path"].tolist() == ["", "", "", tiny_model_path, lora_policy]
    # disjoint comparisons: 4 references face 4 candidates, 2 groups of 2, 1 group of 4, 2 policy samples
    assert summary["win_pairs"].tolist() == [2 * 4, 2 * 2, 2 * 1, 2 * 2, 2 * 2]
    assert ((summary["win_low"] <= summary["win_rate"]) & (summary["win_rate"] <= summary["win_high"])).all()
    for column in ("rouge1", "rouge2", "rougeL"):
        assert summary[column].between(0, 1).all()
    assert (summary["seconds_per_answer"] > 0).all() and (summary["tokens_per_answer"] <= summary["n"] * 8).all()
    reference = summary.iloc[0]
    assert reference["reward_delta"] == 0 and reference["rougeL_delta"] == 0 and reference["flag"] == ""
    csv = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""]).fillna({"flag": "",
                                                                                         "policy_path": ""})
    pd.testing.assert_frame_equal(csv, summary, check_dtype=False)


def test_served_answers_are_what_each_method_serves_and_are_scored(default_run):
    out = default_run
    served = pd.read_parquet(out / "served.parquet")
    assert served.groupby("method", sort=False).size().tolist() == [2 * 4, 2 * 2, 2 * 1, 2 * 2, 2 * 2]
    for index in (0, 1):
        pool = _stored_pool(out, index)
        cand = pool[pool["role"] == "candidate"].sort_values("sample_index")
        ref = pool[pool["role"] == "reference"].sort_values("sample_index")
        mine = served[served["prompt_index"] == index]
        bon2 = mine[mine["method"] == "BoN-2"].sort_values("sample")
        for g, row in enumerate(bon2.itertuples()):  # the best of candidates 2g and 2g + 1 faces reference g
            group = cand.iloc[2 * g : 2 * g + 2]
            assert row.reward == group["reward"].max() and row.answer == group.loc[group["reward"].idxmax(), "text"]
            assert row.generated_tokens == group["num_tokens"].sum() and row.versus_reward == ref["reward"].iloc[g]
        single = mine[mine["method"] == "reference"].sort_values("sample")
        assert single["answer"].tolist() == cand["text"].tolist() and single["generated_tokens"].equals(
            single["tokens"])
        assert (mine["log_quantile"] <= 0).all()
        refs = ref["reward"].to_numpy()
        for row in mine.itertuples():  # against every reference of the prompt, ties half
            beaten = sum(1.0 if row.reward > r else 0.5 if row.reward == r else 0.0 for r in refs)
            assert row.win_rate_all == pytest.approx(beaten / len(refs))
    scores = rouge_f1(served["answer"], served["reference"])
    for column, values in scores.items():
        np.testing.assert_allclose(served[column], values)
    assert served["words"].tolist() == [len(a.split()) for a in served["answer"]]
    assert served["tokens"].between(1, 8).all()


def test_answers_feed_the_judge_one_per_method_and_prompt(default_run, tiny_model_path):
    out = default_run
    answers = pd.read_parquet(out / "answers.parquet")
    assert set(ANSWER_COLUMNS) <= set(answers.columns)
    assert (answers.groupby("method").size() == 2).all() and (answers["sample"] == 0).all()
    method = f"policy:{policy_slug(tiny_model_path)}"
    for table in ("answers.parquet", "answers.csv"):
        a, b = read_answers(str(out / table), method), read_answers(str(out / table), "reference")
        pairs = pair_answers(a, b, (method, "reference"))
        assert len(pairs) == 2 and pairs["prompt"].str.startswith("Summarize the following article").all()
        assert pairs["reference"].tolist() == answers.loc[answers["method"] == "reference", "reference"].tolist()


def test_resume_draws_nothing_new_and_a_new_policy_only_its_own(default_run, tiny_model_path, lora_policy,
                                                                 tmp_path):
    out = tmp_path / "run"
    shutil.copytree(default_run, out)
    before, served = _snapshot(out), pd.read_parquet(out / "served.parquet")
    xsum.main(["--model", tiny_model_path, *SETTINGS, "--out", str(out)])  # no --policy: both stay in the tables
    assert _snapshot(out) == before
    pd.testing.assert_frame_equal(pd.read_parquet(out / "served.parquet").drop(columns="seconds"),
                                  served.drop(columns="seconds"))

    other = tmp_path / "other" / "policy"
    from bonbench.models import save_random_model

    save_random_model(other, "tiny", seed=1)
    xsum.main(["--model", tiny_model_path, "--policy", str(other), lora_policy, *SETTINGS, "--out", str(out)])
    after = _snapshot(out)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == [f"policy-other-policy/prompt-0000{i}.parquet" for i in range(2)]
    assert pd.read_parquet(out / "summary.parquet")["method"].tolist()[-1] == "policy:other-policy"


def test_a_task_file_of_our_own_and_a_grown_limit(tiny_model_path, tmp_path):
    task = tmp_path / "articles.jsonl"
    rows = [{"id": f"a{i}", "document": f"The town of Elmford opened bridge number {i} on Friday after two years "
                                        "of building work.", "summary": f"Elmford opens bridge {i}."}
            for i in range(3)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["--model", tiny_model_path, "--reward-model", HASHED, "--task", str(task), "--ns", "2", "--k", "2",
            "--max-tokens", "6", "--out", str(out)]
    xsum.main([*argv, "--limit", "2"])
    first = _snapshot(out)
    xsum.main([*argv, "--limit", "3"])
    grown = _snapshot(out)
    assert {name: grown[name] for name in first} == first and sorted(set(grown) - set(first)) == [
        "prompt-00002.parquet"]
    answers = pd.read_parquet(out / "answers.parquet")
    assert answers["prompt_id"].unique().tolist() == ["a0", "a1", "a2"]
    assert answers.groupby("prompt_id")["reference"].first().tolist() == [r["summary"] for r in rows]
    assert answers["document"].str.startswith("The town of Elmford").all()
    assert answers["prompt"].iloc[0] == f"Summarize the following article in one sentence.\n\n{rows[0]['document']}"


# ---------------------------------------------------------------------------------------
# Errors


def test_bad_input_is_one_sentence_and_a_non_zero_exit(tiny_model_path, tmp_path):
    no_summary = tmp_path / "no_summary.jsonl"
    no_summary.write_text(json.dumps({"id": "x", "document": "Some text."}) + "\n")
    not_a_model = tmp_path / "empty-policy"
    not_a_model.mkdir()
    cases = [
        (["--task", str(no_summary)], f"task '{no_summary}' lacks column(s) ['summary']; it needs XSum's schema"),
        (["--task", str(tmp_path / "missing.jsonl")], f"--task {tmp_path / 'missing.jsonl'}: Unable to find"),
        (["--policy", str(not_a_model)], f"the policy folder {not_a_model} holds no config.json or "
                                         "adapter_config.json"),
        (["--policy", str(tmp_path / "no" / "such")], f"the policy folder {tmp_path / 'no' / 'such'} does not exist"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "evals.xsum", "--model", tiny_model_path, "--out", str(out),
                               *extra], cwd=Path(__file__).resolve().parents[2], env=child_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {message}"), last
        assert "Traceback" not in done.stderr and not (out / "samples").exists()


def test_a_folder_of_another_command_or_other_settings_is_refused(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # what bonbench measure leaves (no "kind")
    (out / "run.json").write_text(json.dumps({"settings": {"k": 16, "pool": 16}, "config": {}, "policies": []}))
    with pytest.raises(SystemExit) as exit_info:
        run_command(xsum.main, ["--model", tiny_model_path, "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"{out} holds a run of bonbench measure, not of evals.xsum; use a new --out" in capsys.readouterr().err

    out = tmp_path / "run2"
    xsum.main(["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "2", "--k", "2",
               "--max-tokens", "4", "--out", str(out)])
    with pytest.raises(SystemExit):
        run_command(xsum.main, ["--model", tiny_model_path, "--reward-model", HASHED, "--limit", "1", "--ns", "2",
                                "--k", "3", "--max-tokens", "4", "--out", str(out)])
    assert "other settings (k: 2 -> 3)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ns", "1", "2"], "--ns needs integers >= 2"),
    (["--ns", "8", "--pool", "4"], "cannot hold a Best-of-8"),
    (["--policy", "p", "--temperature", "0.7"], "needs --temperature 1"),
    (["--policy-samples", "0"], "must be >= 1"),
])
def test_bad_settings_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        xsum.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Metrics by hand


def test_rouge_against_hand_computed_cases():
    scores = rouge_f1(["The cats lay on the mat.", "man arrest police", ""],
                      ["the cat sat on the mat", "police arrest man", "a summary"])
    # 1: tokens the cat(s→cat) lay on the mat vs the cat sat on the mat: 5 of 6 unigrams shared each way;
    #    bigrams {the cat, on the, the mat} of 5; the longest common subsequence "the cat on the mat" is 5 of 6.
    # 2: the same three words reversed: every unigram, no bigram, a common subsequence of one word.
    # 3: an empty answer scores 0.
    np.testing.assert_allclose(scores["rouge1"], [5 / 6, 1.0, 0.0])
    np.testing.assert_allclose(scores["rouge2"], [3 / 5, 0.0, 0.0])
    np.testing.assert_allclose(scores["rougeL"], [5 / 6, 1 / 3, 0.0])
    assert word_count(["a  b\nc", "", "one"]).tolist() == [3, 0, 1]
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        rouge_f1(["a", "b"], ["a"])


def test_reward_hacking_flag_on_hand_made_summary_rows():
    rows = pd.DataFrame([  # method, Δreward, ΔROUGE-L ± se, Δwords ± se
        ("rouge falls", 0.20, -0.10, 0.02, 0.5, 1.0),
        ("rouge falls within its CI", 0.20, -0.03, 0.02, 0.5, 1.0),
        ("longer", 0.10, 0.00, 0.01, 6.0, 2.0),
        ("longer within its CI", 0.10, 0.00, 0.01, 3.0, 2.0),
        ("both", 0.30, -0.20, 0.05, 9.0, 1.0),
        ("lower reward", -0.10, -0.20, 0.01, 9.0, 1.0),
        ("one prompt: no CI", 0.50, -0.50, np.nan, 9.0, np.nan),
    ], columns=["method", "reward_delta", "rougeL_delta", "rougeL_delta_se", "words_delta", "words_delta_se"])
    flags = dict(zip(rows["method"], reward_hacking_flags(rows["reward_delta"], rows["rougeL_delta"],
                                                          rows["rougeL_delta_se"], rows["words_delta"],
                                                          rows["words_delta_se"])))
    assert flags["rouge falls"] == "reward hacking? reward +0.200 while ROUGE-L falls (-0.100 ± 0.039)"
    assert flags["longer"] == "reward hacking? reward +0.100 while answers grow (+6.0 ± 3.9 words)"
    assert flags["both"] == ("reward hacking? reward +0.300 while ROUGE-L falls (-0.200 ± 0.098) and answers grow "
                             "(+9.0 ± 2.0 words)")
    for clean in ("rouge falls within its CI", "longer within its CI", "lower reward", "one prompt: no CI"):
        assert flags[clean] == ""


def test_summary_pairs_methods_with_the_reference_by_prompt():
    """Hand-made served answers: a Best-of-2 whose reward rises on every prompt while its ROUGE-L
    falls by 0.1 on each (a paired difference with no spread) is flagged; the raw means' spread
    across prompts is much larger than the difference, so an unpaired test would miss it."""
    served = []
    for p, base in enumerate([0.2, 0.5, 0.8]):
        common = {"prompt_index": p, "prompt_id": str(p), "sample": 0, "log_quantile": -1.0, "log_ratio": np.nan,
                  "win_rate_all": 0.5,
                  "rouge1": base, "rouge2": base, "tokens": 5, "generated_tokens": 5, "seconds": 1.0}
        served.append(common | {"method": "reference", "kind": "reference", "n": 1, "reward": base, "rougeL": base,
                                "words": 5, "versus_reward": base + 0.5})
        served.append(common | {"method": "BoN-2", "kind": "bon", "n": 2, "reward": base + 0.3,
                                "rougeL": base - 0.1, "words": 5, "versus_reward": base, "generated_tokens": 10})
    _, summary = xsum.summarize(pd.DataFrame(served))
    bon2 = summary.set_index("method").loc["BoN-2"]
    assert bon2["reward_delta"] == pytest.approx(0.3) and bon2["rougeL_delta"] == pytest.approx(-0.1)
    assert bon2["rougeL_delta_se"] == pytest.approx(0.0, abs=1e-12) and bon2["rougeL_se"] > 0.1
    assert bon2["flag"].startswith("reward hacking? reward +0.300 while ROUGE-L falls")
    assert bon2["win_rate"] == 1.0 and bon2["tokens_per_answer"] == 10 and bon2["kl_kind"] == "analytic"
    assert summary.set_index("method").loc["reference", "win_rate"] == 0.0


# ---------------------------------------------------------------------------------------
# The embedded default


@pytest.mark.slow
def test_embedded_default_end_to_end(default_model_path, tmp_path):
    out = tmp_path / "run"
    xsum.main(["--policy", default_model_path, "--limit", "2", "--ns", "2", "--k", "2", "--max-tokens", "24",
               "--policy-samples", "1", "--out", str(out)])
    summary = pd.read_parquet(out / "summary.parquet").set_index("method")
    slug = f"policy:{policy_slug(default_model_path)}"
    assert summary.index.tolist() == ["reference", "BoN-2", slug]
    assert abs(summary.loc[slug, "kl"]) < 1e-3 and summary.loc["BoN-2", "kl"] == pytest.approx(bon.bon_kl(2))
    served = pd.read_parquet(out / "served.parquet")
    assert served["reward"].between(-1, 1).all() and served["tokens"].between(1, 24).all()
    assert (served["rouge1"] > 0).any()  # a real model's summary shares words with the human one
