"""Causal self-attention and the one kernel function every attention variant calls.

A variant is one class, built as Cls(cfg, layer_index), and one line in ATTENTIONS. It makes queries,
keys and values however it likes and hands them to `attend` with its MaskSpec (window, score bias):
`attend` picks SDPA (its `is_causal` path when nothing else is needed), FlexAttention (CUDA document
masks) or the explicit formula (for `attention_probabilities`), and shares key/value heads (GQA), so
no variant copies dispatch code.
"""
import copy
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.cache import KVCache, LayerKV  # noqa: F401  (KVCache: the cache type, imported from here by toolkit)
from modules.context import Context, FlexMask, MaskSpec
from modules.logging import LoggingModule, log_io
from modules.norm import make_norm
from modules.parametrization import PARAMETRIZATIONS
from modules.positions import POSITIONS


def attend(q, k, v, ctx: Context, spec: MaskSpec, dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v for queries (B, H, T, d) over keys (B, KV, S, d) and values
    (B, KV, S, dv), where each key/value head serves H / KV query heads; scale None is 1/sqrt(d).
    Returns (B, H, T, dv)."""
    grouped = q.shape[1] != k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if ctx.weights is not None:  # attention_probabilities: the same mask, weights made explicit
        return explicit_attention(q, k, v, ctx.dense_mask(spec, q.dtype), ctx.weights, scale)
    mask = ctx.mask(spec, q.dtype)
    if isinstance(mask, FlexMask):
        return flex_attention(q, k, v, mask.block_mask, mask.score_mod, enable_gqa=grouped, scale=scale)
    # Key/value heads shared by query groups: training copies them (not every fused GPU kernel takes
    # enable_gqa); generation reads the whole cache at every step, so there SDPA shares them.
    if grouped and ctx.cache is None:
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    T = q.shape[2]
    # SDPA aligns is_causal to the top left, which is right only without cached keys; a single new
    # query may see every cached key, so it needs no mask at all. (An `if`, as torch.compile may make
    # T symbolic and SDPA takes only a real bool.)
    assert mask is not None or T == 1 or k.shape[2] == T, "a cached prefix needs an explicit mask"
    causal = False
    if mask is None and T > 1:
        causal = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          enable_gqa=grouped and ctx.cache is not None, scale=scale)


def attention_scores(q, k, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The pre-softmax logits scale q k^T + mask (B, H, T, S), -inf where the mask forbids."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    return scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask


def explicit_attention(q, k, v, mask: torch.Tensor, weights_out: list, scale: float) -> torch.Tensor:
    """The formula written out, appending its softmax weights (B, H, T, S) to weights_out."""
    weights = attention_scores(q, k, mask, scale).softmax(-1)
    weights_out.append(weights)
    return weights @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex)  # FlexAttention is only fast compiled


def flex_attention(q, k, v, block_mask, score_mod, enable_gqa, scale):
    from torch.nn.attention.flex_attention import flex_attention as flex
    # Eager on CUDA it needs its own compiled kernel; inside a compiled model the model's graph compiles it (a
    # nested torch.compile there would be traced through a cache wrapper). CPU: the unfused reference (tests).
    if q.is_cuda and not torch.compiler.is_compiling():
        flex = compiled_flex_attention()
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa, scale=scale)


class CausalSelfAttention(LoggingModule):
    """Multi-head causal self-attention with `n_kv_heads` key/value heads shared by groups of query heads
    (n_kv_heads == n_heads: MHA, 1: MQA, in between: GQA), optional QK-norm, the positions of
    POSITIONS[cfg.positions] and an optional sliding window."""

    qk_split = 1  # pieces each head's query and key are split into (differential attention: 2)
    compiles_fullgraph = True  # torch.compile(fullgraph=True) traces it (checked by tests/test_contracts.py)

    def __init__(self, cfg, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_dim = cfg.head_dim // self.qk_split
        self.layer_index = layer_index  # which entry of the KV cache is ours
        self.split = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
        self.qkv = nn.Linear(cfg.dim, sum(self.split), bias=cfg.bias)  # one matmul for q, k and v
        self.qkv.output_split = self.split  # three projections (Muon orthogonalises each alone)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.out.residual_projection = True  # scaled init (see Model.init_weights)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, layer_index, self.qk_dim)
            self.k_norm = make_norm(cfg, layer_index, self.qk_dim)
        qk_cfg = copy.copy(cfg)
        qk_cfg.head_dim = self.qk_dim  # positions act on the query and key pieces
        self.positions = POSITIONS[cfg.positions](qk_cfg, layer_index)
        self.mask_spec = MaskSpec(cfg.sliding_window, self.positions.score_bias)
        self.dropout = cfg.attn_dropout
        self.scale = PARAMETRIZATIONS[cfg.parametrization](cfg).attention / math.sqrt(self.qk_dim)

    def project(self, x, ctx: Context):
        """Queries (B, heads * qk_split, T, qk_dim), and keys (B, kv_heads * qk_split, S, qk_dim) and values
        (B, kv_heads, S, head_dim) of every slot so far: normed, positioned and cached."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, -1, self.qk_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.qk_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.positions(q, k, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_index, k, v)
        return q, k, v

    def mix(self, q, k, v, ctx: Context) -> torch.Tensor:
        """The values mixed by attention, (B, heads, T, head_dim)."""
        return attend(q, k, v, ctx, self.mask_spec, self.dropout if self.training else 0.0, self.scale)

    @log_io
    def forward(self, x, ctx: Context | None = None):
        """x: (B, T, dim). ctx: the forward's Context (None: x alone, positions from 0, no cache)."""
        ctx = Context.of(x) if ctx is None else ctx
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if self.logging_stats:
            self.scores(q, k, ctx)
        y = self.mix(q, k, v, ctx)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    @log_io(outputs=("scores",))
    def scores(self, q, k, ctx: Context) -> torch.Tensor:
        """The attention logits (scaled query-key products plus any score bias) at the (query, key) pairs
        the mask allows, flat: for shape logs with statistics (their max is the largest attention logit,
        which grows when training goes unstable), computed only there."""
        mask = ctx.dense_mask(self.mask_spec, q.dtype)
        allowed = mask if mask.dtype == torch.bool else mask > -math.inf
        flat = []
        for q_piece, k_piece in zip(q.unflatten(1, (-1, self.qk_split)).unbind(2),
                                    k.unflatten(1, (-1, self.qk_split)).unbind(2)):  # as mix: a score bias per head
            logits = attention_scores(q_piece, k_piece, mask, self.scale)
            flat.append(logits[allowed.expand_as(logits)])
        return torch.cat(flat)

    def attention_maps(self, x, ctx: Context | None = None):
        """(forward's output, [the softmax weights (B, heads, T, S) of each kernel call]), computed by the
        kernel in its explicit form with the very masks forward uses."""
        ctx = Context.of(x) if ctx is None else ctx
        if ctx.cache is not None:
            raise ValueError("attention maps are computed without a KV cache: pass the context of an uncached forward")
        ctx = dataclasses.replace(ctx, weights=[], memo={})
        return self.forward(x, ctx), ctx.weights

    def attention_probabilities(self, x, ctx: Context | None = None) -> torch.Tensor:
        """The (B, heads, T, S) attention weights that forward's kernels never materialise, for looking at."""
        return self.combine_maps(self.attention_maps(x, ctx)[1])

    def combine_maps(self, maps: list) -> torch.Tensor:
        """The weights each value gets, from the softmax maps of this module's kernel calls."""
        return maps[0]

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of scores and mixing (forward and backward: 6 per multiply-add)."""
        attended = min(seq_len, self.mask_spec.window or seq_len)
        return 6 * attended * self.n_heads * self.head_dim * (1 + self.qk_split)

    def make_cache(self, batch_size: int, max_len: int, dtype=torch.float32, device=None) -> LayerKV:
        """This layer's entry of the KV cache: keys and values as `project` returns them."""
        return LayerKV(batch_size, max_len, (self.n_kv_heads * self.qk_split, self.qk_dim),
                       (self.n_kv_heads, self.head_dim), dtype, device)


class DifferentialAttention(CausalSelfAttention):
    """Differential attention (Ye et al. 2024, "Differential Transformer"): each head splits its query and
    key into two halves and mixes values by the difference of their two softmax maps,
    softmax(q1 k1^T) - lambda softmax(q2 k2^T), cancelling the attention noise both share. lambda =
    exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init is learned per layer; each head's output is normed (the
    config's norm over head_dim) and scaled by 1 - lambda_init. lambda_init is diff_lambda_init, or the
    paper's 0.8 - 0.6 exp(-0.3 layer_index). Same weights as causal attention but four small vectors."""

    qk_split = 2

    def __init__(self, cfg, layer_index: int = 0):
        super().__init__(cfg, layer_index)
        depth_schedule = 0.8 - 0.6 * math.exp(-0.3 * layer_index)
        self.lambda_init = depth_schedule if cfg.diff_lambda_init is None else cfg.diff_lambda_init
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(self.qk_dim) * 0.1) for _ in range(4))
        self.head_norm = make_norm(cfg, layer_index, cfg.head_dim)

    @staticmethod
    def check_config(cfg):
        if cfg.head_dim % 4:
            raise ValueError(f"head_dim={cfg.head_dim} is not valid: differential attention needs a multiple of 4 "
                             f"(two halves, each even for rotary positions)")
        if cfg.diff_lambda_init is not None and not 0 <= cfg.diff_lambda_init < 1:
            raise ValueError(f"diff_lambda_init={cfg.diff_lambda_init!r} is not valid: must be None or in [0, 1)")

    def lambda_(self):
        return (torch.exp(self.lambda_q1 @ self.lambda_k1) - torch.exp(self.lambda_q2 @ self.lambda_k2)
                + self.lambda_init)

    def mix(self, q, k, v, ctx: Context) -> torch.Tensor:
        (q1, q2), (k1, k2) = q.unflatten(1, (-1, 2)).unbind(2), k.unflatten(1, (-1, 2)).unbind(2)
        dropout = self.dropout if self.training else 0.0
        first = attend(q1, k1, v, ctx, self.mask_spec, dropout, self.scale)
        second = attend(q2, k2, v, ctx, self.mask_spec, dropout, self.scale)
        return self.head_norm(first - self.lambda_() * second) * (1 - self.lambda_init)

    def combine_maps(self, maps: list) -> torch.Tensor:
        return maps[0] - self.lambda_() * maps[1]


ATTENTIONS = {
    "causal": CausalSelfAttention,
    "differential": DifferentialAttention,
}
