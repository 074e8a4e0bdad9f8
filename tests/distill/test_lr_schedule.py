"""``--lr-schedule``: warm-up, then constant or a decay to (nearly) zero, and the run logs what it used."""

from __future__ import annotations

import json
import math

import pytest

from distill.config import TrainConfig
from distill.jbond import JBond, JBondConfig
from distill.loop import lr_factor, train
from tests.distill.test_trainer import small


def test_warm_up_then_constant_is_the_old_schedule():
    old = [min(1.0, (s + 1) / 4) for s in range(24)]
    assert [lr_factor(s, 24, 4) for s in range(24)] == old


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_starts_at_one_after_the_warm_up_and_falls_to_a_small_last_step(schedule):
    factors = [lr_factor(s, 10, 2, schedule) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    decay = factors[2:]
    assert all(a > b for a, b in zip(decay, decay[1:])), decay
    assert 0 < decay[-1] <= 1 / 9 + 1e-12  # one ninth of the lr at most, never zero (R = 8)


def test_linear_and_cosine_by_hand():
    # R = 4 decay steps after 1 warm-up step: fractions done 1/5 .. 4/5
    assert [lr_factor(s, 5, 1, "linear") for s in range(1, 5)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert [lr_factor(s, 5, 1, "cosine") for s in range(1, 5)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(1, 5)])


def test_an_unknown_schedule_is_refused_by_the_config():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_the_run_logs_the_decayed_lr(tiny_model_path, tmp_path):
    cfg = JBondConfig(**small(tiny_model_path, tmp_path, steps=4, warmup_steps=1, lr=1e-3, lr_schedule="linear",
                              eval_prompts=0))
    out = train(cfg, JBond(cfg))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows if "lr" in r]
    assert logged == pytest.approx([1e-3 * lr_factor(s, 4, 1, "linear") for s in range(4)])  # the lr each step used
    assert logged[0] == pytest.approx(1e-3) and logged[-1] == pytest.approx(1e-3 / 4)
