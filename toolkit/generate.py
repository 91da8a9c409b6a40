"""The one generation function, used by inference.py, the notebooks and the comparison tools, with
its settings and the incremental decoding that streams its text.

    settings = GenerationSettings(temp=0.7, min_p=0.05, max_len=100, seed=0)
    new_ids = generate(model, tokenizer.encode(["Once upon", "The dog"], bos=True), settings,
                       eos_id=tokenizer.eos_id)
    texts = tokenizer.decode(new_ids)
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from config import Settings, require
from modules.attention import KVCache
from toolkit.sampling import sample


class GenerationError(ValueError):
    """A request that cannot be generated as asked (no prompt, ids outside the vocabulary); the
    message is one line that says what to change."""


@dataclass
class GenerationSettings(Settings):
    """How to pick tokens and how many. Samplers are applied in the order of toolkit/sampling.py;
    None switches one off. The same names are inference.py's options and its prompt commands."""
    temp: float = 0.7  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = 0.05
    repetition_penalty: float = 1.0  # 1: off
    max_len: int = 100  # new tokens per prompt, at most
    seed: int | None = None  # None: torch's global random state

    def __post_init__(self):
        self.check_types()
        require(self.temp >= 0, "temp", self.temp, "must be >= 0 (0 means greedy)")
        require(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "must be None or >= 1")
        require(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be None or in (0, 1]")
        require(self.min_p is None or 0 <= self.min_p < 1, "min_p", self.min_p, "must be None or in [0, 1)")
        require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
                "must be > 0 (1 means off, above 1 discourages repeats)")
        require(self.max_len >= 1, "max_len", self.max_len, "must be >= 1")

    def sampling(self) -> dict:
        """The keyword arguments of toolkit.sampling.sample."""
        return dict(temp=self.temp, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty)


class GenerationStep(NamedTuple):
    """What an `on_step` observer of `generate` sees after each new token."""
    index: int  # 0 for the first new token
    tokens: torch.Tensor  # (B,) the new token of each sequence (EOS again for sequences already stopped)
    logits: torch.Tensor  # (B, vocab) the logits they were sampled from, before any sampler
    finished: torch.Tensor  # (B,) bool, sequences that have produced EOS
    cache: KVCache | None  # the current window's KV cache (None with use_cache=False); a new one after each slide


def check_request(cfg, prompts: list[list[int]], keep: int | None):
    if not prompts:
        raise GenerationError("no prompts: give at least one")
    if min(map(len, prompts)) == 0:
        raise GenerationError("a prompt has no tokens: encode prompts with bos=True")
    outside = [i for p in prompts for i in p if not 0 <= i < cfg.vocab_size]
    if outside:
        raise GenerationError(f"token id {outside[0]} is outside the model's vocabulary (vocab_size={cfg.vocab_size}): "
                              f"encode prompts with the model's own tokenizer")
    if keep is not None and not 1 <= keep <= cfg.context_length:
        raise GenerationError(f"keep={keep} is not valid: the tokens kept when the window slides must be between 1 "
                              f"and the model's context_length={cfg.context_length}")


