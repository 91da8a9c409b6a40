"""What every layer may need, computed once per forward, and the attention masks built from it.

Model.forward makes one Context (positions, document ids, padding, the cache's slots for this step).
Each attention module asks it for the mask of its own settings (a MaskSpec: sliding window, score
bias); masks are built once per forward and shared by the layers that ask for the same one. Plain
causal attention gets no mask at all, so that SDPA takes its fast `is_causal` path.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class MaskSpec(NamedTuple):
    """The settings of one attention module that its mask depends on."""
    window: int | None = None  # each query sees at most this many keys, itself included
    bias: object = None  # a hashable score bias with dense(distance) and score_mod(device), e.g. ALiBi's


class FlexMask(NamedTuple):
    """A mask in FlexAttention's form: the blocks to compute, and an optional score bias."""
    block_mask: object
    score_mod: object = None


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


def document_block_mask(doc_ids: torch.Tensor, window: int | None = None):
    """The FlexAttention form of causal_mask(T, window=window, doc_ids=doc_ids): a BlockMask that
    lets the kernel skip whole blocks with nothing to attend (other documents, the future)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):
        keep = (k <= q) & (doc_ids[b, q] == doc_ids[b, k])
        return keep & (q - k < window) if window is not None else keep

    B, T = doc_ids.shape
    return create_block_mask(allowed, B, None, T, T, device=doc_ids.device)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where each document begins."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def padded_positions(valid: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """(B, T) positions that count only valid (non-padding) tokens, from `offset` ((B,) or an int)."""
    offset = offset[:, None] if isinstance(offset, torch.Tensor) else offset
    return (offset + valid.long().cumsum(1) - 1).clamp(min=0)


@dataclass(eq=False)
class Context:
    """The state of one forward that layers share. Made by Model.forward; Context.of(x) for a module
    run alone (positions 0.., no cache, no padding)."""
    length: int  # new tokens T
    positions: int | torch.Tensor = 0  # an int: positions from it for the whole batch; else (B, T)
    start: int = 0  # cache slot of the first new token: keys span slots 0..start+length
    doc_ids: torch.Tensor | None = None  # (B, T) document of each token (training)
    key_valid: torch.Tensor | None = None  # (B, start+T), False at padding slots; None: all valid
    cache: object = None  # the KVCache of this step, or None
    flex: bool = False  # masks in FlexAttention's form (CUDA document masking)
    device: torch.device | None = None
    weights: list | None = None  # a list makes the kernel compute softmax weights explicitly and keep them
    memo: dict = field(default_factory=dict)

    def __repr__(self):  # short, for shape logs
        positions = self.positions if isinstance(self.positions, int) else tuple(self.positions.shape)
        extras = [name for name in ("doc_ids", "key_valid", "cache") if getattr(self, name) is not None]
        return f"Context(T={self.length}, positions={positions}, start={self.start}{''.join(', ' + e for e in extras)})"

    @classmethod
    def of(cls, x: torch.Tensor) -> "Context":
        return cls(length=x.shape[1], device=x.device)

    def position_ids(self) -> torch.Tensor:
        """The positions as a tensor: (T,) for the whole batch, or (B, T)."""
        if isinstance(self.positions, int):
            return torch.arange(self.positions, self.positions + self.length, device=self.device)
        return self.positions

    def memoised(self, key, build):
        """build(), once per forward for each key."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def plain_causal(self, spec: MaskSpec) -> bool:
        """Whether SDPA's is_causal (or, for one new query after the cache, no mask) is this mask exactly."""
        if spec.bias is not None or self.doc_ids is not None or self.key_valid is not None:
            return False
        if spec.window is not None and self.start + self.length > spec.window:
            return False
        return self.start == 0 or self.length == 1

    def mask(self, spec: MaskSpec, dtype: torch.dtype):
        """None when plain causal attention is exact, else a FlexMask or a dense mask (see dense_mask)."""
        if self.plain_causal(spec):
            return None
        if self.flex:
            return self.memoised(("flex", spec), lambda: self.flex_mask(spec))
        return self.dense_mask(spec, dtype)

    def dense_mask(self, spec: MaskSpec, dtype: torch.dtype) -> torch.Tensor:
        """(T, S) or (B, 1, T, S) booleans (True = may attend); with a score bias, (B or 1, heads, T, S)
        additive floats (-inf where masked)."""
        key = ("dense", spec, dtype if spec.bias is not None else None)
        return self.memoised(key, lambda: self.build_dense_mask(spec, dtype))

    def build_dense_mask(self, spec, dtype):
        allowed = causal_mask(self.length, self.start, spec.window, self.key_valid, self.doc_ids, self.device)
        if spec.bias is None:
            return allowed
        slots = torch.arange(self.start + self.length, device=self.device, dtype=torch.float32)
        distance = slots[self.start:, None] - slots[None, :]
        return spec.bias.dense(distance).masked_fill(~allowed, -torch.inf).to(dtype)

    def flex_mask(self, spec: MaskSpec) -> FlexMask:
        score_mod = spec.bias.score_mod(self.device) if spec.bias is not None else None
        return FlexMask(document_block_mask(self.doc_ids, spec.window), score_mod)
