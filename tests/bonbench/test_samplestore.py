"""``bonbench/samplestore.py``: the run folder's files, resume checks and policy registry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bonbench.errors import UserError
from bonbench.samplestore import SAMPLE_COLUMNS, SampleStore, policy_slug, to_markdown


def frame(index: int, prompt_id: str, role: str = "reference", policy: str = "", count: int = 2) -> pd.DataFrame:
    rows = [{"prompt_index": index, "prompt_id": prompt_id, "role": role, "policy": policy, "sample_index": j,
             "text": f"t{j}", "num_tokens": 3, "finish_reason": "stop", "logprob": -1.0, "ref_logprob": np.nan,
             "sample_seconds": 0.1, "reward": float(j), "reward_seconds": 0.01,
             "created": pd.Timestamp("2025-01-01", tz="UTC")} for j in range(count)]
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


ITEMS = [{"index": 0, "id": "a"}, {"index": 1, "id": "b"}, {"index": 2, "id": "c"}]


def test_samples_are_stored_per_method_and_prompt_and_missing_ones_listed(tmp_path):
    store = SampleStore(tmp_path)
    store.write(frame(0, "a"), 0)
    store.write(frame(1, "b"), 1)
    store.write(frame(0, "a", "policy", "pi"), 0, "policy-pi")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == ["samples/policy-pi/prompt-00000.parquet", "samples/prompt-00000.parquet",
                                      "samples/prompt-00001.parquet"]  # no temporary file is left behind
    assert [item["index"] for item in store.missing(ITEMS)] == [2]
    assert [item["index"] for item in store.missing(ITEMS, "policy-pi")] == [1, 2]
    pd.testing.assert_frame_equal(store.read(ITEMS[1]), frame(1, "b"))


def test_a_file_holding_another_prompt_is_refused(tmp_path):
    store = SampleStore(tmp_path)
    store.write(frame(0, "a"), 0)
    with pytest.raises(UserError, match="holds prompt 'a', but prompt 0 of the task is 'z'"):
        store.read({"index": 0, "id": "z"})


def test_load_samples_gives_each_prompt_its_pool_then_its_policies(tmp_path):
    store = SampleStore(tmp_path)
    for item in ITEMS[:2]:
        store.write(frame(item["index"], item["id"]), item["index"])
    store.write(frame(1, "b", "policy", "pi", count=3), 1, "policy-pi")
    store.write(frame(2, "c", "policy", "pi"), 2, "policy-pi")  # no pool for prompt 2: left out
    samples = store.load_samples(ITEMS, [{"slug": "pi"}])
    assert list(samples.columns) == SAMPLE_COLUMNS
    assert list(zip(samples["prompt_index"], samples["role"])) == [
        (0, "reference"), (0, "reference"), (1, "reference"), (1, "reference"),
        (1, "policy"), (1, "policy"), (1, "policy")]
    assert SampleStore(tmp_path / "empty").load_samples(ITEMS) is None


def test_run_json_is_started_once_then_guards_the_settings(tmp_path):
    store = SampleStore(tmp_path)
    store.check_settings({"k": 4, "seed": 0}, {"k": 16, "seed": 0}, {"limit": 3})
    assert json.loads((tmp_path / "run.json").read_text()) == {
        "settings": {"k": 4, "seed": 0}, "config": {"limit": 3}, "policies": []}
    store.check_settings({"k": 4, "seed": 0}, {}, {"limit": 9})  # the same settings resume
    with pytest.raises(UserError, match=r"other settings \(k: 4 -> 5\); use a new --out"):
        store.check_settings({"k": 5, "seed": 0}, {}, {})
    # a setting the stored run does not record counts as its default
    store.check_settings({"k": 4, "seed": 0, "judge_model": ""}, {"judge_model": ""}, {})
    with pytest.raises(UserError, match=r"judge_model: '' -> 'g'"):
        store.check_settings({"k": 4, "seed": 0, "judge_model": "g"}, {"judge_model": ""}, {})


def test_policies_are_registered_once_under_unique_slugs(tmp_path):
    assert policy_slug("runs/jbond/policy") == "jbond-policy"
    assert policy_slug("/abs/a b/c") == "a-b-c" and policy_slug("gpt2") == "gpt2" and policy_slug("/") == "policy"
    store = SampleStore(tmp_path)
    store.check_settings({}, {}, {})
    (tmp_path / "one" / "jbond").mkdir(parents=True)
    first = store.register_policy(str(tmp_path / "one" / "jbond"), 2)
    assert first == {"slug": "one-jbond", "path": str(tmp_path / "one" / "jbond"),
                     "resolved": str((tmp_path / "one" / "jbond").resolve()), "policy_samples": 2}
    assert store.register_policy(str(tmp_path / "one" / "jbond"), 2) == first
    other = store.register_policy("org/one-jbond", 2)  # a hub id with the same last two parts
    assert other["slug"] == "org-one-jbond"
    clash = store.register_policy("x/one/jbond", 2)
    assert clash["slug"] == "one-jbond-2" and clash["resolved"] == "x/one/jbond"
    assert [p["slug"] for p in store.policies()] == ["one-jbond", "org-one-jbond", "one-jbond-2"]
    with pytest.raises(UserError, match="drawn with --policy-samples 2, not 3"):
        store.register_policy(str(tmp_path / "one" / "jbond"), 3)


def test_tables_are_written_as_parquet_csv_and_markdown(tmp_path):
    summary = pd.DataFrame({"method": ["BoN-1", "policy:p"], "reward": [0.5, float("nan")]})
    SampleStore(tmp_path).write_tables({"summary": summary})
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "summary.parquet"), summary)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv"), summary)
    assert (tmp_path / "summary.md").read_text() == to_markdown(summary) + "\n"
    assert to_markdown(summary).splitlines() == [
        "| method | reward |", "|---|---|", "| BoN-1 | 0.5000 |", "| policy:p |  |"]
