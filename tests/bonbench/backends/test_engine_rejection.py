"""Early rejection inside the engine (pause at a checkpoint, score the partial candidates, stop the
losers) on the tiny random model with a deterministic scorer: a seeded request returns exactly what
``bonbench.rejection.simulate`` predicts from the same request drawn to its end (docs/math.md §9),
its batch-mates draw the tokens they draw alone, and a failing scorer fails only its own request."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bonbench.backends.base import SamplingParams
from bonbench.backends.engine import Engine
from bonbench.backends.sampling import SampleRequest, sample
from bonbench.backends.transformers import eos_ids, load_causal_lm
from bonbench.bon import bon_select
from bonbench.rejection import EarlyRejection, simulate

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def lm(tiny_model_path):
    model, tokenizer = load_causal_lm(tiny_model_path, "float32")
    return model, tokenizer, eos_ids(model, tokenizer)


def score(texts: list[str]) -> list[float]:
    """A deterministic stand-in for a reward: a hash of the text into 5 levels (so ties happen)."""
    return [float(zlib.crc32(t.encode()) % 5) for t in texts]


def request(lm, params: SamplingParams, scorer=score, prompt: str = PROMPT) -> SampleRequest:
    ids = lm[1](prompt, add_special_tokens=False)["input_ids"]
    return SampleRequest(ids, params, score_partial=scorer if params.early_rejection else None)


def replay(lm, full, plan: EarlyRejection, n: int):
    """What early rejection would do with ``full`` (candidates drawn to their end): ``simulate`` on
    the partial scores of their first ``c`` tokens, decoded the way the engine decodes them."""
    partial = np.full((len(full), len(plan.checkpoints)), np.nan)
    for i, c in enumerate(full):
        for j, checkpoint in enumerate(plan.checkpoints):
            if c.num_tokens > checkpoint:
                partial[i, j] = score([lm[1].decode(c.token_ids[:checkpoint], skip_special_tokens=True)])[0]
    rewards = score([c.text for c in full])
    return simulate(plan, partial, [c.num_tokens for c in full], rewards, n), partial


# (seed, checkpoints, keep, keep_at_least, stop): stop strings end some candidates before a checkpoint
CASES = [
    (0, (4, 10), 0.5, 1, ()),
    (1, (3, 6, 12), 0.34, 2, ("er",)),
    (2, (2, 5, 9), 0.25, 1, ("ing", "x")),
    (3, (8,), 0.75, 3, ("k",)),
    (4, (1, 2, 3, 4), 0.5, 1, ("er", "k")),
]


@pytest.mark.parametrize("seed, checkpoints, keep, at_least, stop", CASES)
def test_early_rejection_returns_what_simulate_predicts_from_the_same_candidates_drawn_to_their_end(
        lm, seed, checkpoints, keep, at_least, stop):
    plan = EarlyRejection(checkpoints, keep)
    common = dict(n=8, max_tokens=16, seed=seed, stop=stop)
    (full,) = sample(lm[0], lm[1], [request(lm, SamplingParams(**common))], lm[2])
    (cut,) = sample(lm[0], lm[1], [request(lm, SamplingParams(**common, early_rejection=plan,
                                                               keep_at_least=at_least))], lm[2])
    predicted, partial = replay(lm, full, plan, at_least)
    assert [c.rejected_at or 0 for c in cut] == predicted.rejected_at.tolist()
    assert sum(c.num_tokens for c in cut) == predicted.tokens
    survivors = [i for i, c in enumerate(cut) if c.rejected_at is None]
    assert survivors == np.flatnonzero(predicted.rejected_at == 0).tolist()
    chosen = [survivors[k] for k in bon_select(np.array(score([cut[i].text for i in survivors])), at_least)]
    assert chosen == predicted.chosen.tolist()
    for c, whole, scores in zip(cut, full, partial):
        if c.rejected_at is None:  # a survivor is the very candidate drawn without rejection
            assert (c.token_ids, c.text, c.finish_reason) == (whole.token_ids, whole.text, whole.finish_reason)
        else:  # a rejected one is its first rejected_at tokens
            assert c.finish_reason == "rejected" and c.token_ids == whole.token_ids[:c.rejected_at]
            assert c.text == lm[1].decode(c.token_ids, skip_special_tokens=True)
        # scored at every checkpoint it reached running: drawn past it, and not rejected before it
        assert c.partial_scores == [scores[j] for j, p in enumerate(plan.checkpoints)
                                    if whole.num_tokens > p and p <= (c.rejected_at or p)]


def test_the_cases_reject_some_candidates_and_end_some_before_a_checkpoint(lm):
    """The identity above is not vacuous: across the cases candidates are rejected, and some end
    (stop string) before a checkpoint, so they are never scored there."""
    rejected = ended_early = 0
    for seed, checkpoints, keep, at_least, stop in CASES:
        (full,) = sample(lm[0], lm[1], [request(lm, SamplingParams(n=8, max_tokens=16, seed=seed, stop=stop))], lm[2])
        outcome, _ = replay(lm, full, EarlyRejection(checkpoints, keep), at_least)
        rejected += int((outcome.rejected_at > 0).sum())
        ended_early += sum(c.num_tokens <= checkpoints[-1] for c in full)
    assert rejected >= 10 and ended_early >= 3


class Scorer:
    """Counts its calls; raises on its ``fail_at``-th."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, texts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the reward is down")
        return score(texts)


