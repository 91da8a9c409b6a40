"""Learning-rate schedules: warmup, then cosine, warmup-stable-decay or constant."""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from config import ConfigError, TrainConfig
from toolkit.schedule import SCHEDULES, learning_rate


def rates(**overrides):
    cfg = TrainConfig(**{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110, **overrides})
    return [learning_rate(step, cfg) for step in range(cfg.max_steps)]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
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


def test_wsd_refuses_a_warmup_that_runs_into_the_decay():
    with pytest.raises(ConfigError, match=r"^warmup_steps=50 is not valid: wsd decays from step 20 of 100 .* "
                                          r"lower warmup_steps or decay_fraction$"):
        TrainConfig(schedule="wsd", max_steps=100, warmup_steps=50, decay_fraction=0.8)
    lr = rates(schedule="wsd", max_steps=100, warmup_steps=20, decay_fraction=0.8)  # warmup ends where decay starts
    assert lr[19] == pytest.approx(1e-3) and lr[20] == pytest.approx(1e-3 + (1 / 80) * (1e-4 - 1e-3))


@settings(max_examples=300, deadline=None)
@given(schedule=st.sampled_from(["cosine", "wsd", "constant"]), max_steps=st.integers(1, 400),
       warmup_steps=st.integers(0, 400), decay_fraction=st.floats(0.01, 1.0), min_lr=st.floats(0.0, 1e-3))
def test_every_accepted_schedule_changes_the_rate_without_jumps(schedule, max_steps, warmup_steps, decay_fraction,
                                                                 min_lr):
    """Between two steps the rate moves at most as fast as warmup's ramp or the decay's steepest slope."""
    try:
        cfg = TrainConfig(schedule=schedule, lr=1e-3, min_lr=min_lr, max_steps=max_steps, warmup_steps=warmup_steps,
                          decay_fraction=decay_fraction)
    except ConfigError:
        assume(False)
    lr = [learning_rate(step, cfg) for step in range(max_steps)]
    ramp = cfg.lr / max(1, warmup_steps)
    decay = (cfg.lr - cfg.min_lr) * max(math.pi / 2 / max(1, max_steps - warmup_steps),
                                        1 / max(1, int(decay_fraction * max_steps)))
    assert max((abs(b - a) for a, b in zip(lr, lr[1:])), default=0) <= max(ramp, decay) * (1 + 1e-9)
    assert all(cfg.min_lr - 1e-12 <= r <= cfg.lr + 1e-12 for r in lr[warmup_steps:])


def test_a_new_schedule_is_one_function_and_one_registry_line(monkeypatch):
    def linear(step, cfg):  # straight from lr to min_lr after warmup
        return cfg.lr + (cfg.min_lr - cfg.lr) * (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    monkeypatch.setitem(SCHEDULES, "linear", linear)
    lr = rates(schedule="linear", lr=1e-3, min_lr=0.0, warmup_steps=10, max_steps=110)
    assert lr[9] == pytest.approx(1e-3) and lr[60] == pytest.approx(5e-4) and lr[109] == pytest.approx(1e-5)
