"""Attention against the formula: causality, rotary, GQA/MQA, QK-norm, sliding window, masks, the
per-forward mask memo and the kernel's choice of path."""
import math
import warnings

import pytest
import torch

from config import ConfigError, ModelConfig
from modules.attention import ATTENTIONS, CausalSelfAttention
from modules.context import Context, MaskSpec, causal_mask
from modules.positions import Rope, alibi_slopes, apply_rotary


def config(**overrides):
    values = dict(dim=32, n_heads=4, n_kv_heads=None, context_length=64, positions="none")
    return ModelConfig(**{**values, **overrides})


def reference_attention(attn, x, window=None):
    """softmax(q k^T / sqrt(d) + mask) v, written out per head with explicit masks."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)).split(attn.split, -1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, KV, D).transpose(1, 2)
    v = v.view(B, T, KV, D).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if isinstance(attn.positions, Rope):
        cos, sin = attn.positions.tables(0, T)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = torch.empty(B, H, T, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    for h in range(H):
        kv = h // (H // KV)  # query head h reads key/value head h // group size
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(D)
        out[:, h] = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v[:, kv]
    out_bias = attn.out.bias if attn.out.bias is not None else 0
    return out.transpose(1, 2).reshape(B, T, H * D) @ attn.out.weight.T + out_bias


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_matches_formula(n_kv_heads, bias):
    attn = CausalSelfAttention(config(n_kv_heads=n_kv_heads, bias=bias))
    x = torch.randn(2, 10, 32)
    assert torch.allclose(attn(x), reference_attention(attn, x), atol=1e-5)


def test_attention_with_rotary_and_qk_norm_matches_formula():
    attn = CausalSelfAttention(config(positions="rope", qk_norm=True, n_kv_heads=2))
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2)
        attn.k_norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 10, 32)
    assert torch.allclose(attn(x), reference_attention(attn, x), atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_sliding_window_matches_formula_and_truncated_input(window):
    attn = CausalSelfAttention(config(sliding_window=window))
    x = torch.randn(2, 12, 32)
    y = attn(x)
    assert torch.allclose(y, reference_attention(attn, x, window=window), atol=1e-5)
    # Without positions, the last token's output depends only on the last `window` tokens.
    assert torch.allclose(y[:, -1], attn(x[:, -window:])[:, -1], atol=1e-5)


def test_causal_mask_formula():
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(causal_mask(6), j <= i)
    assert torch.equal(causal_mask(6, window=2), (j <= i) & (i - j < 2))
    # Two documents [0,0,0,1,1,1]: no attention across the boundary.
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    expected = (j <= i) & (doc[0][:, None] == doc[0][None, :])
    assert torch.equal(causal_mask(6, doc_ids=doc)[0, 0], expected)
    # Later queries over a cache: 2 new queries at slots 4, 5 see keys 0..slot; padding keys hidden but self kept.
    valid = torch.tensor([[False, True, True, True, True, True]])
    m = causal_mask(2, start=4, key_valid=valid)[0, 0]
    assert m.tolist() == [[False, True, True, True, True, False], [False, True, True, True, True, True]]


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}, {"sliding_window": 3}, {"qk_norm": True}])
def test_attention_is_causal(overrides):
    attn = CausalSelfAttention(config(**overrides))
    x = torch.randn(1, 10, 32)
    y = attn(x)
    for t in range(10):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        assert torch.allclose(attn(changed)[:, :t + 1], y[:, :t + 1], atol=1e-6)


def test_gqa_equals_mha_with_repeated_key_value_weights():
    for n_kv_heads in (2, 1):  # GQA, then MQA
        gqa = CausalSelfAttention(config(n_kv_heads=n_kv_heads))
        mha = CausalSelfAttention(config(n_kv_heads=4))
        D, group = 8, 4 // n_kv_heads
        q, k, v = gqa.qkv.weight.split(gqa.split)

        def repeat(w):
            return w.view(n_kv_heads, D, 32).repeat_interleave(group, 0).reshape(4 * D, 32)

        with torch.no_grad():
            mha.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
            mha.out.weight.copy_(gqa.out.weight)
        x = torch.randn(2, 9, 32)
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)
        assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


def rope(head_dim=16, context_length=128, theta=10000.0):
    return Rope(ModelConfig(dim=head_dim * 4, n_heads=4, head_dim=head_dim, context_length=context_length,
                            rope_theta=theta))


def test_rotary_scores_depend_only_on_offset():
    rotary = rope()
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        cos, sin = rotary.tables(torch.tensor([[m, n]]), 2)
        rotated = apply_rotary(torch.stack([q, k]).view(1, 1, 2, 16), cos, sin)[0, 0]
        return rotated[0] @ rotated[1]

    for m, n in [(5, 2), (40, 3), (100, 100)]:
        for shift in (1, 7, 20):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift).item(), abs=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and the offset does matter
    # Rotations preserve norms.
    cos, sin = rotary.tables(torch.tensor([[77]]), 1)
    assert torch.allclose(apply_rotary(q.view(1, 1, 1, 16), cos, sin).norm(), q.norm(), atol=1e-5)


def test_rotary_tables_are_built_once_sliced_and_shared_per_forward():
    rotary = rope(head_dim=8, context_length=32, theta=500000.0)
    cos, sin = rotary.tables(4, 10)
    assert cos.data_ptr() == rotary.cos[4].data_ptr() and sin.data_ptr() == rotary.sin[4].data_ptr()
    inv_freq = 1 / 500000.0 ** (torch.arange(0, 8, 2) / 8)
    assert torch.allclose(rotary.cos, torch.cos(torch.arange(32)[:, None] * inv_freq))
    assert "cos" not in rotary.state_dict()  # derived from the config, not saved
    # Two layers with the same tables look them up once per forward.
    ctx, other = Context(length=10, positions=torch.arange(10).expand(2, 10)), rope(head_dim=8, context_length=32,
                                                                                      theta=500000.0)
    q = torch.randn(2, 4, 10, 8)
    assert torch.equal(rotary(q, q, ctx)[0], other(q, q, ctx)[0]) and len(ctx.memo) == 1


def test_attention_dropout_only_in_training():
    attn = CausalSelfAttention(config(attn_dropout=0.5))
    x = torch.randn(2, 10, 32)
    plain = CausalSelfAttention(config())
    plain.load_state_dict(attn.state_dict())
    assert torch.allclose(attn.eval()(x), plain(x))
    assert not torch.allclose(attn.train()(x), plain(x))


@pytest.mark.parametrize("window", [None, 4])
def test_flex_attention_document_mask_equals_dense_mask(window):
    """The BlockMask used on CUDA and the dense mask used by SDPA on CPU give the same attention."""
    attn = CausalSelfAttention(config(n_kv_heads=2, sliding_window=window))
    x = torch.randn(2, 16, 32)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    with torch.no_grad():  # FlexAttention has no backward on CPU
        dense = attn(x, Context(16, doc_ids=doc_ids))
        with warnings.catch_warnings():  # uncompiled flex_attention warns that it is slow: expected here
            warnings.simplefilter("ignore")
            flex = attn(x, Context(16, doc_ids=doc_ids, flex=True))
    assert torch.allclose(dense, flex, atol=1e-5)


def test_masks_are_built_once_per_forward_and_plain_causal_needs_none():
    ctx = Context(12)
    assert ctx.mask(MaskSpec(), torch.float32) is None  # SDPA's is_causal path
    assert ctx.mask(MaskSpec(window=12), torch.float32) is None  # a window as long as the input changes nothing
    windowed = ctx.mask(MaskSpec(window=4), torch.float32)
    assert torch.equal(windowed, causal_mask(12, window=4))
    assert ctx.mask(MaskSpec(window=4), torch.float32) is windowed and len(ctx.memo) == 1
    # One new query after cached keys sees them all; several need a mask.
    assert Context(1, start=7).mask(MaskSpec(), torch.float32) is None
    assert torch.equal(Context(3, start=7).mask(MaskSpec(), torch.float32), causal_mask(3, start=7))


@pytest.mark.parametrize("window", [None, 4])
def test_attention_probabilities_reproduce_the_output(window):
    """The weights shown in view_modules.ipynb are the ones forward uses, window included: weights @ v
    gives its output, and nothing outside the mask has weight."""
    attn = CausalSelfAttention(config(positions="rope", n_kv_heads=2, sliding_window=window))
    x = torch.randn(2, 10, 32)
    weights = attn.attention_probabilities(x)
    mask = causal_mask(10, window=window)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 10)) and (weights.masked_select(~mask) == 0).all()
    assert torch.allclose(weights, reference_weights(attn, x, window), atol=1e-6)
    _, _, v = attn.project(x, Context.of(x))
    mixed = weights @ v.repeat_interleave(2, dim=1)
    assert torch.allclose(attn.out(mixed.transpose(1, 2).reshape(2, 10, 32)), attn(x), atol=1e-5)


def reference_weights(attn, x, window):
    q, k, _ = attn.project(x, Context.of(x))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(attn.head_dim)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    return scores.masked_fill(~allowed, -math.inf).softmax(-1)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2 ** -i for i in range(1, 9)]
    # Not a power of two: the 4-head slopes, then every other slope of the 8-head sequence.
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


@pytest.mark.parametrize("window", [None, 4])
def test_alibi_attention_matches_formula(window):
    """softmax(q k^T / sqrt(d) - slope_h * (i - j)) v over the causal (windowed) mask, with no position vectors."""
    attn = CausalSelfAttention(config(positions="alibi", n_kv_heads=2, sliding_window=window))
    x = torch.randn(2, 10, 32)
    q, k, v = attn.project(x, Context.of(x))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    bias = -alibi_slopes(4)[:, None, None] * (i - j)
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).masked_fill(~allowed, -math.inf)
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    assert torch.allclose(attn.attention_probabilities(x), scores.softmax(-1), atol=1e-6)


def test_alibi_flex_score_mod_equals_dense_bias():
    attn = CausalSelfAttention(config(positions="alibi", n_kv_heads=2))
    x = torch.randn(2, 16, 32)
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.allclose(attn(x, Context(16, doc_ids=doc_ids)), attn(x, Context(16, doc_ids=doc_ids, flex=True)),
                              atol=1e-5)


def reference_differential(attn, x, window=None, slopes=None):
    """Differential attention written out head by head: two softmax maps over the query/key halves (with ALiBi,
    each adds its head's -slope * distance), their difference (scaled by lambda) mixing the values, RMS-normed
    per head and scaled by 1 - lambda_init."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(attn.split, -1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    lam = (torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2) + attn.lambda_init)
    heads = []
    for h in range(H):
        g = h // (H // KV)
        bias = 0 if slopes is None else -slopes[h] * (i - j)
        maps = [torch.softmax((q[:, :, h, half] @ k[:, :, g, half].transpose(1, 2) / math.sqrt(D / 2) + bias)
                              .masked_fill(~allowed, -math.inf), -1) for half in (slice(0, D // 2), slice(D // 2, D))]
        mixed = (maps[0] - lam * maps[1]) @ v[:, :, g]
        normed = mixed / torch.sqrt(mixed.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.head_norm.weight
        heads.append(normed * (1 - attn.lambda_init))
    return torch.cat(heads, -1) @ attn.out.weight.T


@pytest.mark.parametrize("n_kv_heads, window", [(4, None), (2, 3), (1, None)])
def test_differential_attention_matches_formula(n_kv_heads, window):
    attn = ATTENTIONS["differential"](config(attention="differential", n_kv_heads=n_kv_heads, sliding_window=window), 3)
    with torch.no_grad():
        attn.head_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 32)
    assert attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.9))  # the paper's schedule at layer 3
    assert torch.allclose(attn(x), reference_differential(attn, x, window), atol=1e-5)
    # Its maps: rows of the difference sum to 1 - lambda, and nothing outside the mask has weight.
    weights = attn.attention_probabilities(x)
    assert torch.allclose(weights.sum(-1), (1 - attn.lambda_()).expand(2, 4, 10), atol=1e-5)
    assert (weights.masked_select(~causal_mask(10, window=window)) == 0).all()


def test_differential_attention_with_alibi_biases_both_maps_of_a_head():
    """Both softmax maps of a head get its ALiBi bias, in forward and in the scores that shape logs with
    statistics record (each half's scaled q k^T plus the bias, at the allowed pairs)."""
    attn = ATTENTIONS["differential"](config(attention="differential", positions="alibi", n_kv_heads=2), 1)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), reference_differential(attn, x, slopes=alibi_slopes(4)), atol=1e-5)
        q, k, _ = attn.project(x, Context.of(x))
        scores = attn.scores(q, k, Context.of(x))
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    bias = -alibi_slopes(4)[:, None, None] * (i - j)
    # q and k are (B, heads x 2 halves, T, 4), head-major; two query heads share each key head
    halves = [q[:, half::2] @ k[:, half::2].repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(4) + bias
              for half in (0, 1)]
    allowed = (j <= i).expand(2, 4, 10, 10)
    assert torch.allclose(scores, torch.cat([h[allowed] for h in halves]), atol=1e-5)


def test_differential_attention_settings():
    cfg = config(attention="differential", diff_lambda_init=0.5)
    assert ATTENTIONS["differential"](cfg, 7).lambda_init == 0.5
    plain, differential = CausalSelfAttention(config()), ATTENTIONS["differential"](cfg)
    extra = sum(p.numel() for p in differential.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 4 * 4 + 8  # four lambda vectors of head_dim / 2, and the per-head norm's scale
    for overrides, message in [({"head_dim": 6}, "head_dim=6 is not valid: differential attention needs"),
                               ({"diff_lambda_init": 1.0}, "diff_lambda_init=1.0 is not valid")]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            config(attention="differential", **overrides)
