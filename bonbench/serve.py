"""``python -m bonbench serve``: an OpenAI-compatible Best-of-N server.

    python -m bonbench serve --n 8                                  # embedded SmolLM2 + default reward
    python -m bonbench serve --n 16 --early-rejection 16,32:0.25    # stop the weakest candidates early
    python -m bonbench serve --model Qwen/Qwen2.5-1.5B-Instruct --backend vllm \\
        --reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B --device cuda
    python -m bonbench serve --upstream http://127.0.0.1:8001/v1 --n 16   # score a vllm serve fleet
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from bonbench.cli import log_level_option, setup_logging
from bonbench.config import option, parse_config
from bonbench.rewards import REWARD_HELP

log = logging.getLogger("bonbench.serve")


@dataclass
class ServeConfig:
    n: int = option(8, "candidates drawn per request (a request's best_of overrides it)")
    model: str = option("default", "'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id or a folder")
    served_model_name: str = option("", "the name clients send as 'model' (default: derived from --model)")
    backend: str = option("transformers", "transformers (in-process, CPU or GPU) or vllm (in-process, GPU)")
    upstream: str = option("", "base URL of an OpenAI-compatible server to draw candidates from "
                              "(e.g. http://127.0.0.1:8001/v1); replaces --backend")
    upstream_model: str = option("", "model name at the upstream (default: its first)")
    upstream_api_key: str = option("", "API key for the upstream")
    reward_model: str = option("default", REWARD_HELP)
    selection: str = option("argmax", "how to choose among the N (a request's 'selection' overrides it): argmax, "
                                     "soft, regularized, self-certainty or majority; NAME:key=value,... sets "
                                     "parameters, e.g. soft:temperature=0.5")
    early_rejection: str = option("", "CHECKPOINTS:KEEP, e.g. 16,32:0.25: score the unfinished candidates on their "
                                      "partial answers at these token counts and keep the best fraction KEEP "
                                      "(at least a request's n); transformers backend, a reward with "
                                      "score_partial; a request's 'early_rejection' overrides it (default: off)")
    judge_model: str = option("", "model name for --reward-model judge")
    judge_base_url: str = option("", "OpenAI-compatible base URL of the judge (default: OpenAI's)")
    judge_api_key: str = option("", "API key of the judge")
    host: str = option("127.0.0.1", "interface to bind; 0.0.0.0 exposes the server to the network")
    port: int = option(8000, "port to bind")
    api_key: str = option("", "if set, clients must send 'Authorization: Bearer <key>'")
    max_best_of: int = option(64, "largest N a request may ask for")
    max_tokens: int = option(1024, "largest max_tokens a request may ask for")
    default_max_tokens: int = option(128, "max_tokens when a request gives none")
    max_prompt_tokens: int = option(4096, "longest prompt accepted, in tokens")
    max_in_flight: int = option(256, "requests accepted at once; more are answered 503")
    max_body_mb: float = option(8.0, "largest request body accepted, in MB (2^20 bytes); larger ones get a 413, unread")
    max_batch_rows: int = option(64, "transformers backend: most candidates decoded in one batch")
    max_batch_tokens: int = option(512, "transformers backend: tokens per step, one per decoding row plus prompt "
                                       "chunks prefilled")
    device: str = option("cpu", "cpu or cuda[:i]")
    dtype: str = option("auto", "auto (bf16 on GPUs and CPUs that compute it natively, else fp32), float32, "
                       "bfloat16, float16")
    threads: int = option(0, "torch CPU threads (0: torch's default; the transformers backend's decoding "
                             "thread then uses 1 on a CPU of at most 2 cores, where that was measured faster)")
    gpu_memory_utilization: float = option(0.9, "vllm backend: share of GPU memory for the engine")
    log_level: str = log_level_option()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.n > self.max_best_of:
            raise ValueError(f"--n {self.n} exceeds --max-best-of {self.max_best_of}")
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"--backend must be transformers or vllm, got {self.backend!r}")
        from bonbench.select import SelectionError, parse_rule

        try:
            rule = parse_rule(self.selection)
        except SelectionError as exc:
            raise ValueError(f"--selection: {exc}") from exc
        if self.reward_model == "none" and rule.needs_reward and self.n != 1:
            raise ValueError(f"--reward-model none with --selection {rule.name} serves plain samples: use --n 1 "
                             "(clients set n), or a reward-free rule (majority, self-certainty)")
        if rule.name == "self-certainty" and (self.upstream or self.backend != "transformers"):
            raise ValueError("--selection self-certainty reads the model's next-token distributions, which only "
                             "the transformers backend reports")
        if self.early_rejection:
            self._check_early_rejection(rule)
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("--default-max-tokens exceeds --max-tokens")
        if not self.max_body_mb * 2**20 >= 1:
            raise ValueError(f"--max-body-mb must be positive, got {self.max_body_mb}")

    def _check_early_rejection(self, rule) -> None:
        """What can be known before loading anything; the reward's score_partial is checked once loaded."""
        from bonbench.rejection import parse_early_rejection

        try:
            parse_early_rejection(self.early_rejection)
        except ValueError as exc:
            raise ValueError(f"--early-rejection: {exc}") from exc
        if self.upstream or self.backend != "transformers":
            raise ValueError("--early-rejection pauses the candidates to score them, which only the transformers "
                             "backend can do")
        if self.reward_model == "none" or not rule.needs_reward:
            raise ValueError(f"--early-rejection stops candidates by their reward on partial answers: it needs a "
                             f"reward model and a rule that ranks by it (not --selection {rule.name}, "
                             f"--reward-model {self.reward_model})")


