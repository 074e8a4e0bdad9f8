"""The generation seam: the loop builds the generator, syncs it after each weight change, scores what it
did not and closes it however the run ends. Checked on the in-process engine with a tiny model."""

from __future__ import annotations

import pytest
import torch

from bonbench.backends.transformers import encode_prompt
from distill.jbond import JBond, JBondConfig
from distill.loop import Batch, TrainingError, build_context, train
from distill.policy import Draw
from distill.transformers_generation import TransformersGenerator

CHATS = [[{"role": "user", "content": "Summarise: the river rose after a week of rain."}],
         [{"role": "user", "content": "Say hello."}]]


def _options(tiny_model_path, tmp_path, **kw) -> dict:
    base = dict(model=tiny_model_path, reward_model="tests.distill.rewards:distinct_characters", steps=2,
                batch_prompts=2, max_tokens=6, eval_prompts=0, out=str(tmp_path / "run"), lora_r=4, lora_top_layers=0)
    return {**base, **kw}


def _config(tiny_model_path, tmp_path, **kw) -> JBondConfig:
    return JBondConfig(**_options(tiny_model_path, tmp_path, **kw))


class WatchedJBond(JBond):
    """J-BOND that keeps the run's generator, and the weight version each step samples at, for the test."""

    def __init__(self, cfg, fail_at_step: int = 0):
        super().__init__(cfg)
        self.generator, self.versions, self.fail_at_step = None, [], fail_at_step

    def loss(self, ctx, batch, seed):
        self.generator = ctx.generator
        self.versions.append(ctx.generator.version)
        if len(self.versions) == self.fail_at_step:
            raise TrainingError("stopped by the test")
        return super().loss(ctx, batch, seed)


def _batch(ctx) -> Batch:
    return Batch([encode_prompt(ctx.policies.tokenizer, chat) for chat in CHATS], CHATS)


@pytest.mark.parametrize("fail_at_step", [0, 2], ids=["finished", "failed"])
def test_a_run_closes_the_generator_it_built_however_it_ends(tiny_model_path, tmp_path, fail_at_step):
    cfg = _config(tiny_model_path, tmp_path)
    recipe = WatchedJBond(cfg, fail_at_step)
    if fail_at_step:
        with pytest.raises(TrainingError, match="stopped by the test"):
            train(cfg, recipe)
    else:
        train(cfg, recipe)
    generator = recipe.generator
    assert isinstance(generator, TransformersGenerator)
    assert recipe.versions == [0, 1]  # synced after step 1, before step 2 samples
    assert generator.version == (1 if fail_at_step else 2)
    assert generator.closed
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate([[1, 2, 3]], [Draw("policy", 1, 0)], max_tokens=2)


def test_a_context_passed_in_stays_open_for_its_owner(tiny_model_path, tmp_path):
    cfg = _config(tiny_model_path, tmp_path, steps=1)
    with build_context(cfg, JBond(cfg)) as ctx:
        train(cfg, JBond(cfg), ctx)
        assert not ctx.generator.closed and ctx.version == ctx.generator.version == 1
        assert len(ctx.sample("policy", _batch(ctx), n=2, seed=0)[0]) == 2
    assert ctx.generator.closed


