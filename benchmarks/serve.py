"""What Best-of-N serving costs against plain sampling on the same backend.

Starts ``python -m bonbench serve`` itself, twice and one after the other: first the Best-of-N
server (``--n 8`` with the default reward), then a plain single-sample server on the same model and
backend (``--reward-model none --n 1``). Against each it measures

  (a) latency: ``--latency-requests`` sequential requests of ``--max-tokens`` new tokens (p50, p95),
      with the tokens actually generated (the model may stop early; there is no ``min_tokens``);
  (b) throughput: ``--requests`` requests from ``--concurrency`` concurrent clients
      (generated tokens/s, every candidate counted; requests/s),

and prints one table with the Best-of-N / plain ratios, also written to
``reports/bench/<--out>.json`` and ``.md``. Prompts are the default task's test passages
(``bonbench.tasks.summary_prompt``), seeded, the same for both servers.

    python benchmarks/serve.py                                  # embedded SmolLM2 on CPU
    python benchmarks/serve.py --requests 10 --concurrency 8    # a quick check
    python benchmarks/serve.py --device cuda --backend vllm --n 16 --requests 256 --out vllm-n16
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402
from bonbench.seeds import derive_seed  # noqa: E402
from bonbench.server.launch import ServerProcess, launch_server  # noqa: E402


@dataclass
class BenchConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    backend: str = option("transformers", "transformers or vllm (both servers use it)")
    device: str = option("cpu", "cpu or cuda[:i]")
    threads: int = option(0, "torch CPU threads of each server (0: torch's default)")
    reward_model: str = option("default", "reward of the Best-of-N server")
    n: int = option(8, "candidates per Best-of-N request")
    max_tokens: int = option(48, "new tokens asked for per candidate")
    latency_requests: int = option(10, "sequential requests for the latency percentiles")
    requests: int = option(64, "requests in the throughput run")
    concurrency: int = option(16, "concurrent clients in the throughput run")
    seed: int = option(0, "seed the requests' seeds are derived from (bonbench.seeds.derive_seed)")
    startup_timeout: float = option(600.0, "seconds to wait for a server's /health")
    out: str = option("serve", "report name: writes reports/bench/<out>.json and .md")

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens", "latency_requests", "requests", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.latency_requests < 2:
            raise ValueError("--latency-requests must be >= 2 for percentiles")
        if Path(self.out).name != self.out:
            raise ValueError("--out is a file name (no folders): the report goes under reports/bench/")


# ---------------------------------------------------------------------------- the server

MODEL_NAME = "bench"


@contextlib.contextmanager
def running_server(args: list[str], cfg: BenchConfig, label: str) -> Iterator[ServerProcess]:
    """``python -m bonbench serve`` with the benchmark's model, backend and device, plus ``args``."""
    args = ["--model", cfg.model, "--served-model-name", MODEL_NAME, "--backend", cfg.backend, "--device", cfg.device,
            "--threads", str(cfg.threads), "--log-level", "warning", *args]
    print(f"starting {label} server: bonbench serve {' '.join(args)}", flush=True)
    started = time.monotonic()
    with launch_server(args, startup_timeout=cfg.startup_timeout) as server:
        print(f"  ready in {time.monotonic() - started:.1f}s (log: {server.log_path})", flush=True)
        yield server


# ---------------------------------------------------------------------------- measurements


def _prompts(count: int) -> list[list[dict]]:
    from bonbench.tasks import load_task, summary_prompt

    documents = load_task(split="test")["document"]
    return [summary_prompt(documents[i % len(documents)]) for i in range(count)]


