"""Evaluation maths by hand, fairness across tokenizers, and the comparison's files."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import model_comparison
from config import ModelConfig
from modules.model import IGNORE_INDEX, Model
from toolkit import checkpoint, data
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
    first_scored = [next(i for i, t in enumerate(row.tolist()) if t != IGNORE_INDEX) for b in batches for row in b["targets"]]
    assert first_scored[0] == 0 and all(p >= 3 for p in first_scored[1:-1])


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


def test_the_command_line_writes_the_files_it_promises(tmp_path, monkeypatch):
    from toolkit.trainer import train
    from config import TrainConfig
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"Tom saw {k} cats and a dog.\n<|endoftext|>\n" for k in range(300)))
    for name, preset, tokenizer, vocab in (("small_gpt2", "gpt2-1m", "bytes", 259),
                                           ("small_llama", "llama3-1m", "tinystories-512", 512)):
        model_cfg = ModelConfig.preset(preset, vocab_size=vocab, dim=32, n_layers=1, context_length=32)
        train(model_cfg, TrainConfig(name=name, data=str(corpus), tokenizer=tokenizer, device="cpu", batch_size=4,
                                     max_steps=6, eval_every=3, eval_batches=1, log_every=2), progress_bar=False)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("Tom saw a dog.\n<|endoftext|>\nA cat ran.\n<|endoftext|>\n")
    out = tmp_path / "report"
    model_comparison.main(["small_gpt2", "small_llama", f"--data={heldout}", f"--out={out}", "--max_len=5",
                           "--prompts", "Tom saw"])
    assert sorted(p.name for p in out.iterdir()) == ["bits_per_byte.png", "comparison.csv", "comparison.md",
                                                     "loss_vs_step.png", "loss_vs_time.png", "loss_vs_tokens.png"]
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in
               ("bits_per_byte.png", "loss_vs_step.png", "loss_vs_time.png", "loss_vs_tokens.png"))
    table = pd.read_csv(out / "comparison.csv")
    assert table["model"].tolist() == ["small_gpt2", "small_llama"]
    assert table["tokens_trained"].tolist() == [6 * 4 * 32] * 2 and (table["text_bytes"] == 24).all()
    assert table["tokenizer"].tolist() == ["bytes", "tinystories-512"]
    report = (out / "comparison.md").read_text()
    assert "| model | params |" in report and "### 'Tom saw'" in report and "- **small_llama**: Tom saw" in report


def test_unknown_models_and_missing_text_are_one_line_errors(tmp_path):
    (tmp_path / "text.txt").write_text("A story.\n")
    for argv, message in [(["NoSuchModel", f"--data={tmp_path}/missing.txt"], "error: no data at"),
                          (["NoSuchModel", f"--data={tmp_path}/text.txt"], "error: no model 'NoSuchModel'")]:
        with pytest.raises(SystemExit) as exit_info:
            model_comparison.main(argv)
        assert str(exit_info.value.code).startswith(message) and "\n" not in str(exit_info.value.code)
