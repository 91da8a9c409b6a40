"""How initialisation, attention, logits and learning rates scale with the model's width.

A parametrization is a function cfg -> Scales: multipliers relative to the standard parametrization
(SP), which the model and the optimizers apply. Under SP every multiplier is 1, and the best learning
rate drifts as the model widens. Under muP (Yang et al. 2022, "Tensor Programs V", Table 3 for Adam)
the hyperparameters tuned at width `base_dim` stay good at any width; at dim == base_dim muP is SP.
With m = dim / base_dim:

    attention scale   1/sqrt(head_dim) -> sqrt(base_head_dim)/head_dim = 1/sqrt(head_dim) / sqrt(m)
                      (1/d attention; assumes head_dim grows with dim, n_heads fixed)
    hidden matrices   init std / sqrt(m); AdamW rate / m (their decoupled weight decay, which AdamW
                      multiplies by the rate, shrinks with it)
    output logits     / m
    embeddings, norm gains and biases: unchanged.

"spectral" is muP as Yang, Simon and Bernstein (2023) derive it from the spectral condition (every matrix's
spectral norm and updates scale like sqrt(fan_out/fan_in)): the same multipliers, except that the output head
starts at that condition's scale, std proportional to min(1, sqrt(vocab/dim)) / sqrt(dim), where muP's table
(init var 1/fan_in^2) shrinks it as 1/dim. Both are muP in the infinite-width limit; at finite width and short
training the head's random start matters: at width 512 (base 64, 126 steps) muP's 8x smaller head cost about
1 bit per byte (README, "Small to large"). The logits at initialisation then keep their size at every width.

Muon's rate needs no width factor with the spectral scaling sqrt(max(1, fan_out/fan_in)) (Yang, Simon
and Bernstein 2023; muon_adjust_lr="original"), and AdamW's 1/m with "match_rms_adamw", which makes
its updates as large as AdamW's (see toolkit/optim.py).
"""
import math
from typing import NamedTuple


class Scales(NamedTuple):
    """Multipliers relative to SP: all 1 under SP, and under muP at dim == base_dim."""
    attention: float = 1.0  # times 1/sqrt(head_dim), the attention logits' scale
    hidden_init: float = 1.0  # times init_std, for the layers' matrices
    output: float = 1.0  # times the logits
    hidden_lr: float = 1.0  # times the AdamW rate of the layers' matrices
    head_init: float = 1.0  # times init_std, for an untied output head (before the logits' multiplier)


def standard(cfg) -> Scales:
    return Scales()


def mup(cfg) -> Scales:
    ratio = (cfg.base_dim or cfg.dim) / cfg.dim  # 1/m
    return Scales(attention=math.sqrt(ratio), hidden_init=math.sqrt(ratio), output=ratio, hidden_lr=ratio)


def spectral(cfg) -> Scales:
    def head_std(dim):  # the spectral condition's init scale for a (vocab x dim) head, up to a constant
        return min(1.0, math.sqrt(cfg.vocab_size / dim)) / math.sqrt(dim)
    scales = mup(cfg)
    # The head's effective std, init_std x head_init x output, follows head_std relative to the base width.
    return scales._replace(head_init=head_std(cfg.dim) / head_std(cfg.base_dim or cfg.dim) / scales.output)


PARAMETRIZATIONS = {
    "sp": standard,
    "mup": mup,
    "spectral": spectral,
}
