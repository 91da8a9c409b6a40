"""model_comparison.py as a user runs it: short contexts, one failing model among good ones, one-line
errors before any work, and plots whose numbers are the logs' and whose titles name their data."""
import re

import pandas as pd
import pytest
import torch

import model_comparison as mc
import tools
from config import ModelConfig, TrainConfig
from modules.model import Model
from toolkit import checkpoint, data
from toolkit.checkpoint import save_model
from toolkit.trainer import LOG

STORY = "Tom saw a big red dog in the park. The dog ran to Tom and they played all day long. " * 3  # 252 bytes


def log_rows(offset: float) -> pd.DataFrame:
    """A training log as the trainer writes it: every 10 steps, validation every 20."""
    steps = range(10, 101, 10)
    return pd.DataFrame({
        "step": steps, "tokens_seen": [s * 16_384 for s in steps], "elapsed_s": [s * 0.5 for s in steps],
        "lr": 1e-3, "train_loss": [6 - s / 30 + offset for s in steps],
        "val_loss": [6.1 - s / 30 + offset if s % 20 == 0 else None for s in steps],
        "val_bpb": [3.5 - s / 50 + offset if s % 20 == 0 else None for s in steps],
        "grad_norm": 1.0, "tokens_per_s": 30_000.0})


def save(name, preset, tokenizer, vocab_size, context_length, offset=0.0, data_spec="corpus/stories.txt"):
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(preset, vocab_size=vocab_size, dim=32, n_layers=1, context_length=context_length))
    folder = save_model(model, checkpoint.TRAINED / name,
                        train_config={"tokenizer": tokenizer, "data": data_spec, "val_fraction": 0.1})
    log_rows(offset).to_csv(folder / LOG, index=False)
    return model


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A trained/ folder with a byte-level GPT-2 of context 16 and a BPE Llama of context 64."""
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    save("bytes16", "gpt2-1m", "bytes", 259, 16)
    save("bpe64", "llama3-1m", "tinystories-512", 512, 64, offset=-0.5)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(f"{STORY}\n<|endoftext|>\n{STORY[:100]}\n<|endoftext|>\n")
    return tmp_path


def run(argv, capsys):
    """main's exit code (0 when it returns) and its (stdout, stderr)."""
    try:
        mc.main(list(map(str, argv)))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr()


def test_short_contexts_are_scored_in_windows_and_sampled_past_the_context(trained, capsys, monkeypatch):
    out = trained / "report"
    lengths, generate = [], mc.generate
    monkeypatch.setattr(mc, "generate", lambda *args, **kwargs: lengths.append(
        [len(ids) for ids in generate(*args, **{**kwargs, "eos_id": None})]) or generate(*args, **kwargs))
    code, printed = run(["bytes16", "bpe64", f"--data={trained / 'heldout.txt'}", f"--out={out}", "--max_len=80",
                         "--prompts", "Tom saw a big red dog and", "The end"], capsys)
    assert code == 0, printed.err
    table = pd.read_csv(out / "comparison.csv")
    assert table["context_length"].tolist() == [16, 64]
    # Every byte of the text scored exactly once, although documents are 16 times the byte model's context.
    assert (table["text_bytes"] == len(STORY.encode()) + 100).all()
    assert table["text_tokens"].iloc[0] == len(STORY.encode()) + 100
    report = (out / "comparison.md").read_text()
    assert "- **bytes16**: Tom saw a big red dog and" in report and "- **bpe64**: The end" in report
    assert lengths == [[80, 80], [80, 80]]  # prompts of up to 26 tokens + 80 new ones: beyond both contexts


