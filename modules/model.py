"""The language model: token embedding, optional learned positions, layers, final norm, head."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.attention import KVCache, Rotary, causal_mask, document_block_mask
from modules.layer import Layer, make_dropout, make_norm
from modules.logging import LoggingModule, log_io

IGNORE_INDEX = -100  # targets with this value (padding) add nothing to the loss


class Model(LoggingModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.context_length, cfg.dim) if cfg.positions == "learned" else None
        self.rotary = None
        if cfg.positions == "rope":
            self.rotary = Rotary(cfg.head_dim, cfg.context_length, cfg.rope_theta, cfg.rope_scaling)
        self.embed_dropout = make_dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self):
        """GPT-2 init: N(0, init_std) for matrices and embeddings, zero biases, and residual
        projections scaled by 1/sqrt(2 n_layers) so the residual stream does not grow with depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual_projection", False) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    @log_io(outputs=("logits", "loss"))
    def forward(self, input_ids, targets=None, *, doc_ids=None, padding_mask=None, cache: KVCache | None = None,
                last_logits_only: bool = False):
        """input_ids, targets: (B, T) token ids; targets equal to IGNORE_INDEX are skipped by the loss.
        doc_ids: (B, T) document of each token; tokens then attend only within their document and
        positions restart at each document. padding_mask: (B, T), False at (left) padding.
        cache: generation state, extended in place. last_logits_only: logits (B, 1, vocab) of the last
        position only, all that generation needs. Returns (logits (B, T, vocab), loss or None)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"{start + T} tokens exceed the model's context_length={self.cfg.context_length}")
        positions, mask = self.positions_and_mask(T, doc_ids, padding_mask, cache, input_ids.device)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(positions, positions + T, device=x.device)
                                   if isinstance(positions, int) else positions)
        x = self.embed_dropout(x)
        rope = self.rotary(positions, T) if self.rotary is not None else None
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.length += T
        if last_logits_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            # Under bf16 autocast the loss is still computed in float32 (or wider).
            logits32 = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits32, targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def positions_and_mask(self, T, doc_ids, padding_mask, cache, device):
        """Positions (an int offset when the whole batch shares them, else (B, T)) and the attention
        mask (None when plain causal suffices)."""
        window = self.cfg.sliding_window
        if cache is None:
            if doc_ids is not None:
                # Positions restart at each document: index minus the index where its document began.
                index = torch.arange(T, device=device).expand_as(doc_ids)
                starts = torch.ones_like(doc_ids, dtype=torch.bool)
                starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
                positions = index - torch.where(starts, index, 0).cummax(dim=1).values
                if doc_ids.is_cuda and padding_mask is None:  # FlexAttention skips the masked blocks
                    return positions, document_block_mask(doc_ids, window)
                return positions, causal_mask(T, 0, window, padding_mask, doc_ids, device)
            if padding_mask is not None:
                positions = (padding_mask.long().cumsum(1) - 1).clamp(min=0)
                return positions, causal_mask(T, 0, window, padding_mask, device=device)
            return 0, causal_mask(T, 0, window, device=device) if window is not None else None
        if doc_ids is not None:
            raise ValueError("doc_ids is for training; generation with a cache takes padding_mask")
        start = cache.length
        if padding_mask is not None:
            cache.key_valid[:, start:start + T] = padding_mask
            cache.padded = cache.padded or not bool(padding_mask.all())
        if cache.padded:
            valid = cache.key_valid[:, start:start + T]
            positions = (cache.next_position[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
            cache.next_position += valid.sum(1)
        else:
            positions = start
            cache.next_position += T
        needs_mask = cache.padded or window is not None and start + T > window or (T > 1 and start > 0)
        mask = causal_mask(T, start, window, cache.key_valid[:, :start + T] if cache.padded else None, device=device) \
            if needs_mask else None
        return positions, mask

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens (default: the context)."""
        max_len = max_len or self.cfg.context_length
        weight = self.embed.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, self.cfg.head_dim, max_len,
                       dtype=weight.dtype, device=weight.device)

    def n_params(self, embeddings: bool = True) -> int:
        """Parameters, counting a tied matrix once. Without embeddings: also without the token and
        position embeddings and an untied output head, so tied and untied models compare fairly."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward and backward, PaLM appendix B): 6 per weight used in a
        matmul (the layers and the head) plus 12 * layers * heads * head_dim * attended length."""
        cfg = self.cfg
        attended = min(seq_len or cfg.context_length, cfg.sliding_window or math.inf)
        matmul_weights = self.n_params(embeddings=False) + self.head.weight.numel()
        return 6 * matmul_weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attended
