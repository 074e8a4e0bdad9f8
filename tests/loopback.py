"""An ASGI app served by uvicorn on a free loopback port, in a thread of the test process: for the
small OpenAI-compatible servers that tests build themselves (an upstream, a judge)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from bonbench.server.launch import free_port


@contextlib.contextmanager
def serve_in_thread(app, startup_timeout: float = 60) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its URL, ``http://127.0.0.1:PORT``."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the app did not stop"
