"""Learning-rate schedules, chosen by name (`TrainConfig.schedule`): linear warmup from 0, then the
schedule's shape. Add one: a function (step, cfg) -> rate after warmup, and one line in SCHEDULES."""
import math


def constant(step: int, cfg) -> float:
    return cfg.lr


def cosine(step: int, cfg) -> float:
    """Half a cosine from lr down to min_lr over the steps after warmup."""
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def wsd(step: int, cfg) -> float:
    """Warmup-stable-decay: lr, then a linear decay to min_lr over the last decay_fraction of the steps
    (validation keeps the warmup before the decay)."""
    decay_start = cfg.wsd_decay_start()
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)


SCHEDULES = {
    "cosine": cosine,
    "wsd": wsd,
    "constant": constant,
}


def learning_rate(step: int, cfg) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of cfg.max_steps steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return SCHEDULES[cfg.schedule](step, cfg)
