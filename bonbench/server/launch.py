"""Start ``python -m bonbench serve`` as a child process on a free loopback port.

The one home for launching a server from Python: the tests, the serving benchmark and the evals
(an lm-eval run or an offline judge against Best-of-N) all start their servers here.

    with launch_server(["--model", "default", "--n", "4"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bonbench.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child that runs torch beside other busy processes.

    The repository root goes on ``PYTHONPATH`` so the child imports this checkout; the OpenMP wait
    policy is inherited (``bonbench/__init__.py`` sets it on import).
    """
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONPATH=python_path)
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A running ``bonbench serve`` child."""

    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``…/v1``)."""
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


class ServerStartError(UserError, RuntimeError):
    """The server exited or was not healthy in time; the message carries its log's tail."""


@contextlib.contextmanager
def launch_server(args: list[str], *, log_path: Path | None = None, host: str = "127.0.0.1",
                  startup_timeout: float = 300, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Run ``python -m bonbench serve ARGS --host HOST --port <free>`` until the block ends.

    Waits for ``/health`` to answer 200. The log goes to ``log_path`` (a temporary file if None).
    On leaving the block the server gets SIGTERM, then SIGKILL after 30 s.
    """
    import httpx

    port = free_port(host)
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix=f"bonbench-serve-{port}-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    command = [sys.executable, "-m", "bonbench", "serve", "--host", host, "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://{host}:{port}", process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise ServerStartError(f"the server exited with {process.returncode} while starting "
                                       f"(log: {log_path}):\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"the server was not healthy after {startup_timeout:.0f} s "
                                       f"(log: {log_path}):\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