def test_batch_mates_draw_their_own_tokens_and_a_failing_scorer_fails_only_its_request(lm):
    plan = EarlyRejection((3, 6), 0.5)
    rejecting = SamplingParams(n=6, max_tokens=12, seed=5, early_rejection=plan)
    plain = SamplingParams(n=4, max_tokens=12, seed=6)
    (alone_rejecting,) = sample(lm[0], lm[1], [request(lm, rejecting)], lm[2])
    (alone_plain,) = sample(lm[0], lm[1], [request(lm, plain, prompt="Hello there")], lm[2])
    engine = Engine(lm[0], lm[1], lm[2])
    done, errors = {}, {}
    failing = Scorer(fail_at=2)
    for name, req in [("rejecting", request(lm, rejecting)), ("plain", request(lm, plain, prompt="Hello there")),
                      ("failing", request(lm, rejecting, scorer=failing, prompt="Once upon a time"))]:
        engine.add(req, lambda c, name=name: done.__setitem__(name, c),
                   lambda exc, name=name: errors.__setitem__(name, exc))
    while not engine.idle:
        engine.step()
    assert set(done) == {"rejecting", "plain"} and set(errors) == {"failing"}
    assert "the reward is down" in str(errors["failing"]) and failing.calls == 2
    assert [c.token_ids for c in done["plain"]] == [c.token_ids for c in alone_plain]
    assert [(c.token_ids, c.rejected_at, c.partial_scores) for c in done["rejecting"]] == \
        [(c.token_ids, c.rejected_at, c.partial_scores) for c in alone_rejecting]
    assert any(c.rejected_at for c in done["rejecting"])


@pytest.mark.parametrize("bad, message", [
    (lambda texts: score(texts)[:-1], "returned 5 scores for 6"),
    (lambda texts: [float("nan")] * len(texts), "NaN"),
])
def test_a_scorer_that_miscounts_or_returns_nan_fails_its_request(lm, bad, message):
    engine = Engine(lm[0], lm[1], lm[2])
    errors = []
    params = SamplingParams(n=6, max_tokens=8, seed=0, early_rejection=EarlyRejection((2,), 0.5))
    engine.add(request(lm, params, scorer=bad), lambda c: pytest.fail("it should have failed"), errors.append)
    while not engine.idle:
        engine.step()
    assert len(errors) == 1 and message in str(errors[0])


def test_early_rejection_is_refused_where_it_cannot_run(lm):
    plan = EarlyRejection((4,), 0.5)
    with pytest.raises(ValueError, match="temperature 0"):
        SamplingParams(n=4, temperature=0, early_rejection=plan)
    with pytest.raises(ValueError, match="keep_at_least"):
        SamplingParams(n=4, early_rejection=plan, keep_at_least=5)
    ids = lm[1](PROMPT, add_special_tokens=False)["input_ids"]
    engine = Engine(lm[0], lm[1], lm[2], adapters=True)
    with pytest.raises(ValueError, match="score_with"):
        engine.add(SampleRequest(ids, SamplingParams(n=2, early_rejection=plan), adapter="__base__",
                                 score_with=("anchor",), score_partial=score), lambda c: None)
    with pytest.raises(ValueError, match="score_partial"):
        Engine(lm[0], lm[1], lm[2]).add(SampleRequest(ids, SamplingParams(n=2, early_rejection=plan)), lambda c: None)
