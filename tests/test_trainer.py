"""The training loop: outputs, learning, exact resume, Ctrl+C, NaN, safe checkpoints, DDP and FSDP."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

import tools
from config import ModelConfig, TrainConfig
from conftest import ROOT
from modules.model import Model
from toolkit import checkpoint, data, trainer
from toolkit.checkpoint import save_model
from toolkit.hf import LoadError
from toolkit.trainer import TrainError, make_optimizer, train

EXACT_COLUMNS = ["step", "tokens_seen", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm"]


def corpus(n_docs=400, seed=0):
    """Short documents from a tiny grammar: learnable, so losses must fall."""
    rng = np.random.default_rng(seed)
    names, verbs, things = ["Tom", "Lily", "the cat", "a dog"], ["saw", "liked", "found"], ["a ball", "the sun", "milk"]
    return ["".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}. " for _ in range(rng.integers(2, 6)))
            for _ in range(n_docs)]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Runs and token caches go to tmp_path; returns the path of a small text corpus."""
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    source = tmp_path / "stories.txt"
    source.write_text("".join(doc + "\n<|endoftext|>\n" for doc in corpus()))
    return source


def configs(source, **train_overrides):
    model_cfg = ModelConfig.preset("llama3-1m", vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   context_length=32, resid_dropout=0.1)
    values = dict(name="run", data=str(source), tokenizer="bytes", device="cpu", batch_size=4, max_steps=20,
                  warmup_steps=3, lr=3e-3, min_lr=3e-4, log_every=2, eval_every=5, eval_batches=2, save_every=4)
    return model_cfg, TrainConfig(**{**values, **train_overrides})


def run(source, resume=False, overwrite=False, stop_at=None, **overrides):
    model_cfg, train_cfg = configs(source, **overrides)
    return train(model_cfg, train_cfg, resume=resume, overwrite=overwrite, stop_at=stop_at, progress_bar=False)


def log(out):
    return pd.read_csv(out / "log_data.csv")


def test_a_run_writes_its_outputs_and_learns(workspace):
    out = run(workspace, max_steps=40)
    assert sorted(p.name for p in out.iterdir()) == ["log_data.csv", "model.safetensors", "model_config.json",
                                                      "stability.csv", "train_config.json", "training_state.pt"]
    rows = log(out)
    assert list(rows.columns) == trainer.LOG_COLUMNS
    assert rows["step"].tolist() == sorted(set(range(2, 41, 2)) | set(range(5, 41, 5)))
    assert rows["tokens_seen"].tolist() == [4 * 32 * s for s in rows["step"]]
    assert rows["train_loss"].iloc[-1] < rows["train_loss"].iloc[0] - 1.5
    evaluated = rows.dropna(subset=["val_loss"])
    assert evaluated["step"].tolist() == [5, 10, 15, 20, 25, 30, 35, 40]
    assert evaluated["val_loss"].iloc[-1] < evaluated["val_loss"].iloc[0] - 1.0
    # bits per byte: byte tokens carry one byte each, bos/eos none, so bpb is a little above loss / ln 2
    ratio = evaluated["val_bpb"] / (evaluated["val_loss"] / math.log(2))
    assert ((ratio > 1.0) & (ratio < 1.1)).all()
    assert (rows["elapsed_s"].diff().dropna() >= 0).all() and (rows["tokens_per_s"] > 0).all()
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 40

    # The saved model is the trained one: evaluated again (eval mode) it gives the logged validation loss.
    model, tokenizer = tools.load_model("run")
    assert tokenizer.name == "bytes" and not model.training
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) and f.metadata()["step"] == "40"
    val = data.validation_batches(data.TokenData(data.prepare_data(str(workspace), tokenizer, progress=False), "val"),
                                  32, 4, 2 * 4)
    with torch.no_grad():
        losses = [model(**batch)[1].item() * batch["targets"].numel() for batch in val]
    assert sum(losses) / sum(b["targets"].numel() for b in val) == pytest.approx(evaluated["val_loss"].iloc[-1], abs=1e-5)


