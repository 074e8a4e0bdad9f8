"""``python -m evals.judge`` against real judges on loopback: a small OpenAI-compatible judge app
of this file (uvicorn in a thread: deterministic verdicts, a request log, scripted 503s), a port
where nothing listens, and the embedded default model served by ``bonbench serve``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bonbench.cli import run_command
from bonbench.server.launch import REPO, child_env, free_port
from evals.judge import WEAK_JUDGE_NOTE, InputError, JudgeConfig, main, run
from evals.judge_client import JudgeError, JudgeSpec, parse_label, preference_from_logprobs
from tests.loopback import serve_in_thread

JUDGE = "fake-judge"
GOOD = "GOOD"


# ---------------------------------------------------------------------------------------
# A judge server


@dataclass
class JudgeState:
    """How the judge answers, and what it was asked."""

    verdict: str = "keyword"  # keyword: the response containing GOOD wins; first: always A; mute: no label
    fail_next: int = 0  # answer this many chat requests with 503 first
    requests: list[dict] = field(default_factory=list)  # every request: {"path", "body"}

    def chat_requests(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]


def shown(body: dict) -> tuple[str, str]:
    """(first, second) response texts of a judge prompt."""
    text = body["messages"][-1]["content"]
    first = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
    second = text.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
    return first, second


def verdict(state: JudgeState, body: dict) -> str:
    first, second = shown(body)
    if state.verdict == "first":
        return "A"
    if state.verdict == "mute" or "MUTE" in first + second:
        return "I would rather not say."
    return "tie" if (GOOD in first) == (GOOD in second) else ("A" if GOOD in first else "B")


def label_logprobs(label: str) -> dict[str, float]:
    """The judge's first-token distribution: 0.6 on its label, 0.3 on the other, 0.1 on 'The'."""
    other = {"A": "B", "B": "A"}.get(label)
    if other is None:
        return {"A": math.log(0.45), "B": math.log(0.45), "The": math.log(0.1)}
    return {label: math.log(0.6), other: math.log(0.3), "The": math.log(0.1)}


def chat_reply(state: JudgeState, body: dict) -> dict:
    label = verdict(state, body)
    n = body.get("n") or 1
    choices = []
    if body.get("logprobs"):
        probs = label_logprobs(label)
        tokens = list(probs)
        for i in range(n):  # sampled tokens cycle through the distribution's support
            token = tokens[i % len(tokens)]
            top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in probs.items()]
            entry = {"token": token, "logprob": probs[token], "bytes": None,
                     "top_logprobs": top if body.get("top_logprobs") else []}
            choices.append({"index": i, "message": {"role": "assistant", "content": token},
                            "logprobs": {"content": [entry]}, "finish_reason": "length"})
    else:
        choices = [{"index": 0, "message": {"role": "assistant", "content": label}, "logprobs": None,
                    "finish_reason": "stop"}]
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": 1 + n}}


def build_judge_app(state: JudgeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        state.requests.append({"path": "/v1/models", "body": None})
        return {"object": "list", "data": [{"id": JUDGE, "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.requests.append({"path": "/v1/chat/completions", "body": body})
        if state.fail_next > 0:
            state.fail_next -= 1
            return JSONResponse({"error": {"message": "overloaded", "type": "server_overloaded", "param": None,
                                           "code": None}}, status_code=503)
        return chat_reply(state, body)

    return app


@pytest.fixture(scope="module")
def judge_server():
    """(base URL, state) of the judge app on a free loopback port."""
    state = JudgeState()
    with serve_in_thread(build_judge_app(state)) as url:
        yield f"{url}/v1", state


@pytest.fixture
def judge(judge_server):
    base_url, state = judge_server
    state.verdict, state.fail_next = "keyword", 0
    state.requests.clear()
    return base_url, state


# ---------------------------------------------------------------------------------------
# Answer tables

PROMPTS = [f"Summarize article {i}: the harbour reopened after storm number {i}." for i in range(4)]


def write_answers(tmp_path, a_good=(0, 1, 2), b_good=(3,), mute=()):
    """Two answer tables; A's answer i holds GOOD for i in a_good, B's for i in b_good."""
    def answers(good, tag):
        return [f"{tag} answer {i}" + (f" {GOOD}" if i in good else "") + (" MUTE" if i in mute else "")
                + " and some padding" * (i if tag == "A" else 1) for i in range(len(PROMPTS))]

    a = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(4)], "prompt": PROMPTS, "answer": answers(a_good, "A"),
                      "reference": [f"Reference summary {i}." for i in range(4)]})
    b = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(4)][::-1], "prompt": PROMPTS[::-1],
                      "answer": answers(b_good, "B")[::-1]})
    a.to_parquet(tmp_path / "bon4.parquet", index=False)
    b.to_json(tmp_path / "policy.jsonl", orient="records", lines=True)
    return tmp_path / "bon4.parquet", tmp_path / "policy.jsonl"


