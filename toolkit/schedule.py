"""Learning-rate schedules: linear warmup from 0, then cosine, warmup-stable-decay or constant."""
import math


def learning_rate(step: int, cfg) -> float:
    """The learning rate for optimizer step `step` (0-based) of a run of cfg.max_steps steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    decay_start = cfg.wsd_decay_start()  # wsd: stable, then linear decay (validation keeps warmup before it)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)