@torch.inference_mode()
def generate(model, prompts: list[list[int]], settings: GenerationSettings | None = None, *,
             eos_id: int | None = None, use_cache: bool = True, keep: int | None = None,
             on_step: Callable[[GenerationStep], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids; lengths may differ), without the prompt
    and without the EOS that stopped it. The prompts are generated together as one left-padded
    batch; each stops at its own EOS (eos_id None: never) or after settings.max_len tokens, and the
    batch stops when all have. use_cache=False recomputes the whole window at every step (for
    comparisons); the logits are the same. `on_step` sees every step (see GenerationStep). Runs in
    eval mode (the model's mode is restored after) under torch.inference_mode.

    Past the context: the model sees a window of at most context_length tokens (a longer prompt
    starts with its last context_length). When a new token would overflow the window, the window
    restarts on the last `keep` tokens (default half the context), recomputed from scratch with
    positions from 0, and grows again. Recomputing is right for every position scheme: cached keys
    carry absolute learned positions, which cannot be shifted. The batch shares one window of
    columns, so a shorter prompt's left padding counts towards it.
    """
    settings = settings or GenerationSettings()
    check_request(model.cfg, prompts, keep)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, settings, eos_id, use_cache, keep or max(1, model.cfg.context_length // 2),
                         on_step)
    finally:
        model.train(was_training)


def left_padded(prompts: list[list[int]], max_len: int, device):
    """One buffer for the whole run: (B, P + max_len) ids, the prompts left-padded (pad id 0) to the
    longest P, then room for the new tokens; and its padding mask (None without padding)."""
    B, P = len(prompts), max(map(len, prompts))
    sequence = torch.zeros(B, P + max_len, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequence[row, P - len(prompt):P] = torch.tensor(prompt)
    padding_mask = None
    if min(map(len, prompts)) < P:
        padding_mask = (torch.arange(P + max_len) >= torch.tensor([P - len(p) for p in prompts])[:, None]).to(device)
    return sequence.to(device), padding_mask


def seen_tokens(prompts: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, vocab) bool: the tokens of each prompt, which the repetition penalty counts."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        seen[row, prompt] = True
    return seen.to(device)


def _generate(model, prompts, settings, eos_id, use_cache, keep, on_step):
    device = model.embed.weight.device
    B, P, max_len = len(prompts), max(map(len, prompts)), settings.max_len
    context = model.cfg.context_length
    sequence, padding_mask = left_padded(prompts, max_len, device)
    padded_until = P - min(map(len, prompts))  # columns before this may hold padding
    seen = seen_tokens(prompts, model.cfg.vocab_size, device) if settings.repetition_penalty != 1.0 else None
    generator = torch.Generator(device).manual_seed(settings.seed) if settings.seed is not None else None
    sampling = settings.sampling()

    def run_window(start, end):
        """Logits after columns start..end computed from scratch, in a new cache if caching."""
        mask = padding_mask[:, start:end] if start < padded_until else None
        new_cache = model.make_cache(B, min(context, P + max_len - start)) if use_cache else None
        # Samplers work in float32 whatever the model's dtype (top-p's cumulative sums need it).
        logits = model(sequence[:, start:end], padding_mask=mask, cache=new_cache, last_logits_only=True)[0]
        return logits[:, -1].float(), new_cache

    start = max(0, P - context)  # the window is columns start..length
    logits, cache = run_window(start, P)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_len):
        next_ids = sample(logits, **sampling, seen=seen, generator=generator)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished, eos_id)
            finished = finished | (next_ids == eos_id)
        sequence[:, P + step] = next_ids
        if on_step is not None:
            on_step(GenerationStep(step, next_ids, logits, finished, cache))
        if step + 1 == max_len or eos_id is not None and bool(finished.all()):
            break
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        length = P + step + 1
        if length - start > context:  # the window is full: restart it on its last `keep` tokens
            start = length - keep
            logits, cache = run_window(start, length)
        elif cache is not None:  # only the new token: the cache holds the rest of the window
            logits = model(sequence[:, length - 1:length], cache=cache)[0][:, -1].float()
        else:
            logits, _ = run_window(start, length)
    rows = sequence[:, P:P + step + 1].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


class TextStream:
    """Text of a growing list of ids, handed out in pieces as they become complete characters: a
    character split across byte tokens waits for its last byte instead of printing as U+FFFD.
    The whole text is decoded each time, so tokenizers that join pieces (spaces) stay exact."""

    def __init__(self, tokenizer, prompt_ids: list[int] = ()):
        """Text starts after the prompt's."""
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.shown = len(tokenizer.decode(self.ids))

    def add(self, ids: list[int]) -> str:
        """The new complete text after appending `ids`."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        # An incomplete UTF-8 character at the end decodes to up to 3 replacement characters.
        complete = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        complete = max(complete, len(text) - 3)
        new, self.shown = text[self.shown:complete], max(self.shown, complete)
        return new

    def finish(self) -> str:
        """Whatever is left, replacement characters included."""
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[self.shown:], len(text)
        return new