def config(tmp_path, base_url, **kw) -> JudgeConfig:
    a, b = write_answers(tmp_path)
    kw.setdefault("out", str(tmp_path / "run"))
    return JudgeConfig(a=str(a), b=str(b), judge_base_url=base_url, judge_model=JUDGE, bootstrap=200, **kw)


# ---------------------------------------------------------------------------------------
# Against the judge app


def test_every_pair_is_judged_in_both_orders(tmp_path, judge):
    base_url, state = judge
    summary = run(config(tmp_path, base_url))
    asked = [shown(body) for body in state.chat_requests()]
    assert len(asked) == 8
    a = pd.read_parquet(tmp_path / "bon4.parquet")
    b = pd.read_json(tmp_path / "policy.jsonl", lines=True).set_index("prompt_id").loc[a["prompt_id"]]
    for answer_a, answer_b in zip(a["answer"], b["answer"]):
        assert (answer_a, answer_b) in asked and (answer_b, answer_a) in asked
    # the reference reaches the judge, and the label is asked for at temperature 0
    body = state.chat_requests()[0]
    assert "Reference summary" in body["messages"][0]["content"] and body["temperature"] == 0
    row = summary.iloc[0]
    assert (row["method_a"], row["method_b"], row["judge"], row["read"]) == ("bon4", "policy", JUDGE, "label")
    assert (row["prompts"], row["judged"], row["invalid"]) == (4, 4, 0)
    assert (row["wins"], row["ties"], row["losses"]) == (3, 0, 1)
    assert row["win_rate"] == row["discrete_win_rate"] == 0.75
    assert row["win_low"] <= 0.75 <= row["win_high"] and row["lc_low"] <= row["lc_win_rate"] <= row["lc_high"]
    assert row["position_bias"] == 0.5 and row["note"] == ""

    judgments = pd.read_parquet(tmp_path / "run" / "judgments.parquet")
    assert sorted(judgments["order"]) == ["ab"] * 4 + ["ba"] * 4
    assert not judgments["cached"].any()
    preferences = pd.read_csv(tmp_path / "run" / "preferences.csv", dtype={"prompt_id": str})
    assert preferences.set_index("prompt_id")["outcome"].to_dict() == {"p0": "win", "p1": "win", "p2": "win",
                                                                      "p3": "loss"}
    for name in ("judgments", "preferences", "summary"):
        assert (tmp_path / "run" / f"{name}.parquet").exists() and (tmp_path / "run" / f"{name}.csv").exists()
    assert "lc_win_rate" in (tmp_path / "run" / "summary.md").read_text()


def test_both_orders_cancel_a_judge_that_always_picks_the_first(tmp_path, judge):
    base_url, state = judge
    state.verdict = "first"
    row = run(config(tmp_path, base_url)).iloc[0]
    assert row["position_bias"] == 1.0
    assert (row["wins"], row["ties"], row["losses"]) == (0, 4, 0)
    assert row["win_rate"] == 0.5 and row["lc_win_rate"] == pytest.approx(0.5, abs=1e-7)


def test_a_rerun_makes_no_request_and_gives_the_same_tables(tmp_path, judge):
    base_url, state = judge
    first = run(config(tmp_path, base_url))
    before = len(state.requests)
    assert before == 9  # the reachability check and 8 judgments
    again = run(config(tmp_path, base_url))
    assert len(state.requests) == before
    pd.testing.assert_frame_equal(first, again)
    assert pd.read_parquet(tmp_path / "run" / "judgments.parquet")["cached"].all()
    # one more prompt in a shared cache: only its two judgments are asked
    a, b = pd.read_parquet(tmp_path / "bon4.parquet"), pd.read_json(tmp_path / "policy.jsonl", lines=True)
    a.loc[4] = ["p4", "A new prompt", f"new {GOOD}", None]
    b.loc[4] = ["p4", "A new prompt", "new"]
    a.to_parquet(tmp_path / "grown-a.parquet", index=False)
    b.to_csv(tmp_path / "grown-b.csv", index=False)
    cfg = JudgeConfig(a=str(tmp_path / "grown-a.parquet"), b=str(tmp_path / "grown-b.csv"), a_name="bon4",
                      b_name="policy", judge_base_url=base_url, judge_model=JUDGE, bootstrap=200,
                      out=str(tmp_path / "grown"), cache=str(tmp_path / "run" / "judgments.jsonl"))
    row = run(cfg).iloc[0]
    assert len(state.requests) == before + 3 and row["wins"] == 4


