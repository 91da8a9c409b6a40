"""The KV cache: every layer's keys and values, preallocated, and one protocol per forward step.

    step = cache.begin(T, padding_mask)     # the slots and positions of the T new tokens
    k, v = cache.write(layer_index, k, v)   # each layer, once: its keys and values of every filled slot
    cache.end()                             # the new slots count as filled

Only `end` changes what the cache holds, so a forward that fails half-way leaves it as it was. Each
attention module makes its own layer entry (`make_cache`), so a variant can bring its own layout.
"""
from typing import NamedTuple

import torch

from modules.context import padded_positions


class LayerKV:
    """One layer's keys (B, key_heads, max_len, key_dim) and values (B, value_heads, max_len, value_dim),
    written left to right, the same slots for the whole batch."""

    def __init__(self, batch_size: int, max_len: int, key_shape: tuple, value_shape: tuple, dtype, device):
        self.keys = torch.zeros(batch_size, key_shape[0], max_len, key_shape[1], dtype=dtype, device=device)
        self.values = torch.zeros(batch_size, value_shape[0], max_len, value_shape[1], dtype=dtype, device=device)

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write the step's keys and values at slot `start`; return every slot up to the step's last."""
        end = start + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class CacheStep(NamedTuple):
    """The slots and positions of one step's new tokens (see KVCache.begin)."""
    start: int  # slot of the first new token
    length: int  # new tokens
    positions: int | torch.Tensor  # an int when the whole batch shares them, else (B, length)
    key_valid: torch.Tensor | None  # (B, start + length), False at padding slots; None when there is none
    next_position: torch.Tensor  # (B,) each sequence's next position after this step
    padded: bool  # whether any slot up to this step holds padding


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of up to `max_len` slots.

    Prompts of different lengths are left-padded: `key_valid` marks the slots that hold real tokens and
    `next_position` counts each sequence's real tokens, which is its next token's position.
    """

    def __init__(self, layers: list, batch_size: int, max_len: int, device=None):
        self.layers = layers  # one entry per layer, each made by that layer's attention
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False
        self.step: CacheStep | None = None
        self._length = 0

    @property
    def length(self) -> int:
        """Slots filled."""
        return self._length

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]

    def begin(self, length: int, padding_mask: torch.Tensor | None = None) -> CacheStep:
        """Open a step of `length` new tokens (padding_mask: (B, length), False at padding)."""
        start = self._length
        if start + length > self.max_len:
            raise ValueError(f"{start + length} tokens exceed the cache's max_len={self.max_len}: make a larger cache")
        self.key_valid[:, start:start + length] = True if padding_mask is None else padding_mask
        padded = self.padded or (padding_mask is not None and not bool(padding_mask.all()))
        if padded:
            valid = self.key_valid[:, start:start + length]
            positions = padded_positions(valid, self.next_position)
            next_position = self.next_position + valid.sum(1)
            key_valid = self.key_valid[:, :start + length]
        else:  # every slot holds a token, so positions are slots
            positions, next_position, key_valid = start, self.next_position + length, None
        self.step = CacheStep(start, length, positions, key_valid, next_position, padded)
        return self.step

    def write(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        """Store a layer's keys and values of this step; return its keys and values of every slot so far."""
        return self.layers[layer_index].write(k, v, self.step.start)

    def end(self):
        """Close the step: its slots are filled."""
        step, self.step = self.step, None
        self._length = step.start + step.length
        self.next_position, self.padded = step.next_position, step.padded

    def __repr__(self):
        return f"KVCache(length={self.length}, max_len={self.max_len}, batch={self.key_valid.shape[0]})"
