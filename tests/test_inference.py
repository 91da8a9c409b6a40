"""inference.py as a user runs it: streaming, batches, --show_tokens, the prompt loop, one-line errors.

The model is built to be predictable: a byte-level model whose layers add nothing, and whose head
maps each byte of TEXT to the next one, so greedy (or any low temperature) generation spells TEXT.
"""
import os
import subprocess
import sys

import pytest
import torch

from config import ConfigError, ModelConfig
from conftest import ROOT
from modules.model import Model
from toolkit.checkpoint import save_model
from toolkit.generate import GenerationSettings
from toolkit.tokenizer import load_tokenizer

TEXT = "Ab€ é!"  # no byte repeats, so each byte has one successor; € and é take 3 and 2 bytes


def spelling_model(folder, successors: list[tuple[int, int]], context_length: int):
    """A byte-level model whose greedy next token after each `current` id is its `following` id."""
    tokenizer = load_tokenizer("bytes")
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("llama3-1m", vocab_size=tokenizer.vocab_size, context_length=context_length,
                                     dim=64, n_layers=1, n_heads=2))
    with torch.no_grad():
        for layer in model.layers:  # the residual stream stays the token's embedding
            layer.attention.out.weight.zero_()
            layer.mlp.down.weight.zero_()
        model.head.weight.zero_()
        for current, following in successors:
            embedding = model.embed.weight[current]
            model.head.weight[following] = 50 * embedding / embedding.norm()
    return save_model(model, folder, train_config={"tokenizer": "bytes"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ids = load_tokenizer("bytes").encode(TEXT, bos=True, eos=True)
    return spelling_model(tmp_path_factory.mktemp("models") / "spell", list(zip(ids, ids[1:])), context_length=128)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """Context 16, and TEXT spelled in a loop without EOS: generation must go past the context."""
    ids = load_tokenizer("bytes").encode(TEXT, bos=True)
    return spelling_model(tmp_path_factory.mktemp("models") / "loop", list(zip(ids, ids[1:] + [ids[1]])),
                          context_length=16)


def run(*args, stdin=None):
    """inference.py in a shell."""
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], input=stdin, cwd=ROOT,
                          capture_output=True, encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                          timeout=120)


def run_here(capsys, *args):
    """inference.py's main in this process (no torch start-up): (stdout, stderr)."""
    import inference
    inference.main(list(map(str, args)))
    return capsys.readouterr()


def test_one_prompt_streams_the_text_and_stops_at_eos(checkpoint, capsys):
    out = run(checkpoint, "A", "--temp=0", "--max_len=20")
    assert out.returncode == 0, out.stderr
    assert out.stdout == TEXT + "\n"
    assert "[8 new tokens in" in out.stderr  # 8 bytes; the EOS that stopped it is not counted
    sampled, _ = run_here(capsys, checkpoint, "Ab", "--temp=0.5", "--top_k=None", "--top_p=None", "--min_p=None",
                          "--seed=1", "--max_len=20", "--no_cache")
    assert sampled == TEXT + "\n"


def test_streaming_prints_each_character_once_it_is_complete(checkpoint, monkeypatch):
    import inference

    class Terminal:  # records every write, as a terminal would show them one after another
        writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Terminal())
    inference.main([str(checkpoint), "A", "--temp=0"])
    # The prompt, then each character as soon as its last byte is generated, never a part of one.
    assert [text for text in Terminal.writes if text] == ["A", "b", "€", " ", "é", "!", "\n"]


def test_several_prompts_are_one_batch(checkpoint, capsys):
    out, _ = run_here(capsys, checkpoint, "A", "Ab€", "--temp=0", "--max_len=3")
    assert out == "=== 1 ===\nAb\ufffd\n=== 2 ===\nAb€ é\n"  # 3 bytes each; "Ab" then half a €


def test_show_tokens_displays_boundaries_and_ids(checkpoint, capsys):
    out, _ = run_here(capsys, checkpoint, "Ab", "--temp=0", "--show_tokens")
    assert out.startswith(TEXT + "\n")
    assert "bytes: 9 tokens, 9 bytes" in out
    assert "226 130 172" in out  # the three byte ids of €, shown as one segment