@pytest.mark.parametrize("lora, top_layers", [(True, 1), (True, 0), (False, 0)], ids=["lora-top", "lora-all", "full"])
def test_every_score_under_role_is_the_trained_models_log_prob(tiny_model_path, tmp_path, lora, top_layers):
    """LoRA over a frozen trunk scores other roles with shadow rows in the sampling batch; LoRA on every
    layer and full fine-tuning leave them to the loop's teacher-forced pass; the draw's own role is the
    sampler's own log-prob: all equal the trained model's scores."""
    cfg = _config(tiny_model_path, tmp_path, lora=lora, lora_top_layers=top_layers)
    with build_context(cfg, JBond(cfg)) as ctx:
        pairs = list(ctx.policies._adapter_pairs()) if lora else \
            list(zip(ctx.policies.model.parameters(), ctx.policies.anchor_model.parameters()))
        with torch.no_grad():  # three different roles
            for policy, _ in pairs:
                policy.add_(0.3 * torch.randn_like(policy))
        ctx.policies.update_anchor(0.5)
        ctx.weights_changed()
        batch = _batch(ctx)
        draws = [Draw("policy", 2, 1, score_under=("policy", "anchor", "ref")), Draw("anchor", 2, 2, ("ref",))]
        engine_scored = {role for row in ctx.generator.generate(batch.ids, draws[:1], cfg.max_tokens)[0]
                         for c in row for role in c.logprob_under}
        assert engine_scored == ({"policy", "anchor", "ref"} if top_layers else {"policy"})
        out = ctx.sample_together(batch, draws)
        for d, rows in zip(draws, out):
            assert [len(row) for row in rows] == [2, 2]
            flat = [(p, c) for p, row in zip(batch.ids, rows) for c in row]
            for role in d.score_under:
                expected = ctx.policies.logprobs(role, [p for p, _ in flat], [c.token_ids for _, c in flat])
                got = torch.tensor([c.logprob_under[role] for _, c in flat], dtype=expected.dtype)
                torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
        scores = [c.logprob_under for row in out[0] for c in row]
        assert all(len({round(s[r], 2) for r in ("policy", "anchor", "ref")}) == 3 for s in scores)  # roles differ


def test_a_role_the_run_lacks_is_refused(tiny_model_path, tmp_path):
    from distill.rloo import Rloo, RlooConfig

    cfg = RlooConfig(**_options(tiny_model_path, tmp_path))
    with build_context(cfg, Rloo(cfg)) as ctx:
        with pytest.raises(ValueError, match="no anchor"):
            ctx.sample("policy", _batch(ctx), n=1, seed=0, score_under=("anchor",))


@pytest.mark.parametrize("top_layers, given, prefills", [(0, ("policy",), False), (1, ("policy",), True),
                                                        (1, ("policy", "ref"), False)],
                         ids=["lora-all", "lora-top-policy-only", "lora-top"])
def test_the_engine_continues_the_trainers_prompt_pass_where_it_covers_every_row(tiny_model_path, tmp_path,
                                                                               top_layers, given, prefills):
    """RLOO runs each prompt once under the policy, with gradients, and once under the reference (its
    trunk replayed); the engine continues those passes instead of prefilling (same draws) where they
    cover every row of the draw: the policy's rows, and the shadow rows under the reference that LoRA
    over a frozen trunk adds."""
    cfg = _config(tiny_model_path, tmp_path, lora_top_layers=top_layers)
    with build_context(cfg, JBond(cfg)) as ctx:
        with torch.no_grad():
            for policy, _ in ctx.policies._adapter_pairs():
                policy.add_(0.3 * torch.randn_like(policy))
        ctx.weights_changed()
        batch = _batch(ctx)
        draw = Draw("policy", 2, 5, score_under=("ref",))
        widths = []
        embed = ctx.policies.model.get_input_embeddings()
        handle = embed.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[-1]))
        try:
            plain = ctx.generator.generate(batch.ids, [draw], cfg.max_tokens)[0]
            prefilled = max(widths)
            states = ctx.policies.prompt_states("policy", batch.ids, grad=True)
            prefixes = {"policy": states, "ref": ctx.policies.prompt_states("ref", batch.ids, trunk_from=states)}
            widths.clear()
            given_rows = ctx.generator.generate(batch.ids, [draw], cfg.max_tokens, {r: prefixes[r] for r in given})[0]
        finally:
            handle.remove()
        assert prefilled == max(map(len, batch.ids))
        assert max(widths) == (prefilled if prefills else 1)  # prefills too, or decoding steps only
        assert [[c.token_ids for c in row] for row in given_rows] == [[c.token_ids for c in row] for row in plain]
        if top_layers:
            assert [c.logprob_under["ref"] for row in given_rows for c in row] == pytest.approx(
                [c.logprob_under["ref"] for row in plain for c in row], abs=1e-4)