async def _ask(client, messages, cfg: BenchConfig, best_of: int, seed: int):
    reply = await client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=cfg.max_tokens, seed=seed,
        extra_body={"best_of": best_of, "return_candidates": True} if best_of > 1 else None)
    if len(reply.choices) != 1:
        raise RuntimeError(f"expected one choice, got {len(reply.choices)}")
    bon = (reply.model_extra or {}).get("bon")
    per_candidate = [c["num_tokens"] for c in bon["candidates"]] if bon else [reply.usage.completion_tokens]
    return reply.usage.completion_tokens, per_candidate


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def measure(base_url: str, cfg: BenchConfig, best_of: int) -> dict:
    """Latency (sequential) then throughput (concurrent) against one server (its ``…/v1`` URL)."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600) as client:
        prompts = _prompts(max(cfg.latency_requests, cfg.requests) + 1)
        await _ask(client, prompts[-1], cfg, best_of, derive_seed(cfg.seed, 0))  # warm-up, not counted

        latencies, candidate_tokens = [], []
        for i in range(cfg.latency_requests):
            started = time.perf_counter()
            _, per_candidate = await _ask(client, prompts[i], cfg, best_of, derive_seed(cfg.seed, 1, i))
            latencies.append(time.perf_counter() - started)
            candidate_tokens.extend(per_candidate)

        queue: asyncio.Queue = asyncio.Queue()
        for i in range(cfg.requests):
            queue.put_nowait(i)
        generated = 0

        async def worker():
            nonlocal generated
            while not queue.empty():
                i = queue.get_nowait()
                tokens, _ = await _ask(client, prompts[i], cfg, best_of, derive_seed(cfg.seed, 2, i))
                generated += tokens

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - started

    return {
        "best_of": best_of,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "tokens_per_candidate_mean": statistics.fmean(candidate_tokens),
        "tokens_per_candidate_min": min(candidate_tokens),
        "tokens_per_request_mean": statistics.fmean(candidate_tokens) * best_of,
        "throughput_generated_tokens_per_s": generated / wall,
        "throughput_requests_per_s": cfg.requests / wall,
        "throughput_wall_s": wall,
    }


# ---------------------------------------------------------------------------- report

ROWS = [  # (key, label, format)
    ("latency_p50_s", "latency p50 (s), 1 request", "{:.2f}"),
    ("latency_p95_s", "latency p95 (s), 1 request", "{:.2f}"),
    ("tokens_per_candidate_mean", "generated tokens per candidate (mean)", "{:.1f}"),
    ("tokens_per_candidate_min", "generated tokens per candidate (min)", "{:.0f}"),
    ("tokens_per_request_mean", "generated tokens per request (mean)", "{:.1f}"),
    ("throughput_generated_tokens_per_s", "throughput: generated tokens/s", "{:.1f}"),
    ("throughput_requests_per_s", "throughput: requests/s", "{:.3f}"),
]


def table(bon: dict, plain: dict, cfg: BenchConfig) -> str:
    head = ["metric", f"Best-of-{cfg.n}", "plain n=1", "ratio BoN/plain"]
    lines = [head, ["---"] * 4]
    for key, label, fmt in ROWS:
        ratio = bon[key] / plain[key] if plain[key] else float("nan")
        lines.append([label, fmt.format(bon[key]), fmt.format(plain[key]), f"{ratio:.2f}x"])
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in lines)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, argv, prog="python benchmarks/serve.py", description=__doc__.split("\n\n")[0])
    with running_server(["--n", str(cfg.n), "--reward-model", cfg.reward_model], cfg, f"best-of-{cfg.n}") as server:
        bon = asyncio.run(measure(server.base_url, cfg, cfg.n))
    with running_server(["--n", "1", "--reward-model", "none"], cfg, "plain") as server:
        plain = asyncio.run(measure(server.base_url, cfg, 1))

    text = table(bon, plain, cfg)
    load = os.getloadavg()[1]  # other work on the machine skews every number: say how much there was
    setup = (f"model {cfg.model}, backend {cfg.backend} on {cfg.device}, reward {cfg.reward_model}, "
             f"max_tokens {cfg.max_tokens}; latency over {cfg.latency_requests} sequential requests; "
             f"throughput over {cfg.requests} requests from {cfg.concurrency} concurrent clients; "
             f"{os.cpu_count()} CPUs, 5-minute load average {load:.1f} at the end")
    print(f"\n{setup}\n\n{text}")
    out = REPO / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(cfg), "load_average_5min": load, "best_of_n": bon, "plain": plain}
    (out / f"{cfg.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{cfg.out}.md").write_text(f"# Best-of-{cfg.n} serving against plain sampling\n\n{setup}.\n\n{text}\n")
    print(f"\nwrote {out / cfg.out}.json and .md")


if __name__ == "__main__":
    run_command(main)
