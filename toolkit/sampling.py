"""Samplers: small pure functions on a (B, vocab) tensor of next-token logits, and `sample`, which
applies them in this order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw one token

The penalty comes first so that it also steers greedy decoding; temperature comes before the
filters so that top-p and min-p see the distribution actually drawn from. Temperature 0 means
greedy: the most likely token after the penalty (every filter keeps it, so they are skipped).
Filters remove tokens by setting their logits to -inf; none ever removes the most likely token.
"""
import math

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): the logits of tokens already in the sequence (`seen`, a
    (B, vocab) bool mask) are divided by `penalty` when positive and multiplied by it when negative,
    so a penalty > 1 makes every seen token less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Sharpen (temp < 1) or flatten (temp > 1) the distribution: softmax(logits / temp)."""
    return logits / temp


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by position)."""
    if k >= logits.shape[-1]:
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities add up to at least p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the top one
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, -math.inf)
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least min_p times as likely as the most likely one (Nguyen et al. 2024). In
    logits: log p_i >= log p_max + log min_p, which needs no softmax."""
    if min_p == 0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, -math.inf)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) ids of the most likely tokens."""
    return logits.argmax(dim=-1)


def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) ids drawn from softmax(logits)."""
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, *, temp: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) next ids from (B, vocab) logits, in the order of the module docstring. None (or 1 for
    top_p and repetition_penalty, 0 for min_p) switches a step off; `seen` is needed for a penalty."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temp == 0:
        return greedy(logits)
    if temp != 1.0:
        logits = apply_temperature(logits, temp)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p:
        logits = min_p_filter(logits, min_p)
    return draw(logits, generator)
