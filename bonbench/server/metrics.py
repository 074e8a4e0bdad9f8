"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from bonbench.backends.base import CancelledWork, Generation


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bonbench_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("bonbench_request_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160), registry=r)
        self.prompt_tokens = Counter("bonbench_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("bonbench_generation_tokens",
                                         "Tokens generated, every candidate counted", registry=r)
        self.candidates = Counter("bonbench_candidates", "Candidates generated", registry=r)
        self.generation_seconds = Counter("bonbench_generation_seconds",
                                          "Wall time requests spent waiting for generation", registry=r)
        self.reward_seconds = Counter("bonbench_reward_seconds", "Wall time spent scoring candidates",
                                      registry=r)
        self.in_flight = Gauge("bonbench_requests_in_flight", "Requests accepted and not yet answered",
                               registry=r)
        self.rejected = Counter("bonbench_requests_rejected", "Requests refused because the server was full",
                                registry=r)
        self.cancelled = Counter("bonbench_requests_cancelled",
                                 "Requests whose client went away before the answer", registry=r)
        self.rejected_candidates = Counter("bonbench_rejected_candidates",
                                           "Candidates stopped early by early rejection", registry=r)
        self.rejection_tokens_saved = Counter(
            "bonbench_rejection_tokens_saved",
            "Tokens early rejection saved, estimated from the mean length of the candidates that ran to their end",
            registry=r)

    def observe_generation(self, generation: Generation, seconds: float) -> None:
        self.prompt_tokens.inc(generation.prompt_tokens)
        self.generation_tokens.inc(generation.completion_tokens)
        self.candidates.inc(len(generation.candidates))
        self.generation_seconds.inc(seconds)

    def observe_rejection(self, candidates: int, tokens_saved: float) -> None:
        self.rejected_candidates.inc(candidates)
        self.rejection_tokens_saved.inc(tokens_saved)

    def count_cancelled_work(self, work: CancelledWork) -> None:
        """Report the backend's count of work thrown away for cancelled requests (read at each scrape)."""
        self.registry.register(_CancelledWorkCollector(work))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CancelledWorkCollector:
    def __init__(self, work: CancelledWork) -> None:
        self.work = work

    def collect(self):
        yield CounterMetricFamily("bonbench_cancelled_candidates",
                                  "Candidates stopped before their end because their request was cancelled",
                                  value=self.work.candidates)
        yield CounterMetricFamily("bonbench_cancelled_tokens",
                                  "Tokens the cancelled candidates had drawn when they stopped",
                                  value=self.work.tokens)