def test_a_judge_that_answers_503_is_retried_until_it_recovers(tmp_path, judge):
    base_url, state = judge
    state.fail_next = 2
    row = run(config(tmp_path, base_url, concurrency=1)).iloc[0]
    assert len(state.chat_requests()) == 8 + 2
    assert row["win_rate"] == 0.75 and row["judged"] == 4


def test_a_judge_that_keeps_failing_stops_the_run_and_keeps_what_was_judged(tmp_path, judge):
    base_url, state = judge
    state.fail_next = 10**6
    with pytest.raises(JudgeError, match=r"kept failing with HTTP 503 after 1 retries"):
        run(config(tmp_path, base_url, max_retries=1))
    state.fail_next = 0
    run(config(tmp_path, base_url))  # resumes


def test_a_judge_that_is_down_fails_with_one_sentence_and_a_nonzero_exit(tmp_path):
    a, b = write_answers(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = subprocess.run([sys.executable, "-m", "evals.judge", "--a", str(a), "--b", str(b), "--judge-base-url", url,
                           "--judge-model", JUDGE, "--out", str(tmp_path / "run")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot reach the judge at {url}" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_labels_that_name_no_response_are_counted_as_invalid(tmp_path, judge):
    base_url, _ = judge
    a, b = write_answers(tmp_path, mute=(1,))
    cfg = JudgeConfig(a=str(a), b=str(b), judge_base_url=base_url, judge_model=JUDGE, bootstrap=200,
                      out=str(tmp_path / "run"))
    row = run(cfg).iloc[0]
    assert (row["prompts"], row["judged"], row["invalid"]) == (4, 3, 1)
    assert row["win_rate"] == pytest.approx(2 / 3)
    judgments = pd.read_parquet(tmp_path / "run" / "judgments.parquet")
    assert judgments.loc[~judgments["valid"], "reply"].tolist() == ["I would rather not say."] * 2


@pytest.mark.parametrize("read", ["top-logprobs", "sampled-logprobs"])
def test_the_preference_is_read_from_the_labels_log_probabilities(tmp_path, judge, read):
    # The judge puts 0.6 on its label and 0.3 on the other: p_first = 2/3 for the GOOD answer's side.
    base_url, state = judge
    row = run(config(tmp_path, base_url, read=read, label_draws=6)).iloc[0]
    preferences = pd.read_parquet(tmp_path / "run" / "preferences.parquet").set_index("prompt_id")
    np.testing.assert_allclose(preferences["preference"], [2 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert row["win_rate"] == pytest.approx(7 / 12)
    body = state.chat_requests()[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True
    if read == "sampled-logprobs":
        assert body["n"] == 6 and body["temperature"] == 1
    else:
        assert body["top_logprobs"] == 20


def test_a_table_with_a_method_column_gives_both_sides(tmp_path, judge):
    base_url, _ = judge
    a, b = write_answers(tmp_path)
    table = pd.concat([pd.read_parquet(a).assign(method="BoN-4"),
                       pd.read_json(b, lines=True).assign(method="policy", reference=None)])
    table.to_csv(tmp_path / "answers.csv", index=False)
    cfg = JudgeConfig(a=str(tmp_path / "answers.csv"), a_method="BoN-4", b=str(tmp_path / "answers.csv"),
                      b_method="policy", judge_base_url=base_url, judge_model=JUDGE, bootstrap=200,
                      out=str(tmp_path / "run"))
    row = run(cfg).iloc[0]
    assert (row["method_a"], row["method_b"], row["win_rate"]) == ("BoN-4", "policy", 0.75)
    with pytest.raises(InputError, match="several methods"):
        run(JudgeConfig(a=str(tmp_path / "answers.csv"), b=str(b), judge_base_url=base_url, judge_model=JUDGE))


def test_bad_answer_tables_fail_with_a_sentence(tmp_path, capsys):
    a, b = write_answers(tmp_path)
    pd.read_parquet(a).drop(columns="answer").to_parquet(tmp_path / "no-answer.parquet")
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, ["--a", str(tmp_path / "no-answer.parquet"), "--b", str(b), "--judge-base-url",
                           "http://127.0.0.1:9/v1"])
    assert exit_info.value.code == 2
    assert "no-answer.parquet has no column answer" in capsys.readouterr().err
    other = pd.read_json(b, lines=True).assign(prompt_id=lambda f: "x" + f["prompt_id"])
    other.to_json(tmp_path / "other.jsonl", orient="records", lines=True)
    with pytest.raises(InputError, match="share no prompt_id"):
        run(JudgeConfig(a=str(a), b=str(tmp_path / "other.jsonl"), judge_base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(InputError, match="no such file"):
        run(JudgeConfig(a=str(tmp_path / "missing.csv"), b=str(b)))


# ---------------------------------------------------------------------------------------
# Pure parts of the client


@pytest.mark.parametrize("reply, expected", [
    ("A", 1.0), ("B", 0.0), ("**B**", 0.0), ("Response A is better.", 1.0), ("(B)", 0.0), ("Answer: A", 1.0),
    ("tie", 0.5), ("A tie.", 0.5), ("It's a tie", 0.5), ("Both are good", None), ("", None), ("Alpha", None),
])
def test_parse_label(reply, expected):
    assert parse_label(reply) == expected


def test_preference_from_logprobs_adds_label_tokens_and_bounds_a_missing_label():
    p, a, b = preference_from_logprobs({"A": math.log(0.2), " A": math.log(0.2), "B": math.log(0.1)}, -9.0)
    assert (p, a, b) == pytest.approx((0.8, math.log(0.4), math.log(0.1)))
    p, _, b = preference_from_logprobs({"A": math.log(0.5), "The": math.log(0.5)}, math.log(1 / 34))
    assert b == pytest.approx(math.log(1 / 34)) and p == pytest.approx(0.5 / (0.5 + 1 / 34))
    assert preference_from_logprobs({"The": -0.1}, -3.0)[0] is None


def test_cache_key_depends_on_order_and_on_the_judge_but_not_on_the_url():
    spec = JudgeSpec(model=JUDGE)
    key = spec.key("p", "x", "y", None)
    assert key == JudgeSpec(model=JUDGE).key("p", "x", "y", None)
    assert key != spec.key("p", "y", "x", None) != spec.key("p", "x", "y", "ref")
    assert key != JudgeSpec(model="other").key("p", "x", "y", None)
    assert key == JudgeSpec(model=JUDGE, draws=7).key("p", "x", "y", None)  # draws only matter when sampled
    with pytest.raises(ValueError, match="lacks {second}"):
        JudgeSpec(model=JUDGE, template="{prompt} {first}")


# ---------------------------------------------------------------------------------------
# The embedded default judge


@pytest.mark.slow
def test_embedded_default_judge_end_to_end(tmp_path):
    a, b = write_answers(tmp_path)
    cfg = JudgeConfig(a=str(a), b=str(b), bootstrap=100, threads=1, label_draws=16, out=str(tmp_path / "run"))
    row = run(cfg).iloc[0]
    assert row["read"] == "sampled-logprobs" and row["judge"] == "SmolLM2-135M-Instruct"
    assert row["note"] == WEAK_JUDGE_NOTE and "weak judge" in (tmp_path / "run" / "summary.md").read_text()
    judgments = pd.read_parquet(tmp_path / "run" / "judgments.parquet")
    assert len(judgments) == 8 and not judgments["cached"].any()
    valid = judgments[judgments["valid"]]
    assert len(valid) > 0 and valid["p_first"].between(0, 1).all()
    # the label log-probabilities were read from sampled tokens: each reply lists the drawn tokens
    drawn = json.loads(valid["reply"].iloc[0])
    assert drawn and all(lp <= 0 for lp in drawn.values())
    assert row["judged"] + row["invalid"] == 4 and 0 <= row["position_bias"] <= 1
    # rerun: everything cached, so no judge is started (a start would rewrite the server's log)
    server_log = tmp_path / "run" / "judge-server.log"
    written = server_log.stat().st_mtime_ns
    pd.testing.assert_frame_equal(run(cfg), row.to_frame().T.infer_objects(), check_dtype=False)
    assert pd.read_parquet(tmp_path / "run" / "judgments.parquet")["cached"].all()
    assert server_log.stat().st_mtime_ns == written
