"""The generation function: cached logits equal the uncached model's at every step for every attention
variant, past the context too (a sliding window), batching changes nothing, each sequence stops at
its own EOS, seeds reproduce, bad requests are one-line errors."""
import re

import pytest
import torch

from config import ConfigError, ModelConfig
from modules.model import Model
from toolkit.generate import GenerationError, GenerationSettings, TextStream, generate
from toolkit.sampling import apply_repetition_penalty
from toolkit.tokenizer import load_tokenizer

VARIANTS = {
    "gpt2": dict(preset="gpt2-1m"),
    "llama3": dict(preset="llama3-1m"),  # GQA: 4 heads, 2 key/value heads
    "mha": dict(preset="llama3-1m", n_kv_heads=4),
    "mqa": dict(preset="llama3-1m", n_kv_heads=1),
    "sliding_window": dict(preset="llama3-1m", sliding_window=6),
    "gpt2_sliding_window": dict(preset="gpt2-1m", sliding_window=5),
    "qk_norm+sandwich": dict(preset="llama3-1m", qk_norm=True, norm_placement="sandwich"),
    "no_positions": dict(preset="llama3-1m", positions="none"),
}
PROMPTS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 11, 3], [1, 42, 17], [1, 99, 100, 101, 7, 3, 2]]
GREEDY = GenerationSettings(temp=0, max_len=20)


def make(name, **overrides):
    torch.manual_seed(0)
    values = dict(vocab_size=128, context_length=48, dim=32, n_layers=2, n_heads=4)
    spec = {**VARIANTS[name], **overrides}
    return Model(ModelConfig.preset(spec.pop("preset"), **{**values, **spec})).eval()


def step_logits(model, prompts, settings=GREEDY, **kwargs):
    """(new ids, [(B, vocab) logits of each step]) of one generate call."""
    seen = []
    new_ids = generate(model, prompts, settings, on_step=lambda step: seen.append(step.logits.clone()), **kwargs)
    return new_ids, seen


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_uncached_model_at_every_step(name):
    model = make(name)
    for prompts in (PROMPTS[:1], PROMPTS):  # one prompt, and a left-padded batch
        cached_ids, cached = step_logits(model, prompts)
        uncached_ids, uncached = step_logits(model, prompts, use_cache=False)
        assert cached_ids == uncached_ids
        assert max((a - b).abs().max().item() for a, b in zip(cached, uncached)) <= 1e-5
        # And against the plain model on each sequence alone: no cache, no padding, no batch.
        for row, (prompt, new) in enumerate(zip(prompts, cached_ids)):
            full = model(torch.tensor([prompt + new]))[0][0, len(prompt) - 1:-1]
            batched = torch.stack([logits[row] for logits in cached])
            assert (full - batched).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama3", "sliding_window"])
def test_batched_greedy_equals_each_prompt_alone(name):
    model = make(name)
    for use_cache in (True, False):
        batched = generate(model, PROMPTS, GREEDY, use_cache=use_cache)
        assert batched == [generate(model, [p], GREEDY, use_cache=use_cache)[0] for p in PROMPTS]
        assert [len(ids) for ids in batched] == [20, 20, 20]


def test_each_sequence_stops_at_its_own_eos():
    model = make("llama3")
    free = generate(model, PROMPTS, GREEDY)
    eos = free[1][4]  # the fifth token of the second sequence
    expected = [row[:row.index(eos)] if eos in row else row for row in free]
    steps = []
    stopped = generate(model, PROMPTS, GREEDY, eos_id=eos, on_step=lambda step: steps.append(step))
    assert stopped == expected and len(stopped[1]) <= 4
    # The batch runs until the last sequence stops (or max_len), and stopped sequences repeat EOS.
    assert len(steps) == max(len(row) + 1 if len(row) < 20 else 20 for row in expected)
    last = steps[-1]
    assert all(last.tokens[row] == eos for row, ids in enumerate(expected) if len(ids) < len(steps) - 1)


def test_observer_sees_the_cache_fill():
    model = make("llama3")
    lengths = []
    generate(model, PROMPTS, GREEDY, on_step=lambda step: lengths.append((step.index, step.cache.length)))
    longest = max(map(len, PROMPTS))
    assert lengths == [(i, longest + i) for i in range(20)]  # the prompt, then one slot per fed-back token


def test_same_seed_same_text_and_different_seed_different_text():
    model = make("llama3")
    settings = GenerationSettings(temp=1.0, top_k=50, top_p=0.95, min_p=0.01, max_len=30, seed=7)
    first = generate(model, PROMPTS, settings)
    assert generate(model, PROMPTS, settings) == first
    assert generate(model, PROMPTS, settings, use_cache=False) == first
    assert generate(model, PROMPTS, GenerationSettings(temp=1.0, max_len=30, seed=8)) != first


def test_repetition_penalty_counts_prompt_and_new_tokens():
    model = make("llama3")
    settings = GenerationSettings(temp=0, repetition_penalty=1.5, max_len=15)
    prompt = PROMPTS[0]
    sequence = list(prompt)
    for _ in range(15):  # the penalty written out: every token so far, prompt included
        logits = model(torch.tensor([sequence]))[0][:, -1]
        seen = torch.zeros(1, 128, dtype=torch.bool)
        seen[0, sequence] = True
        sequence.append(apply_repetition_penalty(logits, seen, 1.5).argmax().item())
    assert generate(model, [prompt], settings) == [sequence[len(prompt):]]
    assert generate(model, [prompt], settings) != generate(model, [prompt], GenerationSettings(temp=0, max_len=15))


