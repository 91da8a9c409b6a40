"""Learning-rate schedules: warmup, then cosine, warmup-stable-decay or constant."""
import math

import pytest

from config import TrainConfig
from toolkit.schedule import learning_rate


def rates(**overrides):
    cfg = TrainConfig(**{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110, **overrides})
    return [learning_rate(step, cfg) for step in range(cfg.max_steps)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup(schedule):
    lr = rates(schedule=schedule)
    assert lr[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])


def test_cosine_decays_to_min_lr():
    lr = rates(schedule="cosine")
    assert lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lr[-1] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 99 / 100)) * 9e-4)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert learning_rate(110, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)) == pytest.approx(1e-4)


def test_warmup_stable_decay():
    lr = rates(schedule="wsd", decay_fraction=0.2)  # decays over the last 22 steps
    assert lr[10:88] == pytest.approx([1e-3] * 78)
    assert lr[88] == pytest.approx(1e-3 + (1 / 22) * (1e-4 - 1e-3))
    assert lr[-1] == pytest.approx(1e-4)


def test_constant():
    assert rates(schedule="constant")[10:] == pytest.approx([1e-3] * 100)
