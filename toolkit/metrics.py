"""The one way to evaluate: loss per token, bits per byte and top-k accuracy over batches whose
targets mark what to score (IGNORE_INDEX elsewhere). Used by training's validation and by the
model comparison, which scores a whole raw text with each model's own tokenizer.

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the scored tokens): unlike loss per token it
does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modules.model import IGNORE_INDEX


@dataclass
class Scores:
    nats: float = 0.0  # total negative log-likelihood of the scored tokens
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes those tokens stand for
    hits: dict = field(default_factory=dict)  # k -> tokens whose target was among the top k predictions

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)

    def accuracy(self, k: int) -> float:
        return self.hits[k] / self.tokens


def autocast(device):
    """The precision models run in: bf16 autocast on CUDA, float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each id stands for (0 for specials and for ids beyond the tokenizer)."""
    lengths = [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths + [0] * (vocab_size - tokenizer.vocab_size))


@torch.no_grad()
def score(model, batches, byte_lengths: torch.Tensor, device, top_k: tuple[int, ...] = ()) -> Scores:
    """Scores of `model` (in eval mode: no dropout) on batches of input_ids/targets (+ doc_ids)."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.long, device=device)
    hits = {k: torch.zeros((), dtype=torch.long, device=device) for k in top_k}
    byte_lengths = byte_lengths.to(device)
    scores = Scores()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch.pop("targets")
        with autocast(device):
            logits, _ = model(**batch)
        scored = targets != IGNORE_INDEX
        logits, targets = logits[scored].float(), targets[scored]
        nats += F.cross_entropy(logits, targets, reduction="sum").double()
        if top_k:
            ranked = logits.topk(max(top_k), dim=-1).indices == targets[:, None]
            for k in top_k:
                hits[k] += ranked[:, :k].any(-1).sum()
        scores.tokens += len(targets)
        n_bytes += byte_lengths[targets].sum()
    model.train(was_training)
    scores.nats, scores.bytes = nats.item(), int(n_bytes)
    scores.hits = {k: int(v) for k, v in hits.items()}
    return scores


def text_batches(tokenizer, documents: list[str], context_length: int, batch_size: int, stride: int | None = None):
    """Batches that score every token of every document exactly once, each given its document from
    the start (after BOS) or, for long documents, at least context_length - stride tokens of it.

    A document is [bos] + its tokens; its windows of context_length start every `stride` tokens
    (default: half the context) and score only the targets the previous window did not. Short
    windows are right-padded with ignored targets, which the causal mask keeps from mattering.
    """
    stride = stride or max(1, context_length // 2)
    windows = []
    for ids in tokenizer.encode(documents, bos=True):
        if len(ids) < 2:  # an empty document: nothing to predict
            continue
        scored_until, start = 0, 0
        while True:
            end = min(start + context_length, len(ids) - 1)
            targets = list(ids[start + 1:end + 1])
            skip = scored_until - start
            targets[:skip] = [IGNORE_INDEX] * skip
            windows.append((ids[start:end], targets))
            scored_until = end
            if end == len(ids) - 1:
                break
            start += stride
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(len(inputs) for inputs, _ in chunk)

        def pad(row, value):
            return row + [value] * (width - len(row))
        yield {"input_ids": torch.tensor([pad(list(inputs), tokenizer.pad_id) for inputs, _ in chunk]),
               "targets": torch.tensor([pad(targets, IGNORE_INDEX) for _, targets in chunk])}
