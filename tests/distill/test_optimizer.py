"""``--optimizer``: AdamW (the default) or SGD with momentum, checked by the config and used by the run."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import TrainConfig
from distill.jbond import JBond, JBondConfig
from distill.loop import make_optimizer, train
from tests.distill.test_trainer import small


@pytest.mark.parametrize("options, message", [({"optimizer": "lion"}, "optimizer"), ({"momentum": 1.0}, "momentum"),
                                              ({"momentum": -0.1}, "momentum")])
def test_an_unknown_optimizer_or_a_momentum_outside_0_1_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_sgd_steps_by_the_gradient_with_momentum_and_adamw_by_its_sign():
    g = torch.tensor([1.0, 0.01])  # two weights, one with a hundredth of the other's gradient
    moves = {}
    for name in ("sgd", "adamw"):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = make_optimizer(TrainConfig(optimizer=name, lr=0.1, momentum=0.5), [p])
        for _ in range(2):
            p.grad = g.clone()
            opt.step()
        moves[name] = -p.detach()
    # SGD: lr * g, then lr * (g + 0.5 g): in proportion to the gradient
    torch.testing.assert_close(moves["sgd"], 0.1 * g * 2.5)
    # Adam: about lr a step for each weight, whatever the gradient's size
    torch.testing.assert_close(moves["adamw"], torch.full((2,), 0.2), atol=2e-3, rtol=0)


def test_a_run_trains_with_sgd_and_records_it(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=2, eval_prompts=0, optimizer="sgd", lr=0.05))
    out = train(cfg, JBond(cfg))
    assert json.loads((out / "config.json").read_text())["optimizer"] == "sgd"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # resumes with its momentum
