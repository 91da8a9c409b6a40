"""Evaluation maths by hand, sliding windows down to a context of one token, fairness across tokenizers."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import model_comparison
from config import ModelConfig
from modules.model import IGNORE_INDEX, Model
from toolkit.metrics import score, text_batches, token_byte_lengths
from toolkit.tokenizer import load_tokenizer


class RankByIdModel(nn.Module):
    """Logits -id for every position: token 0 is the favourite, then 1, 2, ..."""

    def __init__(self, vocab_size=259, context_length=64):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)

    def forward(self, input_ids, **kwargs):
        logits = -torch.arange(self.cfg.vocab_size, dtype=torch.float32)
        return logits.expand(*input_ids.shape, -1), None


def test_loss_bits_per_byte_and_accuracy_by_hand():
    tokenizer = load_tokenizer("bytes")
    text = "\x00\x01\x02\x05\x09\x0c"  # byte ids 0, 1, 2, 5, 9, 12
    model = RankByIdModel()
    batches = list(text_batches(tokenizer, [text], context_length=64, batch_size=4))
    scores = score(model, batches, token_byte_lengths(tokenizer, 259), "cpu", top_k=(1, 5, 10))
    log_z = math.log(sum(math.exp(-v) for v in range(259)))
    nats = sum(t + log_z for t in (0, 1, 2, 5, 9, 12))  # -log softmax(-v)[t] = t + log Z
    assert scores.tokens == 6 and scores.bytes == 6
    assert scores.loss == pytest.approx(nats / 6, rel=1e-6)
    assert scores.bits_per_byte == pytest.approx(nats / (math.log(2) * 6), rel=1e-6)
    assert (scores.accuracy(1), scores.accuracy(5), scores.accuracy(10)) == (1 / 6, 3 / 6, 5 / 6)


def test_bits_per_byte_counts_bytes_not_tokens():
    """A multi-byte token carries all its bytes; specials carry none."""
    tokenizer = load_tokenizer("tinystories-2048")
    text = "Once upon a time"
    lengths = token_byte_lengths(tokenizer, 2100)
    ids = tokenizer.encode(text)
    assert int(lengths[ids].sum()) == len(text.encode()) and lengths[tokenizer.bos_id] == 0
    assert len(lengths) == 2100 and lengths[2050] == 0


def test_every_token_of_a_long_document_is_scored_once_with_context():
    tokenizer = load_tokenizer("bytes")
    text = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 tokens, context 8: many windows
    batches = list(text_batches(tokenizer, [text, "short"], context_length=8, batch_size=5))
    ids = tokenizer.encode(text, bos=True)
    scored = []
    for batch in batches:
        for inputs, targets in zip(batch["input_ids"], batch["targets"]):
            for position, target in enumerate(targets.tolist()):
                if target != IGNORE_INDEX:
                    scored.append(target)
                    assert inputs[position].item() in ids + tokenizer.encode("short", bos=True)
    assert scored == ids[1:] + tokenizer.encode("short")
    # each scored token after the first window sees at least context - stride = 4 earlier tokens
    first_scored = [next(i for i, t in enumerate(row.tolist()) if t != IGNORE_INDEX)
                    for b in batches for row in b["targets"]]
    assert first_scored[0] == 0 and all(p >= 3 for p in first_scored[1:-1])


@pytest.mark.parametrize("context_length", [1, 2, 5, 16])
def test_tiny_contexts_score_each_token_after_its_window(context_length):
    """Target t (an index into [bos] + tokens) is scored by the window starting at the first multiple
    of the stride s = max(1, C // 2) whose end reaches it: start k s with k = max(0, ceil((t - C) / s)),
    so it is predicted from tokens start..t-1."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("bytes")
    model = Model(ModelConfig.preset("gpt2-1m", vocab_size=259, dim=32, n_layers=1,
                                     context_length=context_length)).eval()
    text = "A fox jumps over the lazy dog, twice."
    ids = tokenizer.encode(text, bos=True)
    stride = max(1, context_length // 2)
    nats = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = max(0, math.ceil((t - context_length) / stride)) * stride
            log_probs = model(torch.tensor([ids[start:t]]))[0][0, -1].log_softmax(-1)
            nats -= log_probs[ids[t]].item()
    result = model_comparison.evaluate_text(model, tokenizer, [text])
    assert result["text_tokens"] == len(ids) - 1 == result["text_bytes"]
    assert result["loss_per_token"] == pytest.approx(nats / (len(ids) - 1), abs=1e-5)


def test_windowed_scoring_equals_one_pass_when_the_text_fits():
    torch.manual_seed(0)
    tokenizer = load_tokenizer("bytes")
    model = Model(ModelConfig.preset("llama3-1m", vocab_size=259, dim=32, n_layers=2, context_length=64)).eval()
    text = "The cat sat on the mat."
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    with torch.no_grad():
        _, direct = model(ids[:, :-1], ids[:, 1:])
    result = model_comparison.evaluate_text(model, tokenizer, [text])
    assert result["loss_per_token"] == pytest.approx(direct.item(), abs=1e-5)


def test_models_with_different_tokenizers_see_the_same_bytes():
    documents = ["Lily found a shiny “stone”.", "Tom ran to the park 🐶.\nHe smiled."]
    results = []
    for spec, vocab in (("bytes", 259), ("tinystories-2048", 2048)):
        tokenizer = load_tokenizer(spec)
        model = Model(ModelConfig.preset("gpt2-1m", vocab_size=vocab, dim=32, n_layers=1, context_length=16))
        results.append(model_comparison.evaluate_text(model, tokenizer, documents))
    assert results[0]["text_bytes"] == results[1]["text_bytes"] == sum(len(d.encode()) for d in documents)
    assert results[0]["text_tokens"] > results[1]["text_tokens"]  # the BPE needs fewer tokens for the same bytes
