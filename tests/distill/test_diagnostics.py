"""``--diagnostics``: per-term gradient norms and cosines, checked by hand, and a run they leave unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from distill.jbond import JBond, JBondConfig
from distill.loop import term_gradient_stats, train
from distill.losses import jbond_loss
from tests.distill.test_trainer import small


def test_term_gradient_stats_match_separate_backward_passes():
    torch.manual_seed(0)
    w, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    x = torch.randn(4, 3)
    first = (x @ w).pow(2).mean() + b.sum()
    second = -(x @ w).sin().sum() + 3 * b[0]
    stats = term_gradient_stats({"first": first, "second": second}, [w, b])
    assert w.grad is None and b.grad is None
    grads = [torch.cat(torch.autograd.grad(t, [w, b], retain_graph=True)) for t in (first, second)]
    assert stats["diag/grad_norm_first"] == pytest.approx(float(grads[0].norm()), rel=1e-6)
    assert stats["diag/grad_norm_second"] == pytest.approx(float(grads[1].norm()), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert stats["diag/grad_cos_first_second"] == pytest.approx(float(cos), rel=1e-6)
    (first + second).backward()  # the graph is still there for the training backward
    assert w.grad is not None


def test_a_term_that_misses_a_parameter_counts_it_as_zero_gradient():
    w, v = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    stats = term_gradient_stats({"a": (2 * w).sum(), "b": (3 * v).sum()}, [w, v])
    assert stats["diag/grad_norm_a"] == pytest.approx(2 * 2**0.5)
    assert stats["diag/grad_cos_a_b"] == 0.0
    assert term_gradient_stats({"only": w.sum()}, [w]) == {}


def test_jbond_terms_sum_to_the_loss_with_their_weights():
    torch.manual_seed(0)
    lp = torch.randn(4, requires_grad=True)
    anchor_lp = torch.randn(4, 2, requires_grad=True)
    out = jbond_loss(lp, torch.randn(4), torch.randn(4), torch.randn(4, 2), anchor_lp, beta=0.3, gamma=0.5)
    assert set(out.terms) == {"forward", "backward", "regulariser"}
    torch.testing.assert_close(sum(out.terms.values()), out.loss)
    assert out.terms["forward"].item() == pytest.approx(0.7 * out.metrics["forward"])
    no_reg = jbond_loss(lp, torch.randn(4), torch.randn(4), torch.randn(4, 2), anchor_lp)
    assert set(no_reg.terms) == {"forward", "backward"}  # gamma 0: the regulariser does not enter


def test_diagnostics_write_their_metrics_and_leave_training_unchanged(tiny_model_path, tmp_path):
    runs = {}
    for diagnostics in (False, True):
        cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=2, eval_prompts=0, diagnostics=diagnostics,
                                  out=str(tmp_path / f"diag-{diagnostics}")))
        out = train(cfg, JBond(cfg))
        runs[diagnostics] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plain, diagnosed = runs[False], runs[True]
    for row in diagnosed:
        assert row["diag/grad_norm_forward"] > 0 and row["diag/grad_norm_backward"] > 0
        assert -1.0 <= row["diag/grad_cos_forward_backward"] <= 1.0
        assert "kl_anchor_estimate" in row and "advantage_std" in row
    assert not [k for row in plain for k in row if k.startswith("diag/")]
    for a, b in zip(plain, diagnosed):
        for k in ("loss", "grad_norm", "kl_anchor_estimate", "reward_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
