"""Real servers for the server tests: ``python -m bonbench serve ...`` as a subprocess on a free
loopback port (``bonbench.server.launch``), reached with the official ``openai`` client and with
plain ``httpx``.

``start_server`` is the helper (a context manager); ``tiny_server`` is the shared Best-of-4 server
on the tiny random model with the default (MiniLM) reward.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from bonbench.server.launch import ServerProcess, child_env, launch_server

TINY_NAME = "tiny-random"
_LOG_NUMBERS = itertools.count()


@dataclass
class Server:
    """A running server subprocess, with clients for it."""

    child: ServerProcess
    model: str  # the name clients send as 'model'
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.child.url

    @property
    def base_url(self) -> str:
        return self.child.base_url

    @property
    def process(self) -> subprocess.Popen:
        return self.child.process

    def log_tail(self, chars: int = 4000) -> str:
        return self.child.log_tail(chars)

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key or "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.base_url, **kw)

    def async_client(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key or "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=self.base_url, **kw)

    def post(self, path: str, timeout: float = 120, **kw) -> httpx.Response:
        """A raw POST under /v1 (for bodies the openai client would refuse to send)."""
        headers = kw.pop("headers", {})
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        return httpx.post(f"{self.base_url}{path}", headers=headers, timeout=timeout, **kw)

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as {(name, sorted label items): value}; fails on invalid text."""
        from prometheus_client.parser import text_string_to_metric_families

        response = httpx.get(f"{self.url}/metrics", timeout=30)
        response.raise_for_status()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def start_server(args: list[str], log_dir: Path, *, model: str, api_key: str | None = None,
                 threads: int = 1, startup_timeout: float = 180) -> Iterator[Server]:
    """Run ``python -m bonbench serve ARGS`` on a free port until the block ends.

    Waits for ``/health``; on a failed start, the error carries the server's log.
    """
    args = ["--threads", str(threads), "--log-level", "warning", *args]
    if api_key:
        args += ["--api-key", api_key]
    log_path = log_dir / f"server-{next(_LOG_NUMBERS)}.log"
    with launch_server(args, log_path=log_path, startup_timeout=startup_timeout,
                       env=child_env(HF_HUB_OFFLINE="1")) as child:
        yield Server(child, model, api_key)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tiny_server(tiny_model_path, server_logs) -> Iterator[Server]:
    """Best-of-4 on the tiny random model, scored by the default (embedded MiniLM) reward."""
    args = ["--model", tiny_model_path, "--served-model-name", TINY_NAME, "--n", "4", "--reward-model", "default",
            "--max-tokens", "1024"]
    with start_server(args, server_logs, model=TINY_NAME) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def chat_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of a chat prompt as the model sees it: the chat template, then plain encoding."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def assert_error(response: httpx.Response, status: int, type_: str, *, param: str | None = "any",
                 code: str | None = "any", message_contains: str = "") -> dict:
    """The reply is OpenAI's nested error body with this status; returns the inner object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == type_, error
    if param != "any":
        assert error["param"] == param, error
    if code != "any":
        assert error["code"] == code, error
    assert message_contains.lower() in error["message"].lower(), error
    return error