def build_service(cfg: ServeConfig):
    """Backend + reward + service, as the config says."""
    from bonbench.models import resolve_policy, served_name
    from bonbench.rewards import load_reward
    from bonbench.server.service import BestOfNService, Limits

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.upstream:
        from bonbench.backends.openai_upstream import OpenAIUpstreamBackend

        backend = OpenAIUpstreamBackend(cfg.upstream, cfg.upstream_model or None, cfg.upstream_api_key or None)
        name = cfg.served_model_name or asyncio.run(backend.resolve_model())
    else:
        path = resolve_policy(cfg.model)
        name = cfg.served_model_name or served_name(cfg.model)
        if cfg.backend == "vllm":
            from bonbench.backends.vllm import VLLMBackend

            backend = VLLMBackend(path, name, dtype=cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization)
        else:
            from bonbench.backends.transformers import TransformersBackend

            backend = TransformersBackend.from_pretrained(path, name, dtype=cfg.dtype, device=cfg.device,
                                                          max_batch_rows=cfg.max_batch_rows,
                                                          max_batch_tokens=cfg.max_batch_tokens,
                                                          threads=cfg.threads or None)
    # After the backend: vLLM claims its share of GPU memory before a reward model takes any.
    reward = load_reward(cfg.reward_model, device=cfg.device, judge_model=cfg.judge_model or None,
                         judge_base_url=cfg.judge_base_url or None, judge_api_key=cfg.judge_api_key or None)
    limits = Limits(default_best_of=cfg.n, max_best_of=cfg.max_best_of, default_max_tokens=cfg.default_max_tokens,
                    max_tokens=cfg.max_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_in_flight=cfg.max_in_flight, max_body_bytes=int(cfg.max_body_mb * 2**20))
    from bonbench.errors import UserError
    from bonbench.rejection import parse_early_rejection
    from bonbench.select import parse_rule
    from bonbench.server.service import early_rejection_unavailable

    plan = parse_early_rejection(cfg.early_rejection) if cfg.early_rejection else None
    if plan is not None and (why := early_rejection_unavailable(backend, reward)):
        raise UserError(f"--early-rejection cannot run: {why}.")
    return BestOfNService(backend, reward, name, limits, selection=parse_rule(cfg.selection), early_rejection=plan)


def main(argv: list[str] | None = None) -> None:
    """The command; ``python -m bonbench serve`` runs it under ``bonbench.cli.run_command``."""
    cfg = parse_config(ServeConfig, argv, prog="python -m bonbench serve", description=__doc__.split("\n\n")[0])
    setup_logging(cfg.log_level)
    import uvicorn

    from bonbench.server.app import build_app

    service = build_service(cfg)
    app = build_app(service, api_key=cfg.api_key or None)
    log.info("serving %s with best_of=%d, reward %s, selection %s, early rejection %s, on http://%s:%d/v1",
             service.model_name, cfg.n, cfg.reward_model, cfg.selection, cfg.early_rejection or "off", cfg.host,
             cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