def test_a_failing_model_is_named_and_the_others_are_written(trained, capsys, monkeypatch):
    save("wrong_tokenizer", "gpt2-1m", "tinystories-512", 259, 16)  # 512 token ids, 259 embeddings
    save("breaks", "gpt2-1m", "bytes", 259, 17)
    original = mc.evaluate_text

    def evaluate(model, *args, **kwargs):
        if model.cfg.context_length == 17:
            raise RuntimeError("out of memory\nsecond line")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(mc, "evaluate_text", evaluate)
    out = trained / "report"
    code, printed = run(["bytes16", "NoSuchModel", "wrong_tokenizer", "breaks", "bpe64",
                         f"--data={trained / 'heldout.txt'}", f"--out={out}", "--max_len=5"], capsys)
    assert code == 1
    errors = printed.err.splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert errors[0].startswith("error: NoSuchModel: loading failed: no model 'NoSuchModel'")
    assert errors[1] == ("error: wrong_tokenizer: loading failed: tokenizer tinystories-512 has 512 ids but the "
                         "model's vocab_size is 259: its train_config.json names the wrong tokenizer")
    assert errors[2] == "error: breaks: scoring failed: RuntimeError: out of memory"
    assert pd.read_csv(out / "comparison.csv")["model"].tolist() == ["bytes16", "bpe64"]
    assert "- **bpe64**:" in (out / "comparison.md").read_text() and (out / "bits_per_byte.png").is_file()


@pytest.mark.parametrize("case", ["empty data", "out is under a file", "out is a file", "missing data", "bad max_len"])
def test_bad_inputs_are_one_line_before_any_work(trained, capsys, monkeypatch, case):
    (trained / "empty.txt").write_text("")
    (trained / "a_file").write_text("not a folder")
    argv = {"empty data": [f"--data={trained / 'empty.txt'}", f"--out={trained / 'report'}"],
            "out is under a file": [f"--data={trained / 'heldout.txt'}", f"--out={trained / 'a_file' / 'report'}"],
            "out is a file": [f"--data={trained / 'heldout.txt'}", f"--out={trained / 'a_file'}"],
            "missing data": [f"--data={trained / 'missing.txt'}", f"--out={trained / 'report'}"],
            "bad max_len": [f"--data={trained / 'heldout.txt'}", "--max_len=0"]}[case]
    expected = {"empty data": f"error: --data={trained / 'empty.txt'} holds no text to score: "
                              f"give a file with some text in it",
                "out is under a file": f"error: cannot write to --out={trained / 'a_file' / 'report'} (",
                "out is a file": f"error: cannot write to --out={trained / 'a_file'} (",
                "missing data": "error: no data at",
                "bad max_len": "error: max_len=0 is not valid: must be >= 1"}[case]
    loaded = []
    monkeypatch.setattr(tools, "load_model", lambda *args: loaded.append(args))
    with pytest.raises(SystemExit) as exit_info:
        mc.main(["bytes16", *argv])
    message = str(exit_info.value.code)
    assert message.startswith(expected) and "\n" not in message, message
    assert loaded == []  # nothing was loaded or scored