def windows(prompts, new_ids, steps, context, keep):
    """Each step's window written out: for step s, the real tokens of each sequence in the batch's
    columns start..P+s, where the window restarts on the last `keep` columns whenever it would
    exceed the context (and a prompt longer than the context starts with its last context tokens)."""
    P = max(map(len, prompts))
    start, out = max(0, P - context), []
    for step in range(steps):
        length = P + step
        if length - start > context:
            start = length - keep
        out.append([(prompt + new)[max(0, start - (P - len(prompt))):length - (P - len(prompt))]
                    for prompt, new in zip(prompts, new_ids)])
    return out


@pytest.mark.parametrize("name, keep", [("gpt2", None), ("llama3", None), ("no_positions", None),
                                        ("sliding_window", None), ("gpt2", 1), ("llama3", 16)])
def test_past_the_context_every_step_equals_its_window_from_position_zero(name, keep):
    model = make(name, context_length=16)
    settings = GenerationSettings(temp=0, max_len=30)
    long_prompt = list(range(1, 21))  # 20 tokens: more than the context
    for prompts in (PROMPTS[:1], PROMPTS[:2], [long_prompt], [long_prompt, PROMPTS[1]]):
        cached_ids, cached = step_logits(model, prompts, settings, keep=keep)
        uncached_ids, uncached = step_logits(model, prompts, settings, keep=keep, use_cache=False)
        assert cached_ids == uncached_ids and list(map(len, cached_ids)) == [30] * len(prompts)
        steps = windows(prompts, cached_ids, 30, context=16, keep=keep or 8)
        assert max(len(window) for rows in steps for window in rows) <= 16
        assert len(steps[-1][0]) < len(prompts[0]) + 29  # the last steps saw only part of the text
        for step, rows in enumerate(steps):
            for row, window in enumerate(rows):
                alone = model(torch.tensor([window]))[0][0, -1]  # no cache, no padding, positions from 0
                assert (alone - cached[step][row]).abs().max().item() <= 1e-5
                assert (alone - uncached[step][row]).abs().max().item() <= 1e-5


def test_the_cache_restarts_on_the_last_tokens_when_full():
    model = make("gpt2", context_length=16)
    lengths = []
    generate(model, PROMPTS[:1], GenerationSettings(temp=0, max_len=30),
             on_step=lambda step: lengths.append(step.cache.length))
    # An 11-token prompt fills to 16, then each restart keeps 8 (half the context) and fills again.
    assert lengths == list(range(11, 17)) + list(range(8, 17)) + list(range(8, 17)) + list(range(8, 14))
    lengths.clear()
    generate(model, [list(range(1, 21))], GenerationSettings(temp=0, max_len=4), keep=15,
             on_step=lambda step: lengths.append(step.cache.length))
    assert lengths == [16, 15, 16, 15]  # a long prompt starts with its last 16 tokens


def test_bad_requests_are_clear_errors_before_generating():
    model = make("llama3")  # context_length 48
    calls = []
    for prompts, keep, message in (([[1, 128]], None, "outside the model's vocabulary"), ([[1], []], None, "bos=True"),
                                   ([], None, "no prompts"), (PROMPTS, 0, "keep=0 is not valid"),
                                   (PROMPTS, 49, "between 1 and the model's context_length=48")):
        with pytest.raises(GenerationError, match=message):
            generate(model, prompts, GenerationSettings(max_len=60), keep=keep, on_step=calls.append)
    assert calls == []


def test_restores_training_mode_and_records_no_gradients():
    model = make("llama3").train()
    steps = []
    generate(model, PROMPTS, GenerationSettings(max_len=3), on_step=steps.append)
    assert model.training and not steps[0].logits.requires_grad


def test_settings_are_checked_at_construction():
    bad = {"temp": (-1.0, ">= 0"), "top_k": (0, ">= 1"), "top_p": (1.5, "(0, 1]"), "min_p": (1.0, "[0, 1)"),
           "repetition_penalty": (0.0, "> 0"), "max_len": (0, ">= 1"), "seed": (1.5, "expected")}
    for name, (value, allowed) in bad.items():
        with pytest.raises(ConfigError, match=rf"^{name}={value} is not valid: .*{re.escape(allowed)}"):
            GenerationSettings(**{name: value})
    assert GenerationSettings(temp=0, top_k=None, top_p=1, min_p=0).sampling() == dict(
        temp=0.0, top_k=None, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def test_text_stream_never_splits_a_character():
    tokenizer = load_tokenizer("bytes")
    text = "né à 1 € 😀!"
    stream = TextStream(tokenizer, tokenizer.encode("Q: ", bos=True))
    pieces = [stream.add([byte]) for byte in text.encode()] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") == len(text.encode()) - len(text) + 1  # one empty piece per continuation byte, and finish
    # Bytes that never form a character come out (as U+FFFD) at the end.
    stream = TextStream(tokenizer)
    assert stream.add([0xE2, 0x82]) == "" and stream.finish() == "\ufffd"
