"""Causal self-attention: MHA, GQA and MQA through `n_kv_heads`, rotary positions, QK-norm,
sliding windows, masks, and the preallocated KV cache used for generation.

Add an attention variant: one class with the same forward signature and one line in ATTENTIONS.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.logging import LoggingModule, log_io
from modules.norm import NORMS


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


class Rotary(LoggingModule):
    """Rotary position embedding tables (Su et al. 2021), computed once for every position."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_frequencies(head_dim, theta, scaling))
        # Derived from the config, so not saved with the weights.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    @log_io(outputs=("cos", "sin"))
    def forward(self, positions: int | torch.Tensor, length: int):
        """Tables for `length` positions starting at `positions` (an int), or for a (B, T) tensor of
        positions; shaped to broadcast over (B, heads, T, head_dim / 2)."""
        if isinstance(positions, int):
            return self.cos[positions:positions + length], self.sin[positions:positions + length]
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + head_dim/2 by angle position * frequency_i."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def causal_mask(length: int, start: int = 0, window: int | None = None, key_valid: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Boolean mask (True = may attend) of `length` queries at slots start.. over keys at slots 0..start+length.

    window: a query sees only the last `window` keys (itself included).
    key_valid: (B, start+length), False for padding slots.
    doc_ids: (B, length) document of each token (start must be 0); tokens see only their own document.
    Every query sees itself, so no row is empty (empty rows would give NaN).
    Returns (T, S) or (B, 1, T, S).
    """
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    mask = mask | (k == q)
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` slots.

    Slots fill left to right, the same slots for the whole batch. Prompts of different lengths are
    left-padded; `key_valid` marks the slots that hold real tokens and `next_position` counts each
    sequence's real tokens, which is its next token's position.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, head_dim, max_len, dtype=torch.float32, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled
        self.padded = False  # whether any slot holds padding (then positions differ per sequence)

    @property
    def max_len(self):
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys and values after the filled slots; return all filled slots."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def __repr__(self):
        return f"KVCache(length={self.length}, max_len={self.max_len}, batch={self.keys.shape[1]})"


class CausalSelfAttention(LoggingModule):
    """Multi-head causal self-attention with `n_kv_heads` key/value heads shared by groups of
    query heads (n_kv_heads == n_heads: MHA, 1: MQA, in between: GQA)."""

    def __init__(self, cfg, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer_index = layer_index  # which slice of the KV cache is ours
        self.split = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
        self.qkv = nn.Linear(cfg.dim, sum(self.split), bias=cfg.bias)  # one matmul for q, k and v
        self.qkv.output_split = self.split  # three projections (Muon orthogonalises each alone)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.out.residual_projection = True  # scaled init (see Model.init_weights)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = NORMS[cfg.norm](cfg.head_dim, cfg.norm_eps, cfg.norm_affine, cfg.norm_bias)
            self.k_norm = NORMS[cfg.norm](cfg.head_dim, cfg.norm_eps, cfg.norm_affine, cfg.norm_bias)
        self.dropout = cfg.attn_dropout

    def heads(self, x, rope=None):
        """Queries (B, n_heads, T, head_dim), keys and values (B, n_kv_heads, T, head_dim), normed and rotated."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def attention_probabilities(self, x, rope=None, mask=None):
        """The (B, n_heads, T, T) softmax weights that forward's SDPA never materialises, for looking at.
        mask as in forward (None: causal)."""
        q, k, _ = self.heads(x, rope)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        allowed = causal_mask(x.shape[1], device=x.device) if mask is None else mask
        return scores.masked_fill(~allowed, -math.inf).softmax(-1)

    @log_io
    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None):
        """x: (B, T, dim). rope: (cos, sin) tables or None. mask: None means causal (each query sees
        itself and every earlier key), else a boolean tensor (True = may attend) or a FlexAttention
        BlockMask. cache: keys and values of earlier steps, extended in place."""
        B, T, _ = x.shape
        q, k, v = self.heads(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            # Key/value heads shared by query groups: training copies them (not every fused GPU kernel
            # takes enable_gqa); generation reads the whole cache at every step, so SDPA shares them.
            grouped = self.n_kv_heads != self.n_heads
            if grouped and cache is None:
                repeats = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            # SDPA aligns is_causal to the top left, which is right only without cached keys; a single
            # new query may see every cached key, so it needs no mask at all.
            assert mask is not None or T == 1 or k.shape[2] == T, "a cached prefix needs an explicit mask"
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=mask is None and T > 1,
                                               enable_gqa=grouped and cache is not None)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def document_block_mask(doc_ids: torch.Tensor, window: int | None = None):
    """The FlexAttention form of causal_mask(T, window=window, doc_ids=doc_ids): a BlockMask that
    lets the kernel skip whole blocks with nothing to attend (other documents, the future)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):
        keep = (k <= q) & (doc_ids[b, q] == doc_ids[b, k])
        return keep & (q - k < window) if window is not None else keep

    B, T = doc_ids.shape
    return create_block_mask(allowed, B, None, T, T, device=doc_ids.device)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex)  # FlexAttention is only fast compiled


def flex_attention(q, k, v, block_mask, enable_gqa):
    if q.is_cuda:
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    from torch.nn.attention.flex_attention import flex_attention as flex
    return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)  # eager reference: for tests on CPU


ATTENTIONS = {
    "causal": CausalSelfAttention,
}