def test_prompt_loop_changes_settings_between_prompts(checkpoint):
    commands = "/temp 0\n/max_len 2\nA\n/top_p 2\n/max_len 20\n/tmp 1\n/settings\nAb\n/quit\nnever read\n"
    out = run(checkpoint, stdin=commands)
    assert out.returncode == 0, out.stderr
    assert "temp=0.0" in out.stdout and "max_len=2" in out.stdout
    assert "> Ab\ufffd\n" in out.stdout  # max_len 2: "b" and the first byte of "€", held back, shown at the end
    assert "top_p=2.0 is not valid: must be None or in (0, 1]" in out.stderr
    assert "unknown setting 'tmp' (did you mean temp?)" in out.stderr
    assert "temp=0.0 top_k=None top_p=None min_p=0.05 repetition_penalty=1.0 max_len=20 seed=None" in out.stdout
    assert f"> {TEXT}\n" in out.stdout
    assert "never read" not in out.stdout
    # End of input ends the loop as /quit does; an error is one line, not the end of the loop.
    out = run(checkpoint, "--interactive", stdin="/temp 0\n/max_len 3\n/seed x\nA\n")
    assert out.returncode == 0, out.stderr
    assert "error: /seed 'x' is not valid: expected an integer\n" in out.stderr
    assert "> Ab\ufffd\n" in out.stdout


@pytest.mark.parametrize("option, message", [
    ("--top_p=1.5", "error: top_p=1.5 is not valid: must be None or in (0, 1]"),
    ("--temp=abc", "error: --temp='abc' is not valid: expected a number"),
    ("--top_k=0", "error: top_k=0 is not valid: must be None or >= 1"),
    ("--top_k=2.5", "error: --top_k='2.5' is not valid: expected an integer"),
    ("--min_p=-0.1", "error: min_p=-0.1 is not valid: must be None or in [0, 1)"),
    ("--max_len=0", "error: max_len=0 is not valid: must be >= 1"),
    ("--tmp=1", "error: unknown setting --tmp (did you mean temp?); see python inference.py --help"),
    ("--max-len=5", "error: unknown setting --max-len (did you mean max_len?); see python inference.py --help"),
    ("--nocache", "error: unknown setting --nocache (did you mean no_cache?); see python inference.py --help"),
    ("--show_token", "error: unknown setting --show_token (did you mean show_tokens?); see python inference.py --help"),
    ("--tem", "error: unknown setting --tem (did you mean temp?); see python inference.py --help"),
    ("--device=gpu0", "error: --device='gpu0' is not a device: use cpu, cuda, cuda:N or mps"),
])
def test_bad_values_are_one_line_naming_the_option(checkpoint, capsys, option, message):
    import inference
    with pytest.raises(SystemExit) as exit:
        inference.main([str(checkpoint), "A", option])
    assert exit.value.code == 2
    assert capsys.readouterr() == ("", message + "\n")


def test_no_model_is_one_line(capsys):
    import inference
    with pytest.raises(SystemExit) as exit:
        inference.main([])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("error: name a model: a trained/ name")


def test_options_and_commands_share_one_parser():
    from inference import updated
    settings = updated(GenerationSettings(), {"temp": "0", "top_k": "None", "top_p": "0.9", "max_len": "50",
                                              "seed": "3"})
    assert settings == GenerationSettings(temp=0.0, top_k=None, top_p=0.9, max_len=50, seed=3)
    assert updated(settings, {"top_k": "40", "min_p": "none"}) == GenerationSettings(
        temp=0.0, top_k=40, top_p=0.9, min_p=None, max_len=50, seed=3)
    with pytest.raises(ConfigError, match="^unknown setting 'tmp' .did you mean temp..; settings: temp, top_k"):
        updated(settings, {"tmp": "1"})
    with pytest.raises(ConfigError, match="temp='None' is not valid: expected a number$"):
        updated(settings, {"temp": "None"})


def test_errors_in_the_shell_are_one_line_and_a_failure_status(checkpoint):
    out = run(checkpoint, "A", "--top_p=1.5")
    assert (out.returncode, out.stdout, out.stderr) == (2, "",
                                                        "error: top_p=1.5 is not valid: must be None or in (0, 1]\n")
    out = run("no-such-model", "A")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: no model 'no-such-model'") and out.stderr.count("\n") == 1
    out = run(checkpoint, "A", "--tmp=1")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "error: unknown setting --tmp (did you mean temp?); see python inference.py --help\n"


def test_generation_goes_past_the_context(short_context, capsys):
    loop = TEXT[1:] + TEXT[0]  # after "A" the model spells TEXT's bytes in a loop
    cached, _ = run_here(capsys, short_context, "A", "--temp=0", "--max_len=40")  # context 16: slides 3 times
    uncached, err = run_here(capsys, short_context, "A", "--temp=0", "--max_len=40", "--no_cache")
    expected = "A" + (loop * 10).encode()[:40].decode(errors="replace") + "\n"
    assert cached == uncached == expected and "[40 new tokens in" in err
    # A prompt longer than the context: the model sees its last 16 tokens, and says so.
    out = run(short_context, TEXT * 4, "--temp=0", "--max_len=20")
    assert out.returncode == 0, out.stderr
    assert out.stdout == TEXT * 4 + TEXT * 2 + "Ab\n"  # "!" is followed by "A": 20 bytes are TEXT twice and "Ab"
    assert ("a prompt of 37 tokens is longer than the model's context_length=16: "
            "the model sees its last 16") in out.stderr
