"""The trainers' shared options: the judge a run names is the judge it asks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bonbench.config import parse_config
from distill.jbond import JBond, JBondConfig
from distill.loop import build_context


class GradingServer(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint on loopback that grades 1 plus the exclamation marks it is
    shown (at most 10) and records, per request, the model asked for and the key sent."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Grader)
        self.seen: list[tuple[str, str]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Grader(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802  (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        grade = min(10, 1 + body["messages"][0]["content"].count("!"))
        self.server.seen.append((body["model"], self.headers.get("Authorization", "")))
        reply = json.dumps({"id": "grade", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": str(grade)}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def grading_server():
    server = GradingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_judge_reward_asks_the_named_judge_with_the_key_from_the_named_variable(
        tiny_model_path, tmp_path, grading_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-judge")
    cfg = parse_config(JBondConfig, ["--model", tiny_model_path, "--reward-model", "judge", "--judge-model", "grader",
                                     "--judge-base-url", grading_server.base_url,
                                     "--judge-api-key-env", "TEST_JUDGE_KEY", "--out", str(tmp_path / "run")])
    with build_context(cfg, JBond(cfg)) as ctx:
        grades = ctx.score(["Say hello."] * 3, ["hello", "hello!!", "hello" + "!" * 12])
    assert grades.tolist() == [1.0, 3.0, 10.0]
    assert grading_server.seen == [("grader", "Bearer sk-test-judge")] * 3


def test_judge_options_are_refused_without_the_judge_and_the_judge_without_a_model(capsys):
    with pytest.raises(SystemExit):
        parse_config(JBondConfig, ["--reward-model", "judge"])
    assert "--reward-model judge needs --judge-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(JBondConfig, ["--judge-model", "grader"])
    assert "the judge would never be asked" in capsys.readouterr().err
