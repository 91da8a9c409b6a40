"""train.py's command line: every field overridable, one-line errors with suggestions, resume rules."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from config import ConfigError, ModelConfig, TrainConfig
from conftest import ROOT
from toolkit import checkpoint
from toolkit.cli import field_descriptions, route_overrides, shown, split_arguments
from toolkit.trainer import TrainError
from train import configs


def test_overrides_reach_both_configs_with_their_types():
    model_cfg, train_cfg, flags, stop_at = configs(
        ["--name=tiny", "--n_layers=8", "--lr=3e-4", "--device", "cpu", "--model.dim=64", "--train.batch_size=2",
         "--sliding_window=None", "--qk_norm", "--compile=false",
         "--rope_scaling={\"factor\": 8, \"low_freq_factor\": 1,"
         " \"high_freq_factor\": 4, \"original_max_position_embeddings\": 64}", "--stop_at=5", "--overwrite"])
    assert (model_cfg.n_layers, model_cfg.dim, model_cfg.head_dim, model_cfg.qk_norm) == (8, 64, 16, True)
    assert model_cfg.rope_scaling["factor"] == 8 and model_cfg.sliding_window is None
    assert (train_cfg.name, train_cfg.lr, train_cfg.device, train_cfg.batch_size, train_cfg.compile) == \
        ("tiny", 3e-4, "cpu", 2, False)
    assert flags == {"overwrite"} and stop_at == 5
    assert model_cfg.vocab_size == 2048  # follows the default tokenizer, tinystories-sample-2048


def test_presets_and_the_tokenizer_set_the_model():
    model_cfg, train_cfg, _, _ = configs(["--preset=gpt2-1m", "--tokenizer=bytes"])
    assert model_cfg == ModelConfig.preset("gpt2-1m", vocab_size=259)
    model_cfg, _, _, _ = configs(["--tokenizer=bytes", "--vocab_size=320"])  # larger than needed is allowed
    assert model_cfg.vocab_size == 320
    assert configs([])[1] == TrainConfig()


@pytest.mark.parametrize("argv, message", [
    (["--n_layer=8"], "unknown setting --n_layer (did you mean n_layers?)"),
    (["--lrr=1e-3"], "unknown setting --lrr (did you mean lr?)"),
    (["--model.lr=1e-3"], "unknown setting --model.lr"),
    (["--n_layers=eight"], "--n_layers='eight' is not valid: expected an integer"),
    (["--compile=maybe"], "--compile='maybe' is not valid: expected true or false"),
    (["--schedule=linear"], "schedule='linear' is not valid; choose one of: constant, cosine, wsd"),
    (["--n_heads=5"], "n_heads=5 is not valid: must divide dim=128"),
    (["--preset=gpt3"], "unknown preset 'gpt3'"),
    (["--stop_at=soon"], "--stop_at='soon' is not valid"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_settings_fail_at_once_with_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        configs(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bare_flags_and_spaced_values():
    values, flags = split_arguments(["--resume", "--lr", "0.1", "--compile", "--name=x"], ("resume",))
    assert flags == {"resume"} and values == {"lr": "0.1", "compile": "true", "name": "x"}
    assert route_overrides({"train.seed": "3"})[1] == {"seed": 3}


def run_train(tmp_path, *argv):
    env = {**os.environ, "TRAINED_DIR": str(tmp_path / "trained"), "DATA_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_script_errors_are_one_line_without_traceback(tmp_path):
    for argv, message in [(["--n_layer=2"], r"error: unknown setting --n_layer \(did you mean n_layers\?\)"),
                          (["--data=/no/such/file.txt", "--tokenizer=bytes"], "error: no data at '/no/such/file.txt'"),
                          (["--tokenizer=klingon-512"], "error: unknown tokenizer family 'klingon'"),
                          (["--resume", "--name=nothing"],
                           r"error: nothing to resume: \S*trained/nothing holds no run"),
                          (["--stop_at=0"], r"error: stop_at=0 is not valid: must be a positive step number$"),
                          (["--stop_at=-3"], r"error: stop_at=-3 is not valid: must be a positive step number$")]:
        done = run_train(tmp_path, *argv)
        assert done.returncode == 1 and re.match(message, done.stderr.strip()), done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "trained").exists()  # nothing failed half way: no folder to block the next run


def test_script_trains_resumes_and_records_its_command(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"Once upon a time {k}.\n<|endoftext|>\n" for k in range(300)))
    common = ["--name=cli", f"--data={tmp_path / 't.txt'}", "--tokenizer=bytes", "--dim=32", "--n_layers=1",
              "--context_length=16", "--batch_size=2", "--max_steps=6", "--eval_every=3", "--eval_batches=1"]
    done = run_train(tmp_path, *common, "--stop_at=3")
    assert done.returncode == 0, done.stderr
    again = run_train(tmp_path, *common)
    assert again.returncode == 1 and "already exists: pass --resume" in again.stderr
    model_change = run_train(tmp_path, "--name=cli", "--resume", "--dim=64")
    assert model_change.returncode == 1 and "drop the model settings (dim)" in model_change.stderr
    resumed = run_train(tmp_path, "--name=cli", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    commands = (tmp_path / "trained" / "cli" / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[0].endswith("--stop_at=3") and commands[1].endswith("--name=cli --resume")
    assert (tmp_path / "trained" / "cli" / "log_data.csv").read_text().splitlines()[-1].startswith("6,")


def help_lines(*argv) -> dict[str, str]:
    """--help's lines that describe a setting: {'--name=value' or '--option': description}."""
    done = subprocess.run([sys.executable, "train.py", *argv, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line.split(None, 1) for line in done.stdout.splitlines() if line.startswith("  --")]
    assert all(len(parts) == 2 for parts in lines), [parts for parts in lines if len(parts) != 2]
    return dict(lines)


def test_help_lists_the_run_options_and_every_field_with_its_default_and_description():
    lines = help_lines()
    assert {"--preset=NAME", "--resume", "--overwrite", "--stop_at=STEP"} <= set(lines)
    for cls in (ModelConfig, TrainConfig):
        described = field_descriptions(cls)
        for f in dataclasses.fields(cls):
            line = f"--{f.name}={shown(getattr(cls(), f.name))}"
            assert lines[line] == described[f.name] != "", line  # config.py's comment, the one description
    assert lines["--n_kv_heads=2"] == "None or n_heads: MHA; 1: MQA; in between: GQA"
    preset = help_lines("--preset=gpt2-1m", "--dim=64")
    assert {"--positions=learned", "--norm=layernorm", "--tie_embeddings=True", "--dim=64", "--head_dim=16",
            "--name=gpt2-1m"} <= set(preset)
    # The values this command would use: vocab_size from its tokenizer, lr / 10 without float noise.
    assert {"--vocab_size=259", "--lr=0.0003", "--min_lr=3e-05"} <= set(help_lines("--tokenizer=bytes", "--lr=3e-4"))
    assert "--vocab_size=2048" in help_lines("--tokenizer=no-such-tokenizer")  # help still shows


def test_a_preset_without_a_name_trains_into_its_own_folder():
    assert configs(["--preset=gpt2-1m", "--tokenizer=bytes"])[1].name == "gpt2-1m"
    assert configs(["--preset=gpt2-1m", "--tokenizer=bytes", "--name=mine"])[1].name == "mine"
    assert configs(["--tokenizer=bytes"])[1].name == TrainConfig().name


def test_resume_and_the_existing_run_message_agree_on_a_folder_without_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_config.json").write_text(ModelConfig().to_json())  # killed before its first save
    (tmp_path / "half" / "train_config.json").write_text(TrainConfig(name="half").to_json())
    with pytest.raises(TrainError, match=r"^nothing to resume: \S+half holds files but no checkpoint to resume from "
                                         r"\(training_state.pt\): pass --overwrite to start again"):
        configs(["--name=half", "--resume"])
