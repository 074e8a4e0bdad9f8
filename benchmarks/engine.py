"""The serving engine against what a user would write instead, as ratios measured in one run.

Three sections, each timed side by side in this one process (the server in a child):

Each measurement of the first two runs ``--repeats`` times, interleaved, and the fastest run counts.

  bon     Best-of-N in-process: ``--prompts`` default-task prompts x ``--n`` candidates, up to
          ``--max-tokens`` tokens at temperature 1, drawn by bonbench's sampler, by a TRL-style
          loop (one ``model.generate(num_return_sequences=n)`` per prompt) and by one batched
          ``generate`` of every row; in each of ``--dtypes``. Generated tokens/s, EOS counted.
  server  Best-of-N through the server (``bonbench serve`` with the default reward; ``--prompts``
          concurrent requests, one per prompt) against the same Best-of-N in-process (the sampler
          over all prompts at once, then the reward over every candidate), same dtype; with the
          reward's share of the in-process time and of the server's (from its /metrics).
  plain   The plain n=1 server (``bonbench serve --n 1 --reward-model none``) under 1, 4 and 16
          concurrent clients against one batched ``generate`` of as many rows, same dtype.
  mixed   A mixed stream on the in-process engine: long Best-of-N requests arriving every
          ``--long-every`` seconds and short n=1 requests every ``--short-every`` seconds; p50/p95
          latency of the short ones, served the way the backend did before continuous batching
          (take what is queued, run it to its end) and with the engine's step-level batching.

    python benchmarks/engine.py                                 # small default (a few minutes)
    python benchmarks/engine.py --sections bon --prompts 8 --max-tokens 48
    python benchmarks/engine.py --model /path/to/llama-1b --device cuda --out engine-gpu

The table is printed and written to ``reports/bench/<--out>.md`` (and ``.json``, raw numbers).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bonbench.backends.base import SamplingParams  # noqa: E402
from bonbench.backends.engine import Engine  # noqa: E402
from bonbench.backends.sampling import SampleRequest, sample  # noqa: E402
from bonbench.backends.transformers import encode_prompt, eos_ids, load_causal_lm  # noqa: E402
from bonbench.cli import run_command  # noqa: E402
from bonbench.config import option, parse_config  # noqa: E402
from bonbench.models import pick_dtype, resolve_policy  # noqa: E402
from bonbench.seeds import derive_seed  # noqa: E402

SECTIONS = ("bon", "server", "plain", "mixed")


@dataclass
class EngineBenchConfig:
    model: str = option("default", "policy: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or folder")
    device: str = option("cpu", "cpu or cuda[:i]")
    sections: str = option("bon,server,plain,mixed", "comma-separated sections to run: bon, server, plain, mixed")
    dtypes: str = option("float32,bfloat16", "bon section: dtypes to compare (plain and mixed use --dtype)")
    dtype: str = option("auto", "server, plain and mixed sections: auto (bonbench.models.pick_dtype for serving) or a dtype")
    prompts: int = option(4, "bon section: default-task prompts")
    n: int = option(8, "bon and mixed sections: candidates per Best-of-N request")
    max_tokens: int = option(32, "bon and plain sections: new tokens per row")
    clients: str = option("1,4,16", "plain section: concurrent client counts")
    requests_per_client: int = option(2, "plain section: requests each client sends, one after the other")
    long_requests: int = option(2, "mixed section: long Best-of-N requests")
    long_tokens: int = option(96, "mixed section: max_tokens of a long request")
    long_every: float = option(4.0, "mixed section: seconds between long requests")
    short_requests: int = option(8, "mixed section: short n=1 requests")
    short_tokens: int = option(4, "mixed section: max_tokens of a short request")
    short_every: float = option(1.0, "mixed section: seconds between short requests (the first at 0.5 s)")
    repeats: int = option(2, "bon and plain sections: runs of each measurement, interleaved; the fastest is kept "
                            "(on a shared machine other work only ever slows a run down)")
    seed: int = option(0, "seed every request's seed is derived from")
    out: str = option("engine", "report name: writes reports/bench/<out>.md and .json")

    def __post_init__(self) -> None:
        unknown = set(self.section_list) - set(SECTIONS)
        if unknown:
            raise ValueError(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        for name in ("prompts", "n", "max_tokens", "requests_per_client", "long_requests", "short_requests", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.short_requests < 2:
            raise ValueError("--short-requests must be >= 2 for percentiles")
        if Path(self.out).name != self.out:
            raise ValueError("--out is a file name (no folders): the report goes under reports/bench/")

    @property
    def section_list(self) -> list[str]:
        return [s.strip() for s in self.sections.split(",") if s.strip()]


def default_prompts(tokenizer, count: int) -> list[list[int]]:
    from bonbench.tasks import load_task, summary_prompt

    documents = load_task(split="test")["document"]
    return [encode_prompt(tokenizer, summary_prompt(documents[i % len(documents)])) for i in range(count)]


# ---------------------------------------------------------------------------- generation, three ways


def generated_tokens(rows: torch.Tensor, eos: set[int]) -> int:
    """New tokens in ``generate``'s output rows (B, T), each counted up to and including its first EOS."""
    total = 0
    for row in rows.tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        total += ends[0] + 1 if ends else len(row)
    return total


