"""``python -m evals.benchmarks`` end to end on a tiny random model: lm-eval's hf model for the
reference, a merged policy and a LoRA adapter; Best-of-N through a real bonbench server on loopback
with lm-eval's local-chat-completions; resume; the local tasks' metrics on hand-made answers; and the
one-sentence errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bonbench.cli import run_command
from evals.benchmarks import COLUMNS, BenchmarkConfig, BenchmarkError, main, run
from evals.tasks import make_data
from evals.tasks.utils import follows, qa_exact_match

LOCAL = ["bonbench_qa", "bonbench_mc", "bonbench_if"]


# ---------------------------------------------------------------------------------------
# The local tasks' data and metrics


@pytest.mark.parametrize("response, ids, kwargs, expected", [
    ("Calm, deep, blue.", ["word_count"], [{"words": 3}], [True]),
    ("Calm - deep blue", ["word_count"], [{"words": 3}], [True]),  # a lone dash is no word
    ("The ocean is deep.", ["word_count"], [{"words": 3}], [False]),
    ("the moon shines bright tonight", ["lowercase"], [{}], [True]),
    ("The moon shines", ["lowercase"], [{}], [False]),
    ("123 !", ["lowercase"], [{}], [False]),  # no letters: nothing was written in lowercase
    ("WHAT A NIGHT, 2024!", ["uppercase"], [{}], [True]),
    ("WHAT a night", ["uppercase"], [{}], [False]),
    ("Do cats dream?  \n", ["ends_with"], [{"end": "?"}], [True]),
    ("Do cats dream? Yes.", ["ends_with"], [{"end": "?"}], [False]),
    ("Rain falls softly on the roof", ["no_commas"], [{}], [True]),
    ("Rain falls, softly", ["no_commas"], [{}], [False]),
    ("Today, the sun rose.", ["starts_with"], [{"word": "today"}], [True]),
    ("\"Today\" the sun rose.", ["starts_with"], [{"word": "today"}], [True]),
    ("Yesterday and today", ["starts_with"], [{"word": "today"}], [False]),
    ("The sky was blue.", ["includes_word"], [{"word": "blue"}], [True]),
    ("The bluebird sang.", ["includes_word"], [{"word": "blue"}], [False]),
    ("Is the sea cold?", ["max_words", "ends_with"], [{"words": 8}, {"end": "?"}], [True, True]),
    ("Is the sea ever as cold as the winter wind?", ["max_words", "ends_with"],
     [{"words": 8}, {"end": "?"}], [False, True]),
    ("", ["max_words"], [{"words": 8}], [False]),  # an empty answer follows no instruction
    # Arrow gives every row's kwargs every key of the column, absent ones as None
    ("soft warm rain falls down", ["word_count", "lowercase"],
     [{"words": 5, "end": None, "word": None}, {"words": None, "end": None, "word": None}], [True, True]),
])
def test_instruction_checkers_on_hand_made_answers(response, ids, kwargs, expected):
    assert follows(response, ids, kwargs) == expected


def test_an_unknown_instruction_id_is_an_error():
    with pytest.raises(KeyError, match="unknown instruction id"):
        follows("anything", ["rhymes"], [{}])


@pytest.mark.parametrize("response, answers, expected", [
    ("Paris", ["Paris"], True),
    (" paris.\n", ["Paris"], True),
    ("The Pacific", ["Pacific"], True),  # articles and case are normalised away
    ("Paris\nIt is the largest city of France.", ["Paris"], True),  # the first line is the answer
    ("\n\nParis", ["Paris"], True),
    ("It is Paris.", ["Paris"], False),  # exact match, not containment
    ("twenty-four", ["24", "twenty-four", "twenty four"], True),
    ("twenty four", ["24", "twenty-four", "twenty four"], True),
    ("14", ["24", "twenty-four", "twenty four"], False),
    ("", ["Paris"], False),
])
def test_short_answer_exact_match_on_hand_made_answers(response, answers, expected):
    assert qa_exact_match(response, answers) is expected


def test_committed_task_data_is_what_the_generator_writes():
    here = Path(make_data.__file__).parent
    for name, text in make_data.render().items():
        assert (here / name).read_text() == text, f"{name} differs: rerun python -m evals.tasks.make_data"
    rows = {name: [json.loads(line) for line in text.splitlines()] for name, text in make_data.render().items()}
    assert len(rows["qa.jsonl"]) >= 100 and all(r["answers"] for r in rows["qa.jsonl"])
    assert len({r["question"] for r in rows["qa.jsonl"]}) == len(rows["qa.jsonl"])
    assert all(0 <= r["label"] < len(r["choices"]) == len(set(r["choices"])) == 4 for r in rows["mc.jsonl"])
    for r in rows["if.jsonl"]:  # every instruction is checkable: the checker runs without error
        assert len(follows("Some answer.", r["instruction_ids"], r["kwargs"])) == len(r["instruction_ids"])


# ---------------------------------------------------------------------------------------
# lm-eval's hf model: reference, merged policy, LoRA adapter


@pytest.fixture(scope="module")
def policies_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("policies")


@pytest.fixture(scope="module")
def merged_policy(policies_dir) -> str:
    """Another random model: a stand-in for a merged checkpoint whose answers differ from the reference's."""
    from bonbench.models import save_random_model

    return str(save_random_model(policies_dir / "merged", "tiny", seed=1))


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_path, policies_dir) -> str:
    """A LoRA adapter on the tiny model with non-zero weights, saved as peft saves it (no tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = policies_dir / "lora"
    get_peft_model(model, config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def hf_run(tiny_model_path, merged_policy, lora_adapter, tmp_path_factory):
    cfg = BenchmarkConfig(tasks=LOCAL, model=tiny_model_path, policies=[merged_policy, lora_adapter], bon_n=[],
                          limit=3, batch_size=4, out=str(tmp_path_factory.mktemp("runs") / "hf"))
    return cfg, run(cfg)


def _samples(out: Path, method: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "samples" / method / f"{task}.jsonl").read_text().splitlines()]


def test_local_tasks_run_end_to_end_on_the_reference_a_merged_policy_and_a_lora_adapter(hf_run):
    cfg, table = hf_run
    out = Path(cfg.out)
    assert list(table.columns) == COLUMNS
    methods = ["reference", *(f"policy-{Path(p).parent.name}-{Path(p).name}" for p in cfg.policies)]
    expected = {("bonbench_qa", "exact_match"), ("bonbench_mc", "acc"), ("bonbench_mc", "acc_norm"),
                ("bonbench_if", "prompt_level_acc"), ("bonbench_if", "inst_level_acc")}
    for method in methods:
        rows = table[table["method"] == method]
        assert set(zip(rows["task"], rows["metric"])) == expected
        assert rows["value"].between(0, 1).all() and (rows["docs"] == 3).all() and (rows["n"] == 1).all()
        assert (rows["reward"] == "").all()
    assert set(table[table["method"] == methods[2]]["model"]) == {cfg.policies[1]}
    # the tables on disk are the returned one; lm-eval's raw JSON is kept beside them
    assert pd.read_parquet(out / "benchmarks.parquet").equals(table)
    assert len(pd.read_csv(out / "benchmarks.csv", keep_default_na=False)) == len(table)
    raw = json.loads((out / "raw" / "reference" / "bonbench_mc.json").read_text())
    assert raw["bonbench"]["method"] == "reference" and "acc,none" in raw["results"]["bonbench_mc"]
    # each policy is really loaded: its log-likelihoods differ from the reference's
    reference = [s["resps"] for s in _samples(out, "reference", "bonbench_mc")]
    for method in methods[1:]:
        assert len(_samples(out, method, "bonbench_mc")) == 3
        assert [s["resps"] for s in _samples(out, method, "bonbench_mc")] != reference, method


def test_resume_skips_finished_rows_and_redoes_missing_ones(hf_run, tmp_path):
    cfg, table = hf_run
    out = tmp_path / "copy"
    shutil.copytree(cfg.out, out)
    cfg = BenchmarkConfig(**{**cfg.__dict__, "out": str(out)})
    raw = sorted((out / "raw").glob("*/*.json"))
    before = {p: p.stat().st_mtime_ns for p in raw}
    missing = out / "raw" / "reference" / "bonbench_qa.json"
    missing.unlink()
    again = run(cfg)
    assert missing.exists()  # the one unit not on disk ran again
    assert {p: p.stat().st_mtime_ns for p in raw if p != missing} == {p: t for p, t in before.items() if p != missing}
    pd.testing.assert_frame_equal(again, table)  # greedy answers on the same model: the same table


def test_a_run_folder_refuses_other_settings(hf_run):
    cfg, _ = hf_run
    with pytest.raises(BenchmarkError, match=r"other settings \(--limit 3(\.0)? -> 5"):
        run(BenchmarkConfig(**{**cfg.__dict__, "limit": 5}))


# ---------------------------------------------------------------------------------------
# Best-of-N through a bonbench server


def test_best_of_n_runs_through_a_bonbench_server_with_the_reward_chosen_per_task(tiny_model_path, tmp_path,
                                                                                  monkeypatch):
    reward_log = tmp_path / "rewards.jsonl"
    monkeypatch.setenv("BONBENCH_TEST_REWARD_LOG", str(reward_log))
    cfg = BenchmarkConfig(tasks=LOCAL, model=tiny_model_path, reference=False, bon_n=[3], limit=4,
                          reward_model="tests.evals.rewards:longest",
                          bon_reward=["bonbench_qa=tests.evals.rewards:shortest"], out=str(tmp_path / "bon"))
    table = run(cfg)
    rewards = dict(zip(table["task"], table["reward"]))
    assert rewards == {"bonbench_qa": "tests.evals.rewards:shortest", "bonbench_if": "tests.evals.rewards:longest"}
    assert set(table["method"]) == {"bon-3"} and (table["n"] == 3).all() and (table["docs"] == 4).all()
    assert "bonbench_mc" not in set(table["task"])  # log-likelihood: Best-of-N does not apply
    calls = [json.loads(line) for line in reward_log.read_text().splitlines()]
    assert len(calls) == 8 and all(len(c["candidates"]) == 3 for c in calls)  # 4 documents x 2 tasks, N = 3
    # the answer lm-eval scored is the one the task's reward prefers among that request's candidates
    pick = {"shortest": min, "longest": max}
    for task, reward in (("bonbench_qa", "shortest"), ("bonbench_if", "longest")):
        stem = f"{task}@tests.evals.rewards-{reward}"
        for sample in _samples(Path(cfg.out), "bon-3", stem):
            answer = sample["resps"][0][0]
            matches = [c for c in calls if c["reward"] == reward and answer in c["candidates"]]
            assert matches, f"{answer!r} is no candidate {reward} scored"
            assert len(answer) == len(pick[reward](matches[0]["candidates"], key=len))


def test_a_selection_rule_adds_a_best_of_n_row_named_by_the_rule(tiny_model_path, tmp_path, monkeypatch):
    reward_log = tmp_path / "rewards.jsonl"
    monkeypatch.setenv("BONBENCH_TEST_REWARD_LOG", str(reward_log))
    cfg = BenchmarkConfig(tasks=["bonbench_qa"], model=tiny_model_path, reference=False, bon_n=[1, 3], limit=3,
                          reward_model="tests.evals.rewards:shortest",
                          bon_selection=["bonbench_qa=majority", "bonbench_qa=soft:temperature=0.5"],
                          out=str(tmp_path / "bon"))
    table = run(cfg)
    assert table[["method", "reward", "docs"]].values.tolist() == [
        ["bon-1", "tests.evals.rewards:shortest", 3],  # of one candidate every rule keeps that one: no rule rows
        ["bon-3", "majority", 3],
        ["bon-3", "soft:temperature=0.5(tests.evals.rewards:shortest)", 3],
        ["bon-3", "tests.evals.rewards:shortest", 3]]
    # the rule reached the server: majority never called the reward, soft and argmax did, on N = 3
    sizes = sorted(len(json.loads(line)["candidates"]) for line in reward_log.read_text().splitlines())
    assert sizes == [1] * 3 + [3] * 6


def test_best_of_n_against_a_running_server_records_the_reward_it_reports(tiny_model_path, tmp_path, monkeypatch):
    from bonbench.server.launch import launch_server

    monkeypatch.setenv("BONBENCH_TEST_REWARD_LOG", str(tmp_path / "rewards.jsonl"))
    args = ["--model", tiny_model_path, "--served-model-name", "tiny", "--reward-model",
            "tests.evals.rewards:shortest", "--threads", "1"]
    with launch_server(args) as server:
        table = run(BenchmarkConfig(tasks=["bonbench_qa"], model=tiny_model_path, reference=False, bon_n=[2],
                                    limit=2, bon_base_url=server.base_url, out=str(tmp_path / "bon")))
    assert table[["task", "metric", "method", "n", "reward", "model", "docs"]].values.tolist() == [
        ["bonbench_qa", "exact_match", "bon-2", 2, "tests.evals.rewards:shortest", "tiny", 2]]


# ---------------------------------------------------------------------------------------
# Errors a user meets


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_policy_folder_that_is_not_a_model_is_refused(tiny_model_path, tmp_path, capsys):
    folder = tmp_path / "runs" / "notes"
    folder.mkdir(parents=True)
    (folder / "README.txt").write_text("not weights")
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, ["--tasks", "bonbench_qa", "--model", tiny_model_path, "--policies", str(folder),
                           "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "is not a model: it holds neither config.json" in capsys.readouterr().err
    with pytest.raises(BenchmarkError, match="does not exist") as exc:
        run(BenchmarkConfig(tasks=["bonbench_qa"], model=tiny_model_path, policies=[str(tmp_path / "nope")],
                            out=str(tmp_path / "out")))
    _one_sentence(exc)


def test_an_unknown_task_and_an_unreachable_hub_task_are_refused_before_any_model_loads(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(BenchmarkError, match="unknown task 'bonbench_quiz'") as exc:
        run(BenchmarkConfig(tasks=["bonbench_quiz"], out=out))
    _one_sentence(exc)
    # a real lm-eval task passes through to lm-eval; offline (conftest sets HF_HUB_OFFLINE) its data is not there
    with pytest.raises(BenchmarkError, match="task gsm8k needs its dataset from the Hugging Face hub") as exc:
        run(BenchmarkConfig(tasks=["gsm8k"], model="/no/such/model", out=out))
    _one_sentence(exc)


def test_an_unreachable_server_and_a_stray_reward_are_refused(tmp_path):
    from bonbench.server.launch import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BenchmarkError, match=f"the Best-of-N server at {url} is unreachable") as exc:
        run(BenchmarkConfig(tasks=["bonbench_qa"], bon_base_url=url, reference=False, out=str(tmp_path / "a")))
    _one_sentence(exc)
    with pytest.raises(BenchmarkError, match="--bon-reward names bonbench_mc, which is not among the tasks"):
        run(BenchmarkConfig(tasks=["bonbench_qa"], bon_reward=["bonbench_mc=default"], out=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="--bon-reward takes TASK=SPEC"):
        BenchmarkConfig(bon_reward=["bonbench_qa"])
    with pytest.raises(BenchmarkError, match="--bon-selection names bonbench_if, which is not among the tasks"):
        run(BenchmarkConfig(tasks=["bonbench_qa"], bon_selection=["bonbench_if=majority"], out=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="--bon-selection bonbench_qa=vote: unknown selection rule 'vote'"):
        BenchmarkConfig(bon_selection=["bonbench_qa=vote"])
    assert BenchmarkConfig(bon_n=[0]).bon_n == []  # the command line's way to ask for no Best-of-N