def test_resume_continues_exactly_as_an_uninterrupted_run(workspace):
    straight = log(run(workspace, name="straight", grad_accum=2))
    run(workspace, name="resumed", grad_accum=2, stop_at=10)
    first_part = log(checkpoint.TRAINED / "resumed")
    assert first_part["step"].max() == 10
    resumed = log(run(workspace, name="resumed", grad_accum=2, resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(workspace, monkeypatch):
    straight = log(run(workspace, name="straight"))
    real_step = trainer.train_step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl+C: the loop finishes this step, saves, stops
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    out = run(workspace, name="interrupted")
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 7
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = log(run(workspace, name="interrupted", resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    real_step = trainer.train_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real_step(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 11 else loss), grad_norm

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(TrainError, match=r"the loss became nan by step 12: stopped.*--resume") as error:
        run(workspace)
    assert "\n" not in str(error.value)
    out = checkpoint.TRAINED / "run"
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 8  # saved every 4 steps
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "8" and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_an_existing_run_is_never_overwritten_silently(workspace):
    run(workspace, max_steps=4)
    with pytest.raises(TrainError, match="already exists: pass --resume to continue it or --overwrite"):
        run(workspace, max_steps=4)
    rows = log(run(workspace, max_steps=6, overwrite=True))
    assert rows["step"].max() == 6
    with pytest.raises(TrainError, match="nothing to resume"):
        run(workspace, name="never-started", resume=True)


def test_damaged_checkpoints_give_one_line_errors(workspace):
    out = run(workspace, max_steps=4)
    state = (out / "training_state.pt").read_bytes()
    (out / "training_state.pt").write_bytes(state[:len(state) // 2])
    with pytest.raises(TrainError, match="training_state.pt cannot be read"):
        run(workspace, max_steps=8, resume=True)
    (out / "training_state.pt").write_bytes(state)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:1000])
    for attempt in (lambda: tools.load_model("run"), lambda: run(workspace, max_steps=8, resume=True)):
        with pytest.raises(LoadError, match="model.safetensors cannot be read") as error:
            attempt()
        assert "\n" not in str(error.value)
    (out / "model_config.json").write_text("{ not json")
    with pytest.raises(LoadError, match="model_config.json cannot be read"):
        tools.load_model("run")


def test_weights_mismatched_with_the_training_state_are_refused(workspace):
    out = run(workspace, max_steps=8)
    model, _ = tools.load_model("run")
    save_model(model, out, metadata={"step": "4"})  # as if the last save stopped half way
    with pytest.raises(TrainError, match="differ, the last save was interrupted"):
        run(workspace, max_steps=12, resume=True)


def test_weights_are_saved_without_compile_or_ddp_prefixes(tmp_path):
    model = Model(ModelConfig.preset("gpt2-1m", dim=32, n_layers=1, vocab_size=50, context_length=8))
    for wrapped in (torch.compile(model), torch.nn.Module()):
        if not hasattr(wrapped, "_orig_mod"):
            wrapped.module = model  # DDP keeps the model as .module
        save_model(wrapped, tmp_path)
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(model.state_dict()) - {"head.weight"}  # tied: stored once


def test_compile_failure_falls_back_to_eager_with_a_warning(workspace, monkeypatch):
    class BrokenCompile(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor could not find a C++ compiler")

    eager = log(run(workspace, name="eager", max_steps=6))
    monkeypatch.setattr(torch, "compile", BrokenCompile)
    with pytest.warns(UserWarning, match="torch.compile failed .RuntimeError: inductor"):
        compiled = log(run(workspace, name="compiled", max_steps=6, compile=True))
    assert np.allclose(eager[EXACT_COLUMNS].to_numpy(float), compiled[EXACT_COLUMNS].to_numpy(float), equal_nan=True)


def test_weight_decay_only_on_matrices():
    for preset in ("gpt2-1m", "llama3-1m"):
        model = Model(ModelConfig.preset(preset, dim=32, n_layers=2, vocab_size=50, context_length=8))
        decayed, plain = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        decayed_names = sorted(names[id(p)] for p in decayed["params"])
        assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
        assert all(n.endswith("weight") and ("attention." in n or "mlp." in n or n == "head.weight") for n in decayed_names)
        assert ("head.weight" in decayed_names) == (preset == "llama3-1m")  # a tied head is the embedding
        assert not any("norm" in names[id(p)] or "embed" in names[id(p)] for p in decayed["params"])
        assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_document_masking_trains(workspace):
    rows = log(run(workspace, doc_masking=True, max_steps=16))
    assert rows["train_loss"].iloc[-1] < rows["train_loss"].iloc[0] - 1.0


def test_tensorboard_logs_or_a_clear_message(workspace):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(TrainError, match="pip install tensorboard"):
            run(workspace, max_steps=2, tensorboard=True)
        return
    out = run(workspace, max_steps=2, tensorboard=True)
    assert list((out / "tensorboard").glob("events.*"))


def test_vocab_smaller_than_the_tokenizer_is_refused(workspace):
    model_cfg, train_cfg = configs(workspace, tokenizer="tinystories-2048")
    with pytest.raises(TrainError, match="vocab_size=259 is smaller than tokenizer tinystories-2048's 2048"):
        train(model_cfg, train_cfg, progress_bar=False)


def torchrun(workspace, tmp_path, name, nproc, *extra):
    settings = ["--data", str(workspace), "--tokenizer=bytes", "--preset=llama3-1m", "--dim=32", "--n_layers=2",
                "--context_length=32", "--max_steps=6", "--log_every=1", "--eval_every=3", "--eval_batches=2",
                "--warmup_steps=2", "--device=cpu"]
    args = [f"--name={name}", *extra] + ([] if "--resume" in extra else settings)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py", *args]
    env = {**os.environ, "TRAINED_DIR": str(tmp_path / "trained"), "DATA_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return pd.read_csv(tmp_path / "trained" / name / "log_data.csv")


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(workspace, tmp_path, sharding):
    one = torchrun(workspace, tmp_path, "one", 1, "--batch_size=8")
    two_processes = ["--batch_size=4", f"--fsdp={sharding == 'fsdp'}"]
    if sharding == "fsdp":  # and through a stop and a resume, which gather and scatter the sharded state
        torchrun(workspace, tmp_path, "two", 2, *two_processes, "--stop_at=4")
        two_processes = ["--resume"]
    two = torchrun(workspace, tmp_path, "two", 2, *two_processes)
    assert np.allclose(one[EXACT_COLUMNS].to_numpy(float), two[EXACT_COLUMNS].to_numpy(float), atol=1e-5, equal_nan=True)
    assert two["tokens_seen"].iloc[-1] == 6 * 8 * 32
    assert sorted(p.name for p in (tmp_path / "trained" / "two").iterdir()) == [
        "command.txt", "log_data.csv", "model.safetensors", "model_config.json", "stability.csv", "train_config.json",
        "training_state.pt"]


def test_real_text_tiny_shakespeare_learns(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    rows = log(run(shared_data / "tinyshakespeare" / "input.txt", max_steps=60, eval_every=30, batch_size=8))
    assert rows["val_loss"].dropna().iloc[-1] < 3.5  # far below ln(259) = 5.56, the loss of knowing nothing
