"""Positions: how attention knows where tokens are. Each entry is built for one layer's attention as
Cls(cfg, layer_index); it may rotate queries and keys (RoPE), give a bias that the attention mask adds
to the scores (ALiBi), and add a vector to the model's input (learned positions).

Add a variant: one class and one line in POSITIONS.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from modules.logging import LoggingModule, log_io


class NoPositions(LoggingModule):
    """No positional information (NoPE): attention sees order only through the causal mask."""

    score_bias = None  # a hashable bias the attention mask adds to the scores (see ALiBi), or None

    def __init__(self, cfg, layer_index: int | None = None):
        super().__init__()

    @staticmethod
    def input_embedding(cfg) -> nn.Module | None:
        """A module mapping positions (T,) or (B, T) to vectors added to the token embeddings, or None."""
        return None

    @log_io(outputs=("q", "k"))
    def forward(self, q, k, ctx):
        """Queries (B, heads, T, head_dim) and keys as attention will use them."""
        return q, k


class LearnedPositions(NoPositions):
    """A learned vector per position added once to the token embeddings (GPT-2); nothing in attention."""

    @staticmethod
    def input_embedding(cfg) -> nn.Module:
        return nn.Embedding(cfg.context_length, cfg.dim)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotation speed of each pair of channels, theta^(-2i/head_dim); optional Llama 3.1 scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    # Llama 3.1: slow down low frequencies by `factor`, keep high ones, blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((original_len / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + head_dim/2 by angle position * frequency_i."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Rope(NoPositions):
    """Rotary position embedding (Su et al. 2021): queries and keys rotated by position, so that their
    dot product depends only on the offset. Tables are computed once for every position."""

    def __init__(self, cfg, layer_index: int | None = None):
        super().__init__(cfg, layer_index)
        scaling = cfg.rope_scaling
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32),
                             rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling))
        # Derived from the config, so not saved with the weights.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        # Layers with equal tables share one lookup per forward (see Context.memoised).
        self.memo_key = ("rope", cfg.head_dim, cfg.rope_theta, tuple(sorted((scaling or {}).items())))

    @staticmethod
    def check_config(cfg):
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim={cfg.head_dim} is not valid: rotary positions need an even head_dim")

    def tables(self, positions: int | torch.Tensor, length: int):
        """(cos, sin) for `length` positions from `positions` (an int) or for (B, T) positions, shaped
        to broadcast over (B, heads, T, head_dim / 2)."""
        if isinstance(positions, int):
            return self.cos[positions:positions + length], self.sin[positions:positions + length]
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @log_io(outputs=("q", "k"))
    def forward(self, q, k, ctx):
        cos, sin = ctx.memoised(self.memo_key, lambda: self.tables(ctx.positions, ctx.length))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head-specific slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of
    two; otherwise those of the largest power of two below n, then every other slope of twice that."""
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    below = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(below) + geometric(2 * below)[0::2][:n_heads - below]
    return torch.tensor(slopes, dtype=torch.float32)


@dataclass(frozen=True)
class AlibiBias:
    """The score bias -slope_h * (query slot - key slot), in the two forms the attention kernel takes.
    Hashable: layers with the same number of heads share one mask per forward."""
    n_heads: int

    def dense(self, distance: torch.Tensor) -> torch.Tensor:
        """(heads, T, S) biases for a (T, S) matrix of query slot - key slot."""
        slopes = alibi_slopes(self.n_heads).to(distance.device)
        return -slopes[:, None, None] * distance

    def score_mod(self, device):
        """The same bias as a FlexAttention score_mod."""
        slopes = alibi_slopes(self.n_heads).to(device)
        return lambda score, b, h, q, k: score - slopes[h] * (q - k)


class Alibi(NoPositions):
    """ALiBi (Press et al. 2021, "Train Short, Test Long"): no position vectors at all; each head adds
    -slope * distance to its attention scores, with slopes fixed per head. Slot distance equals position
    distance for every pair attention may use (padding is masked, documents never mix), so it works
    with the KV cache, left padding, packed documents and sliding windows alike."""

    def __init__(self, cfg, layer_index: int | None = None):
        super().__init__(cfg, layer_index)
        self.score_bias = AlibiBias(cfg.n_heads)


POSITIONS = {
    "none": NoPositions,
    "learned": LearnedPositions,
    "rope": Rope,
    "alibi": Alibi,
}
