"""``--reference-cache``: a sweep's runs share reference samples, and a run reading them back trains
exactly as one that draws them."""

from __future__ import annotations

import json

from distill.bond import Bond, BondConfig
from distill.loop import build_context, train
from tests.distill.test_trainer import small


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _run(tiny_model_path, tmp_path, name, cache, **kw):
    cfg = BondConfig(**small(tiny_model_path, tmp_path, out=str(tmp_path / name), reference_cache=str(cache),
                             eval_prompts=0, n=2, k=3, samples=2, **kw))
    with build_context(cfg, Bond(cfg)) as ctx:
        calls = []
        generate = ctx.generator.generate
        ctx.generator.generate = lambda prompts, draws, max_tokens, prefixes=None: (
            calls.extend(d.role for d in draws) or generate(prompts, draws, max_tokens, prefixes))
        out = train(cfg, Bond(cfg), ctx)
        return out, calls, ctx.reference_cache


def test_a_second_run_reads_the_reference_draws_back_and_trains_identically(tiny_model_path, tmp_path):
    cache = tmp_path / "cache"
    first, first_calls, first_cache = _run(tiny_model_path, tmp_path, "a", cache)
    assert first_calls.count("ref") == 3 and first_cache.misses == 3 and first_cache.hits == 0
    assert len(list(cache.glob("*.json"))) == 3
    second, second_calls, second_cache = _run(tiny_model_path, tmp_path, "b", cache)
    assert "ref" not in second_calls and second_calls.count("policy") == 3
    assert second_cache.hits == 3 and second_cache.misses == 0
    assert _losses(second) == _losses(first)


def test_a_run_that_would_draw_other_samples_misses_the_cache(tiny_model_path, tmp_path):
    cache = tmp_path / "cache"
    _run(tiny_model_path, tmp_path, "a", cache)
    for name, change in (("seed", dict(seed=1)), ("tokens", dict(max_tokens=6))):
        _, calls, other = _run(tiny_model_path, tmp_path, name, cache, **change)
        assert other.hits == 0 and calls.count("ref") == 3, name


def test_without_a_cache_folder_nothing_is_stored(tiny_model_path, tmp_path):
    cfg = BondConfig(**small(tiny_model_path, tmp_path, eval_prompts=0, n=2, k=3, samples=2))
    with build_context(cfg, Bond(cfg)) as ctx:
        assert ctx.reference_cache is None


def test_a_reference_draw_beside_a_scored_draw_is_stored_and_read_back(tiny_model_path, tmp_path):
    from distill.loop import load_prompts
    from distill.policy import Draw

    cfg = BondConfig(**small(tiny_model_path, tmp_path, reference_cache=str(tmp_path / "cache"), eval_prompts=0,
                             n=2, k=2, samples=2))
    with build_context(cfg, Bond(cfg)) as ctx:
        batch = load_prompts(cfg, ctx.policies.tokenizer, "train", 2)
        draws = [Draw("ref", 2, 7), Draw("policy", 1, 8, score_under=("ref",))]
        first = ctx.sample_together(batch, draws)
        again = ctx.sample_together(batch, draws)
        assert (ctx.reference_cache.misses, ctx.reference_cache.hits) == (1, 1)
        assert [[c.token_ids for c in row] for row in again[0]] == [[c.token_ids for c in row] for row in first[0]]