@torch.inference_mode()
def hf_generate(model, tokenizer, prompts: list[list[int]], n: int, max_tokens: int, eos: set[int]) -> int:
    """One left-padded ``model.generate`` of ``prompts`` x ``n`` rows, pure sampling at T=1."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_tokens, num_return_sequences=n, pad_token_id=pad)
    return generated_tokens(out[:, width:], eos)


def tokens_per_second(run) -> tuple[float, int, float]:
    started = time.perf_counter()
    tokens = run()
    wall = time.perf_counter() - started
    return tokens / wall, tokens, wall


def bon_section(cfg: EngineBenchConfig) -> list[dict]:
    results = []
    for dtype in [d.strip() for d in cfg.dtypes.split(",") if d.strip()]:
        results += _bon_one_dtype(cfg, dtype)  # the model is freed on return
    return results


def _bon_one_dtype(cfg: EngineBenchConfig, dtype: str) -> list[dict]:
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), dtype, cfg.device)
    eos = eos_ids(model, tokenizer)
    prompts = default_prompts(tokenizer, cfg.prompts)
    torch.manual_seed(cfg.seed)

    def bonbench_sampler():
        params = [SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens, seed=derive_seed(cfg.seed, i))
                  for i in range(len(prompts))]
        out = sample(model, tokenizer, [SampleRequest(p, s) for p, s in zip(prompts, params)], eos)
        return sum(c.num_tokens for cands in out for c in cands)

    runs = {
        "TRL-style loop": lambda: sum(hf_generate(model, tokenizer, [p], cfg.n, cfg.max_tokens, set(eos))
                                      for p in prompts),
        "batched generate": lambda: hf_generate(model, tokenizer, prompts, cfg.n, cfg.max_tokens, set(eos)),
        "bonbench": bonbench_sampler,
    }
    hf_generate(model, tokenizer, prompts[:1], 1, 2, set(eos))  # warm-up, not counted
    best: dict[str, dict] = {}
    for _ in range(cfg.repeats):
        for name, run in runs.items():
            speed, tokens, wall = tokens_per_second(run)
            print(f"  bon {dtype:9s} {name:17s} {speed:7.1f} tok/s ({tokens} tokens, {wall:.1f} s)", flush=True)
            if name not in best or speed > best[name]["tokens_per_s"]:
                best[name] = dict(dtype=dtype, method=name, tokens_per_s=speed, tokens=tokens, wall_s=wall)
    return list(best.values())


# ---------------------------------------------------------------------------- Best-of-N through the server


def _metric(base_url: str, name: str) -> float:
    """The value of one unlabelled counter on the server's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def _bon_requests(base_url: str, messages: list, cfg: EngineBenchConfig) -> tuple[int, float]:
    """One Best-of-N request per prompt, all at once; (every candidate's tokens, wall seconds)."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600) as client:
        async def one(i: int) -> int:
            reply = await client.chat.completions.create(
                model="bench", messages=messages[i], max_tokens=cfg.max_tokens, seed=derive_seed(cfg.seed, i),
                extra_body={"best_of": cfg.n})
            return reply.usage.completion_tokens

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(len(messages)))))
        return tokens, time.perf_counter() - started


def server_section(cfg: EngineBenchConfig) -> list[dict]:
    from bonbench.rewards import load_reward
    from bonbench.server.launch import launch_server
    from bonbench.tasks import load_task, summary_prompt

    documents = load_task(split="test")["document"]
    messages = [summary_prompt(documents[i % len(documents)]) for i in range(cfg.prompts)]
    dtype = str(pick_dtype(cfg.dtype, cfg.device, for_serving=True)).removeprefix("torch.")
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), dtype, cfg.device)
    eos = eos_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, m) for m in messages]
    reward = load_reward("default", device=cfg.device)

    def in_process() -> tuple[int, float, float]:
        started = time.perf_counter()
        out = sample(model, tokenizer, [SampleRequest(p, SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens,
                                                                         seed=derive_seed(cfg.seed, i)))
                                        for i, p in enumerate(prompts)], eos)
        sampled = time.perf_counter()
        reward.score([m for m, cands in zip(messages, out) for _ in cands], [c.text for cands in out for c in cands])
        done = time.perf_counter()
        return sum(c.num_tokens for cands in out for c in cands), done - started, done - sampled

    args = ["--model", cfg.model, "--served-model-name", "bench", "--device", cfg.device, "--dtype", dtype,
            "--n", str(cfg.n), "--log-level", "warning"]
    sample(model, tokenizer, [SampleRequest(prompts[0], SamplingParams(max_tokens=2))], eos)  # warm-up
    best: dict[str, dict] = {}
    with launch_server(args) as server:  # the idle server waits while the in-process run goes, and vice versa
        asyncio.run(_bon_requests(server.base_url, messages[:1], cfg))  # warm-up
        for _ in range(cfg.repeats):
            tokens, wall, reward_s = in_process()
            runs = [("in-process", tokens, wall, reward_s)]
            before = _metric(server.base_url, "bonbench_reward_seconds_total")
            tokens, wall = asyncio.run(_bon_requests(server.base_url, messages, cfg))
            runs.append(("server", tokens, wall, _metric(server.base_url, "bonbench_reward_seconds_total") - before))
            for name, tokens, wall, reward_s in runs:
                print(f"  Best-of-{cfg.n} {name:10s} {tokens / wall:7.1f} tok/s ({tokens} tokens, {wall:.1f} s, "
                      f"reward {reward_s:.1f} s)", flush=True)
                if name not in best or tokens / wall > best[name]["tokens_per_s"]:
                    best[name] = dict(dtype=dtype, path=name, tokens_per_s=tokens / wall, tokens=tokens, wall_s=wall,
                                      reward_s=reward_s)
    return list(best.values())


# ---------------------------------------------------------------------------- the plain server


async def _clients(base_url: str, messages: list, count: int, cfg: EngineBenchConfig) -> tuple[int, float]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600) as client:
        async def one(k: int, i: int) -> int:
            reply = await client.chat.completions.create(
                model="bench", messages=messages[(k * cfg.requests_per_client + i) % len(messages)],
                max_tokens=cfg.max_tokens, seed=derive_seed(cfg.seed, k, i))
            return reply.usage.completion_tokens

        async def client_loop(k: int) -> int:
            return sum([await one(k, i) for i in range(cfg.requests_per_client)])

        await one(count, 0)  # warm-up
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client_loop(k) for k in range(count))))
        return tokens, time.perf_counter() - started


def plain_section(cfg: EngineBenchConfig) -> list[dict]:
    from bonbench.server.launch import launch_server
    from bonbench.tasks import load_task, summary_prompt

    counts = [int(c) for c in cfg.clients.split(",")]
    documents = load_task(split="test")["document"]
    messages = [summary_prompt(documents[i % len(documents)]) for i in range(max(counts) * cfg.requests_per_client)]
    dtype = str(pick_dtype(cfg.dtype, cfg.device, for_serving=True)).removeprefix("torch.")
    args = ["--model", cfg.model, "--served-model-name", "bench", "--device", cfg.device, "--dtype", dtype,
            "--n", "1", "--reward-model", "none", "--log-level", "warning"]
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), dtype, cfg.device)
    eos = set(eos_ids(model, tokenizer))
    prompts = [encode_prompt(tokenizer, m) for m in messages]
    hf_generate(model, tokenizer, prompts[:1], 1, 2, eos)  # warm-up
    served: dict[int, float] = {}
    raw: dict[int, float] = {}
    with launch_server(args) as server:  # the idle server waits while raw generate runs, and vice versa
        for _ in range(cfg.repeats):
            for count in counts:
                tokens, wall = asyncio.run(_clients(server.base_url, messages, count, cfg))
                speed = tokens_per_second(lambda: hf_generate(model, tokenizer, prompts[:count], 1, cfg.max_tokens,
                                                              eos))[0]
                print(f"  {count:2d} clients: server {tokens / wall:7.1f} tok/s, raw generate {speed:7.1f}", flush=True)
                served[count] = max(served.get(count, 0.0), tokens / wall)
                raw[count] = max(raw.get(count, 0.0), speed)
    return [dict(dtype=dtype, clients=c, server_tokens_per_s=served[c], raw_tokens_per_s=raw[c]) for c in counts]


# ---------------------------------------------------------------------------- the mixed stream


def _schedule(cfg: EngineBenchConfig, prompts: list[list[int]]) -> list[tuple[float, str, SampleRequest]]:
    """(arrival second, kind, request), in arrival order."""
    arrivals = [(k * cfg.long_every, "long", SampleRequest(prompts[k % len(prompts)], SamplingParams(
        n=cfg.n, max_tokens=cfg.long_tokens, seed=derive_seed(cfg.seed, 1, k)))) for k in range(cfg.long_requests)]
    arrivals += [(0.5 + k * cfg.short_every, "short", SampleRequest(prompts[(k + 1) % len(prompts)], SamplingParams(
        max_tokens=cfg.short_tokens, seed=derive_seed(cfg.seed, 2, k)))) for k in range(cfg.short_requests)]
    return sorted(arrivals, key=lambda a: a[0])


def _serve_stream(arrivals, serve) -> dict[str, list[float]]:
    """Feed ``arrivals`` in real time to ``serve(take, finished)``; returns latencies by kind."""
    started = time.perf_counter()
    latency: dict[str, list[float]] = {"long": [], "short": []}
    pending = list(arrivals)
    lock = threading.Lock()

    def take(block: bool):
        """The requests that have arrived by now, each with its completion callback."""
        while True:
            now = time.perf_counter() - started
            with lock:
                due = [a for a in pending if a[0] <= now]
                for a in due:
                    pending.remove(a)
            if due or not block or not pending:
                return [(a[2], lambda _c, a=a: latency[a[1]].append(time.perf_counter() - started - a[0]))
                        for a in due], bool(pending)
            time.sleep(min(0.01, max(0.0, pending[0][0] - now)))

    serve(take)
    return latency


def static_batches(model, tokenizer, eos):
    """The backend before continuous batching: take what is queued, run it to its last row."""
    def serve(take):
        more = True
        while more:
            batch, more = take(block=True)
            if batch:
                for (request, done), candidates in zip(batch, sample(model, tokenizer, [r for r, _ in batch], eos)):
                    done(candidates)
    return serve


def continuous_batches(model, tokenizer, eos):
    def serve(take):
        engine = Engine(model, tokenizer, eos, max_rows=64, max_step_tokens=512)
        more = True
        while more or not engine.idle:
            batch, more = take(block=engine.idle)
            for request, done in batch:
                engine.add(request, done)
            if not engine.idle:
                engine.step()
    return serve


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def mixed_section(cfg: EngineBenchConfig) -> list[dict]:
    dtype = str(pick_dtype(cfg.dtype, cfg.device, for_serving=True)).removeprefix("torch.")
    model, tokenizer = load_causal_lm(resolve_policy(cfg.model), dtype, cfg.device)
    eos = eos_ids(model, tokenizer)
    prompts = default_prompts(tokenizer, 4)
    sample(model, tokenizer, [SampleRequest(prompts[0], SamplingParams(max_tokens=2))], eos)  # warm-up
    results = []
    for name, serve in (("static (before)", static_batches), ("continuous (after)", continuous_batches)):
        latency = _serve_stream(_schedule(cfg, prompts), serve(model, tokenizer, eos))
        short, long = latency["short"], latency["long"]
        results.append(dict(dtype=dtype, batching=name, short_p50_s=statistics.median(short), short_p95_s=_p95(short),
                            long_mean_s=statistics.fmean(long)))
        row = results[-1]
        print(f"  mixed, {name:18s}: short p50 {row['short_p50_s']:.2f} s, p95 {row['short_p95_s']:.2f} s; "
              f"long mean {row['long_mean_s']:.2f} s", flush=True)
    return results


# ---------------------------------------------------------------------------- report


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines)


def report(cfg: EngineBenchConfig, results: dict) -> str:
    parts = []
    if "bon" in results:
        rows, by = [], {(r["dtype"], r["method"]): r["tokens_per_s"] for r in results["bon"]}
        for dtype in dict.fromkeys(r["dtype"] for r in results["bon"]):
            ours = by[(dtype, "bonbench")]
            rows.append([dtype, f"{by[(dtype, 'TRL-style loop')]:.1f}", f"{by[(dtype, 'batched generate')]:.1f}",
                         f"{ours:.1f}", f"{ours / by[(dtype, 'TRL-style loop')]:.2f}x",
                         f"{ours / by[(dtype, 'batched generate')]:.2f}x"])
        parts.append(f"Best-of-{cfg.n} in-process, {cfg.prompts} default prompts, up to {cfg.max_tokens} tokens, T=1 "
                     f"(generated tokens/s)\n\n" + _table(
                         ["dtype", "TRL-style loop", "batched generate", "bonbench", "vs loop", "vs batched"], rows))
    if "server" in results:
        by = {r["path"]: r for r in results["server"]}
        local, served = by["in-process"], by["server"]
        rows = [[name, f"{r['tokens_per_s']:.1f}", f"{r['reward_s'] / r['wall_s']:.0%}"]
                for name, r in (("in-process (sampler, then reward)", local), ("through the server", served))]
        rows.append(["server / in-process", f"{served['tokens_per_s'] / local['tokens_per_s']:.2f}x", ""])
        parts.append(f"Best-of-{cfg.n} with the default reward, {cfg.prompts} default prompts at once, up to "
                     f"{cfg.max_tokens} tokens ({local['dtype']}; generated tokens/s, every candidate counted; the "
                     f"reward's share of the wall time; the server's reward time from its /metrics)\n\n"
                     + _table(["path", "tokens/s", "reward share"], rows))
    if "plain" in results:
        rows = [[str(r["clients"]), f"{r['server_tokens_per_s']:.1f}", f"{r['raw_tokens_per_s']:.1f}",
                 f"{r['server_tokens_per_s'] / r['raw_tokens_per_s']:.2f}x"] for r in results["plain"]]
        parts.append(f"Plain n=1 server ({results['plain'][0]['dtype']}) against one batched generate of as many rows "
                     f"(generated tokens/s)\n\n" + _table(["clients / rows", "server", "raw generate", "ratio"], rows))
    if "mixed" in results:
        rows = [[r["batching"], f"{r['short_p50_s']:.2f}", f"{r['short_p95_s']:.2f}", f"{r['long_mean_s']:.2f}"]
                for r in results["mixed"]]
        parts.append(f"Mixed stream ({results['mixed'][0]['dtype']}): {cfg.long_requests} Best-of-{cfg.n} x "
                     f"{cfg.long_tokens}-token requests every {cfg.long_every:g} s, {cfg.short_requests} n=1 x "
                     f"{cfg.short_tokens}-token requests every {cfg.short_every:g} s (latency from arrival, s)\n\n"
                     + _table(["batching", "short p50", "short p95", "long mean"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EngineBenchConfig, argv, prog="python benchmarks/engine.py",
                       description=__doc__.split("\n\n")[0])
    run = {"bon": bon_section, "server": server_section, "plain": plain_section, "mixed": mixed_section}
    results = {}
    for section in cfg.section_list:
        print(f"section {section}", flush=True)
        results[section] = run[section](cfg)
    load = os.getloadavg()[1]
    setup = (f"model {cfg.model} on {cfg.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
             f"{torch.get_num_threads()} torch threads, 5-minute load average {load:.1f} at the end")
    text = report(cfg, results)
    print(f"\n{setup}\n\n{text}")
    out = REPO / "reports" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.out}.json").write_text(json.dumps({"config": asdict(cfg), "load_average_5min": load,
                                                      "results": results}, indent=2) + "\n")
    (out / f"{cfg.out}.md").write_text(f"# The serving engine, side by side\n\n{setup}.\n\n{text}\n")
    print(f"\nwrote {out / cfg.out}.md and .json")


if __name__ == "__main__":
    run_command(main)