@pytest.mark.parametrize("option, message", [
    ("--ouput=x", "error: unknown setting --ouput (did you mean out?); see python model_comparison.py --help"),
    ("--dat=x", "error: unknown setting --dat (did you mean data?)"),  # no abbreviation taken silently
    ("--max_len=abc", "error: argument --max_len: invalid int value: 'abc'; see python model_comparison.py --help"),
])
def test_bad_options_are_one_line_with_the_closest_option(capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        mc.main(["bytes16", option])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(message) and error.count("\n") == 1, error


def test_the_command_line_writes_the_files_it_promises(tmp_path, monkeypatch, capsys):
    """Two models really trained (a few steps), compared from their own logs."""
    from toolkit.trainer import train
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
    code, _ = run(["small_gpt2", "small_llama", f"--data={heldout}", f"--out={out}", "--max_len=5",
                   "--prompts", "Tom saw"], capsys)
    assert code == 0
    pictures = ["bits_per_byte.png", "curves_vs_step.png", "curves_vs_time.png", "curves_vs_tokens.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["comparison.csv", "comparison.md", *pictures])
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in pictures)
    table = pd.read_csv(out / "comparison.csv")
    assert table["model"].tolist() == ["small_gpt2", "small_llama"]
    assert table["tokens_trained"].tolist() == [6 * 4 * 32] * 2 and (table["text_bytes"] == 24).all()
    assert table["tokenizer"].tolist() == ["bytes", "tinystories-512"]
    report = (out / "comparison.md").read_text()
    assert "| model | params |" in report and "### 'Tom saw'" in report and "- **small_llama**: Tom saw" in report


# ---------------------------------------------------------------- plots

def test_counts_and_log_ticks_read_as_plain_numbers():
    assert [mc.human_count(v) for v in (0, 950, 40_960, 1e6, 1.6e6, 1_638_400, 2.5e9)] == \
        ["0", "950", "41K", "1M", "1.6M", "1.64M", "2.5B"]
    assert [mc.plain_number(v) for v in (1.5, 2.0, 300.0, 0.25, 2e5)] == ["1.5", "2", "300", "0.25", "200K"]


def labels(axis):
    return [tick.get_text() for tick in axis.get_ticklabels() if tick.get_text()]


@pytest.mark.parametrize("x, column", list(mc.PLOTS.items()))
def test_curves_are_the_logs_validation_bits_per_byte_and_losses(trained, x, column):
    import matplotlib.pyplot as plt
    figure = mc.plot_curves(["bytes16", "bpe64"], column)
    bpb_axes, loss_axes = figure.axes
    for line, (name, offset) in zip(bpb_axes.lines, (("bytes16", 0.0), ("bpe64", -0.5))):
        expected = log_rows(offset).dropna(subset=["val_bpb"])
        assert line.get_label() == name
        assert line.get_xdata().tolist() == expected[column].tolist()
        assert line.get_ydata().tolist() == expected["val_bpb"].tolist() == [3.1 + offset, 2.7 + offset, 2.3 + offset,
                                                                              1.9 + offset, 1.5 + offset]
    train_line = loss_axes.lines[0]  # bytes16 train, then its validation
    assert train_line.get_ydata().tolist() == log_rows(0.0)["train_loss"].tolist()
    assert "validation data: 10% of stories.txt" in figure._suptitle.get_text()
    figure.canvas.draw()
    if column == "tokens_seen":  # 163,840 to 1,638,400 tokens: in K and M
        texts = labels(bpb_axes.xaxis)
        assert all(re.fullmatch(r"0|\d+(\.\d+)?[KM]", text) for text in texts), texts
        assert any(text.endswith("K") for text in texts) and any(text.endswith("M") for text in texts)
    plt.close(figure)


def test_log_axes_have_plain_number_ticks(trained):
    import matplotlib.pyplot as plt
    figure = mc.plot_curves(["bytes16", "bpe64"], "tokens_seen", log_axes=True)
    figure.canvas.draw()
    bpb_axes, loss_axes = figure.axes
    assert bpb_axes.get_yscale() == "log" and bpb_axes.get_xscale() == "log"
    # val_bpb 1.0 to 3.1, losses 2.2 to 5.8, tokens 164K to 1.64M: several plain labels each, no powers of ten.
    assert {"1.2", "1.5", "2", "2.5", "3"} <= set(labels(bpb_axes.yaxis))
    assert {"3", "4", "5"} <= set(labels(loss_axes.yaxis))
    assert {"200K", "500K", "1M"} <= set(labels(bpb_axes.xaxis))
    assert not any("10^" in text or "mathdefault" in text
                   for a in figure.axes for text in labels(a.xaxis) + labels(a.yaxis))
    plt.close(figure)


def test_every_figure_names_its_data(trained):
    import matplotlib.pyplot as plt
    table = pd.DataFrame({"model": ["bytes16", "bpe64"], "bits_per_byte": [2.5, 1.25]})
    figure = mc.plot_bits_per_byte(table, f"{trained}/heldout.txt")
    assert figure.axes[0].get_title() == "bits per byte on heldout.txt"
    assert [bar.get_height() for bar in figure.axes[0].patches] == [2.5, 1.25]
    plt.close(figure)
    save("other_data", "gpt2-1m", "bytes", 259, 16, data_spec="a/tales.txt,b/more.txt")
    figure = mc.plot_curves(["bytes16", "other_data"])
    assert ("validation data differs, curves not comparable: bytes16: 10% of stories.txt; "
            "other_data: 10% of tales.txt, more.txt") in figure._suptitle.get_text().replace("\n", " ")
    plt.close(figure)
