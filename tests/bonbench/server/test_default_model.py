"""The embedded default end to end: SmolLM2-135M-Instruct drawing four summaries of a default-task
passage, the default MiniLM reward picking the best."""

from __future__ import annotations

import pytest

from .conftest import start_server


@pytest.mark.slow
def test_default_model_best_of_4_summary_is_the_highest_reward_candidate(default_model_path, server_logs):
    from bonbench.models import DEFAULT_POLICY_NAME
    from bonbench.tasks import load_task, summary_prompt

    messages = summary_prompt(load_task(split="test")[0]["document"])
    args = ["--model", "default", "--n", "4", "--reward-model", "default"]
    with start_server(args, server_logs, model=DEFAULT_POLICY_NAME, threads=2) as server:
        reply = server.client().chat.completions.create(model=DEFAULT_POLICY_NAME, messages=messages,
                                                        max_tokens=48, seed=0, extra_body={"return_candidates": True})
    bon = reply.model_extra["bon"]
    candidates = bon["candidates"]
    assert len(candidates) == 4 and bon["reward_model"] == "default"
    answer = reply.choices[0].message.content
    assert answer.strip()
    best = candidates[bon["chosen"][0]]
    assert answer == best["text"]
    assert best["reward"] == max(c["reward"] for c in candidates)
    assert all(-1 <= c["reward"] <= 1 and 1 <= c["num_tokens"] <= 48 for c in candidates)
    assert reply.usage.completion_tokens == sum(c["num_tokens"] for c in candidates)
