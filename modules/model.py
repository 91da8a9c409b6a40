"""The language model: token embedding, the positions' input embedding if any, layers, final norm, head.

Every layer is built from its own resolved config (cfg.layer(i)), so any per-layer choice may differ.
Once per forward the model makes the Context that layers share (positions, documents, padding, the
KV cache's step); each attention module builds its own mask from it.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.cache import KVCache
from modules.context import Context, document_positions, padded_positions
from modules.layer import NORM_PLACEMENTS, make_dropout
from modules.logging import LoggingModule, log_io
from modules.norm import make_norm
from modules.parametrization import PARAMETRIZATIONS
from modules.positions import POSITIONS

IGNORE_INDEX = -100  # targets with this value (padding) add nothing to the loss


class Model(LoggingModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.scales = PARAMETRIZATIONS[cfg.parametrization](cfg)  # width multipliers: all 1 under SP
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = POSITIONS[cfg.positions].input_embedding(cfg)
        self.embed_dropout = make_dropout(cfg.embed_dropout)
        layers = [cfg.layer(i) for i in range(cfg.n_layers)]
        self.layers = nn.ModuleList(NORM_PLACEMENTS[c.norm_placement](c, i) for i, c in enumerate(layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self):
        """GPT-2 init: N(0, init_std) for matrices and embeddings, zero biases, and residual
        projections scaled by 1/sqrt(2 n_layers) so the residual stream does not grow with depth; the
        layers' matrices and an untied head also by the parametrization's width factors; the head at zero with
        zero_head.
        Other parameters keep the initial values their modules gave them."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual_projection", False) else 1
                if module is not self.head:
                    scale *= self.scales.hidden_init
                elif not self.cfg.tie_embeddings:  # a tied head is the embedding, initialised as one
                    scale *= self.scales.head_init
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        if self.cfg.zero_head:
            nn.init.zeros_(self.head.weight)

    @log_io(outputs=("logits", "loss"))
    def forward(self, input_ids, targets=None, *, doc_ids=None, padding_mask=None, cache: KVCache | None = None,
                last_logits_only: bool = False):
        """input_ids, targets: (B, T) token ids; targets equal to IGNORE_INDEX are skipped by the loss.
        doc_ids: (B, T) document of each token; tokens then attend only within their document and
        positions restart at each document. padding_mask: (B, T), False at (left) padding.
        cache: generation state, extended by this step. last_logits_only: logits (B, 1, vocab) of the
        last position only, all that generation needs. Returns (logits (B, T, vocab), loss or None)."""
        self.check_input(input_ids, doc_ids, cache)
        step = cache.begin(input_ids.shape[1], padding_mask) if cache is not None else None
        ctx = self.context(input_ids, doc_ids, padding_mask, cache, step)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(ctx.position_ids())
        x = self.embed_dropout(x)
        for layer in self.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.end()
        if last_logits_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        if self.scales.output != 1:
            logits = logits * self.scales.output
        loss = None
        if targets is not None:
            # Under bf16 autocast the loss is still computed in float32 (or wider).
            logits32 = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits32, targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def check_input(self, input_ids, doc_ids, cache):
        start = cache.length if cache is not None else 0
        if start + input_ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"{start + input_ids.shape[1]} tokens exceed the model's "
                             f"context_length={self.cfg.context_length}")
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids is for training; generation with a cache takes padding_mask")

    def context(self, input_ids, doc_ids, padding_mask, cache, step) -> Context:
        """What every layer may need in this forward (with a cache: the slots and positions of its open step)."""
        T, device = input_ids.shape[1], input_ids.device
        if step is not None:
            return Context(T, step.positions, step.start, key_valid=step.key_valid, cache=cache, device=device)
        if doc_ids is not None:  # positions restart at each document; on CUDA FlexAttention skips masked blocks
            return Context(T, document_positions(doc_ids), doc_ids=doc_ids, key_valid=padding_mask, device=device,
                           flex=doc_ids.is_cuda and padding_mask is None)
        if padding_mask is not None:
            return Context(T, padded_positions(padding_mask), key_valid=padding_mask, device=device)
        return Context(T, device=device)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (default: the context)."""
        max_len = max_len or self.cfg.context_length
        weight = self.embed.weight
        layers = [layer.attention.make_cache(batch_size, max_len, weight.dtype, weight.device) for layer in self.layers]
        return KVCache(layers, batch_size, max_len, weight.device)

    def n_params(self, embeddings: bool = True) -> int:
        """Parameters, counting a tied matrix once. Without embeddings: also without the token and
        position embeddings and an untied output head, so tied and untied models compare fairly."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= sum(p.numel() for p in self.pos_embed.parameters())
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward and backward, PaLM appendix B): 6 per weight used in a
        matmul (the layers and the head) plus each layer's attention over the keys it attends to."""
        seq_len = seq_len or self.cfg.context_length
        matmul_weights = self.n_params(embeddings=False) + self.head.weight.numel()
        return 6 * matmul_weights + sum(layer.attention.flops_per_token(seq_len) for layer in self.layers)
