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


def standard(cfg) -> Scales:
    return Scales()


def mup(cfg) -> Scales:
    ratio = (cfg.base_dim or cfg.dim) / cfg.dim  # 1/m
    return Scales(attention=math.sqrt(ratio), hidden_init=math.sqrt(ratio), output=ratio, hidden_lr=ratio)


PARAMETRIZATIONS = {
    "sp": standard,
    "mup": mup,
}
