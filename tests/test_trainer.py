"""The training loop: outputs, learning, exact resume, Ctrl+C, NaN, safe checkpoints, DDP and FSDP."""
import ast
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

import tools
from config import ConfigError, ModelConfig, TrainConfig
from conftest import ROOT
from modules.model import Model
from toolkit import checkpoint, data, provenance, trainer
from toolkit.checkpoint import save_model
from toolkit.cli import SafeStream
from toolkit.data import DataError
from toolkit.hf import LoadError
from toolkit.optim import make_optimizer
from toolkit.tokenizer import TokenizerError, load_tokenizer
from toolkit.trainer import TrainError, train

EXACT_COLUMNS = ["step", "tokens_seen", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm"]


def corpus(n_docs=400, seed=0):
    """Short documents from a tiny grammar: learnable, so losses must fall."""
    rng = np.random.default_rng(seed)
    names, verbs, things = ["Tom", "Lily", "the cat", "a dog"], ["saw", "liked", "found"], ["a ball", "the sun", "milk"]
    return ["".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}. "
                    for _ in range(rng.integers(2, 6)))
            for _ in range(n_docs)]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Runs and token caches go to tmp_path; returns the path of a small text corpus."""
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(provenance, "CODE_ROOT", tmp_path)  # outside any git checkout: the record says null
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
                                                      "provenance.json", "stability.csv", "train_config.json",
                                                      "training_state.pt"]
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
    assert sum(losses) / sum(b["targets"].numel() for b in val) == pytest.approx(evaluated["val_loss"].iloc[-1],
                                                                                 abs=1e-5)


def test_the_log_has_the_mfu_where_the_device_has_a_known_peak(workspace, monkeypatch, capsys):
    """On a GPU of PEAK_BF16_FLOPS every log row has its MFU: the row's tokens/s x Model.flops_per_token over the
    peak, and the progress bar shows the last row's (a CPU has no peak: here one is given); without a peak the
    column is empty."""
    assert log(run(workspace, max_steps=10, name="no_peak"))["mfu"].isna().all()
    monkeypatch.setattr(trainer, "peak_flops", lambda device: 1e9)
    model_cfg, train_cfg = configs(workspace, max_steps=10, name="peak")
    out = train(model_cfg, train_cfg, progress_bar=True)
    rows = log(out)
    expected = Model(model_cfg).flops_per_token(model_cfg.context_length) * rows["tokens_per_s"] / 1e9
    assert np.allclose(rows["mfu"], expected, rtol=0, atol=5e-5) and (rows["mfu"] > 0).all()
    shown = re.findall(r"mfu=(\d+\.\d)%", capsys.readouterr().err)
    assert shown and float(shown[-1]) == pytest.approx(100 * rows["mfu"].iloc[-1], abs=0.051)


def test_resume_continues_exactly_as_an_uninterrupted_run(workspace):
    straight = log(run(workspace, name="straight", grad_accum=2))
    run(workspace, name="resumed", grad_accum=2, stop_at=10)
    first_part = log(checkpoint.TRAINED / "resumed")
    assert first_part["step"].max() == 10
    resumed = log(run(workspace, name="resumed", grad_accum=2, resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)


def test_shifted_windows_reach_the_loader_and_resume_exactly_across_an_epoch(workspace):
    batch = dict(batch_size=64, max_steps=18, log_every=1, eval_every=9, save_every=6)
    train_data = data.TokenData(data.prepare_data(str(workspace), load_tokenizer("bytes"), progress=False), "train")
    per_epoch = data.Batches(train_data, 32, 64, seed=0, shift_windows=True).batches_per_epoch
    assert 2 <= per_epoch <= 18 - 4  # the run crosses into a second epoch, and is stopped inside it
    fixed = log(run(workspace, name="fixed", shift_windows=False, **batch))
    shifted = log(run(workspace, name="shifted", shift_windows=True, **batch))
    assert not np.allclose(fixed["train_loss"], shifted["train_loss"], rtol=0, atol=1e-3)
    run(workspace, name="resumed", shift_windows=True, stop_at=per_epoch + 3, **batch)
    resumed = log(run(workspace, name="resumed", shift_windows=True, resume=True, **batch))
    assert np.allclose(shifted[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
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
    with pytest.raises(trainer.Interrupted,
                       match=r"^Ctrl\+C \(SIGINT\) at step 7: saved a checkpoint in .*interrupted; "
                             r"continue it with --resume$") as stopped:
        run(workspace, name="interrupted")
    assert stopped.value.exit_code == 130
    out = checkpoint.TRAINED / "interrupted"
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 7
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = log(run(workspace, name="interrupted", resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)


LONG = 10 ** 6  # steps: a run that only a signal ends


def start_script(workspace, name, **popen):
    """train.py on a tiny model, in a process group of its own (as a terminal runs a pipeline)."""
    args = [sys.executable, "train.py", f"--name={name}", f"--data={workspace}", "--tokenizer=bytes", "--dim=32",
            "--n_layers=1", "--context_length=16", "--batch_size=2", f"--max_steps={LONG}", "--log_every=5",
            f"--eval_every={LONG}", "--eval_batches=1", f"--save_every={LONG}", "--device=cpu"]
    env = {**os.environ, "TRAINED_DIR": str(checkpoint.TRAINED), "DATA_CACHE": str(data.CACHE), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, process_group=0, **popen)


def wait_until_training(process, out, timeout=240):
    deadline = time.monotonic() + timeout
    while not ((out / "log_data.csv").is_file() and len((out / "log_data.csv").read_text().splitlines()) > 1):
        assert process.poll() is None and time.monotonic() < deadline, f"no training step (exit {process.poll()})"
        time.sleep(0.05)


def test_signals_save_a_checkpoint_and_exit_with_128_plus_the_signal_even_when_nobody_reads_the_output(workspace):
    data.prepare_data(str(workspace), load_tokenizer("bytes"), progress=False)  # the runs share one token cache
    # Ctrl+C on `python train.py 2>&1 | tee log`: the terminal signals the whole pipeline and tee dies first.
    piped = start_script(workspace, "sigint", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tee = subprocess.Popen(["tee", str(workspace.parent / "tee.log")], stdin=piped.stdout,
                           stdout=subprocess.DEVNULL, process_group=piped.pid)
    piped.stdout.close()
    # SIGTERM and SIGHUP (terminal closed) on runs whose output pipe has no reader from the start.
    runs = {signal.SIGINT: piped}
    for sig, name in ((signal.SIGTERM, "sigterm"), (signal.SIGHUP, "sighup")):
        runs[sig] = start_script(workspace, name, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        runs[sig].stdout.close()
    names = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm", signal.SIGHUP: "sighup"}
    for sig, process in runs.items():
        wait_until_training(process, checkpoint.TRAINED / names[sig])
        if sig == signal.SIGINT:
            tee.send_signal(signal.SIGINT)
            tee.wait(timeout=60)
        os.killpg(process.pid, sig)
    for sig, process in runs.items():
        assert process.wait(timeout=240) == 128 + sig, names[sig]
        out = checkpoint.TRAINED / names[sig]
        state = torch.load(out / "training_state.pt", weights_only=True)
        logged = log(out)["step"]
        assert logged.iloc[-1] <= state["step"] < LONG and state["progress"]["tokens_seen"] == state["step"] * 2 * 16
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.metadata()["step"] == str(state["step"])
        model, _ = checkpoint.load_checkpoint(out)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_closed_output_is_ignored_for_the_rest_of_the_process():
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = SafeStream(open(write_end, "w", buffering=1))
    assert stream.write("lost\n") == 5  # EPIPE: ignored, and the descriptor now points at /dev/null
    stream.flush()
    assert os.write(write_end, b"x") == 1
    closed = SafeStream(io.StringIO())
    closed.stream.close()
    assert closed.write("also lost") == 9 and closed.flush() is None  # ValueError on a closed file: ignored


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch):
    real_step = trainer.train_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real_step(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 11 else loss), grad_norm

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(TrainError, match=r"^the loss became nan by step 12: stopped, keeping the last good checkpoint "
                                         r"\(step 8\) in \S+run; lower --lr or raise --warmup_steps, then --resume$"):
        run(workspace)
    out = checkpoint.TRAINED / "run"
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 8  # saved every 4 steps
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "8" and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def poisoned_step(monkeypatch, from_call, poison):
    """train_step whose (loss, gradient norm) go through `poison` from its from_call-th call on."""
    real_step, calls = trainer.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real_step(*args, **kwargs)
        return poison(loss, grad_norm) if len(calls) >= from_call else (loss, grad_norm)

    monkeypatch.setattr(trainer, "train_step", step)


def test_a_bad_gradient_stops_too_and_resume_is_offered_only_with_a_checkpoint(workspace, monkeypatch):
    with monkeypatch.context() as m:  # an overflowing gradient ruins the update while the loss still looks fine
        poisoned_step(m, 6, lambda loss, grad_norm: (loss, grad_norm * math.inf))
        with pytest.raises(TrainError, match=r"^the gradient norm became inf by step 6: stopped, keeping the last good "
                                             r"checkpoint \(step 4\) in \S+run; .*, then --resume$"):
            run(workspace)
    assert torch.load(checkpoint.TRAINED / "run" / "training_state.pt", weights_only=True)["step"] == 4
    with monkeypatch.context() as m:
        poisoned_step(m, 1, lambda loss, grad_norm: (loss * math.nan, grad_norm))
        with pytest.raises(TrainError) as error:
            run(workspace, name="early")
    assert str(error.value) == ("the loss became nan by step 2, before the first checkpoint: nothing was saved; "
                                "lower --lr or raise --warmup_steps and train again")
    assert not (checkpoint.TRAINED / "early").exists()
    assert log(run(workspace, name="early", max_steps=4))["step"].max() == 4  # the same command runs again


@pytest.mark.parametrize("failure", ["no data", "bad tokenizer", "missing package", "first step"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_that_blocks_a_rerun(workspace, monkeypatch,
                                                                                          failure):
    command = "python train.py --name=run"
    settings = {"no data": {"data": str(workspace.parent / "missing.txt")},
                "bad tokenizer": {"tokenizer": "klingon-512"},
                "missing package": {"tensorboard": True}, "first step": {}}[failure]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
        if failure == "first step":
            m.setattr(trainer, "train_step", out_of_memory)
        with pytest.raises((TrainError, DataError, TokenizerError, RuntimeError)):
            train(*configs(workspace, max_steps=4, **settings), command=command, progress_bar=False)
    assert not (checkpoint.TRAINED / "run").exists()
    out = train(*configs(workspace, max_steps=4), command=command, progress_bar=False)
    assert log(out)["step"].max() == 4 and (out / "command.txt").read_text() == command + "\n"


def test_what_a_folder_holds_decides_the_message_and_a_run_is_replaced_only_when_its_successor_is_ready(workspace):
    out = checkpoint.TRAINED / "run"
    out.mkdir(parents=True)
    (out / "model_config.json").write_text("{}")  # as a run killed before its first checkpoint leaves it
    advice = (r"but no checkpoint to resume from \(training_state.pt\): "
              r"pass --overwrite to start again, or choose another --name$")
    for settings, message in [({}, r"^\S+run holds files " + advice),
                              ({"resume": True}, r"^nothing to resume: \S+run holds files " + advice),
                              ({"resume": True, "overwrite": True},
                               r"^--resume and --overwrite contradict each other")]:
        with pytest.raises(TrainError, match=message):
            run(workspace, **settings)
    (out / "model.safetensors").write_bytes(b"")  # a model without its training state, as the shipped ones
    with pytest.raises(TrainError, match=r"^\S+run holds a model " + advice):
        run(workspace)
    assert log(run(workspace, max_steps=4, overwrite=True))["step"].max() == 4
    with pytest.raises(DataError):
        run(workspace, data=str(workspace.parent / "missing.txt"), overwrite=True)
    assert log(out)["step"].max() == 4 and (out / "training_state.pt").is_file()  # the old run is still there


def test_resuming_a_finished_run_says_so_and_stop_at_must_lie_ahead(workspace):
    run(workspace, max_steps=8)
    with pytest.raises(TrainError, match=r"^\S+run already finished its 8 steps: raise --max_steps to train on$"):
        run(workspace, max_steps=8, resume=True)
    with pytest.raises(TrainError, match=r"^--stop_at=8 is not after step 8, where \S+run stands: pass a later step$"):
        run(workspace, max_steps=12, stop_at=8, resume=True)
    for stop_at in (0, -2):
        with pytest.raises(ConfigError, match=rf"^stop_at={stop_at} is not valid: must be a positive step number$"):
            run(workspace, name="other", stop_at=stop_at)
    assert log(run(workspace, max_steps=12, resume=True))["step"].max() == 12


def test_elapsed_time_counts_training_alone(workspace, monkeypatch, capsys):
    real_score, real_save = trainer.score, trainer.save_checkpoint
    monkeypatch.setattr(trainer, "score", lambda *args: time.sleep(0.3) or real_score(*args))
    monkeypatch.setattr(trainer, "save_checkpoint", lambda *args: time.sleep(0.2) or real_save(*args))
    start = time.perf_counter()
    model_cfg, train_cfg = configs(workspace, max_steps=20)  # evaluates at 5, 10, 15, 20; saves at 4, 8, 12, 16, 20
    rows = log(train(model_cfg, train_cfg))
    wall = time.perf_counter() - start
    evaluated = rows.dropna(subset=["val_loss"])
    assert (evaluated["eval_elapsed_s"].diff().dropna() >= 0.3).all() and evaluated["eval_elapsed_s"].iloc[0] >= 0.3
    last = rows.iloc[-1]
    assert last["save_elapsed_s"] >= 4 * 0.2  # the saves before the last row
    assert last["elapsed_s"] + last["eval_elapsed_s"] + last["save_elapsed_s"] <= wall
    bar = capsys.readouterr().err
    assert "run (evaluating)" in bar and "run (saving)" in bar


def test_each_session_records_what_reproducing_it_needs(workspace, monkeypatch, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "code"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    (repo / "trained").mkdir()
    (repo / "trained" / "weights.bin").write_bytes(b"old")  # a shipped model: an output, not code
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (repo / "model.py").write_text("x = 2\n")  # uncommitted during the first session
    monkeypatch.setattr(provenance, "CODE_ROOT", repo)
    run(workspace, stop_at=8)
    (repo / "model.py").write_text("x = 1\n")
    (repo / "trained" / "weights.bin").write_bytes(b"new")  # retrained models do not make the code dirty
    out = run(workspace, resume=True)
    sessions = json.loads((out / "provenance.json").read_text())["sessions"]
    assert [s["from_step"] for s in sessions] == [0, 8]
    assert [(s["git_commit"], s["git_dirty"], s["git_diff"]) for s in sessions] == [
        (git("rev-parse", "HEAD").strip(), True, "uncommitted_1.diff"), (git("rev-parse", "HEAD").strip(), False, None)]
    assert "-x = 1\n+x = 2\n" in (out / "uncommitted_1.diff").read_text()
    identity = {"data_sha256": data.data_sha256(str(workspace), None), "tokenizer": "bytes",
                "tokenizer_fingerprint": load_tokenizer("bytes").fingerprint}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": "cpu", "threads": torch.get_num_threads(), "processes": 1}
    for session in sessions:
        assert {k: session[k] for k in [*identity, *versions]} == {**identity, **versions}
    monkeypatch.setattr(provenance, "CODE_ROOT", tmp_path / "not-a-checkout")
    out = run(workspace, name="elsewhere", max_steps=2)
    session, = json.loads((out / "provenance.json").read_text())["sessions"]
    assert (session["git_commit"], session["git_dirty"], session["git_diff"]) == (None, None, None)


def test_the_trainer_is_made_of_short_functions():
    tree = ast.parse(Path(trainer.__file__).read_text())
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert max(lengths.values()) <= 60, sorted(lengths.items(), key=lambda item: -item[1])[:3]


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


def test_a_save_killed_before_or_after_its_commit_resumes_exactly(workspace):
    """A save writes model.safetensors.next, then training_state.pt (the commit), then renames the weights. Killed
    between the two, resume finishes the save; killed before the commit, it drops the pending weights."""
    straight = log(run(workspace, name="straight", max_steps=12))
    out = run(workspace, name="killed", max_steps=12, stop_at=4)
    step4 = (out / "model.safetensors").read_bytes()
    run(workspace, name="killed", max_steps=12, stop_at=8, resume=True)
    # After the commit: the state is step 8's, model.safetensors still step 4's, step 8's weights pending.
    (out / "model.safetensors").replace(out / "model.safetensors.next")
    (out / "model.safetensors").write_bytes(step4)
    resumed = log(run(workspace, name="killed", max_steps=12, resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)
    assert not (out / "model.safetensors.next").exists()
    # Before the commit: the state and weights agree; the pending weights of another step are dropped.
    out = run(workspace, name="early", max_steps=12, stop_at=8)
    (out / "model.safetensors.next").write_bytes(step4)
    resumed = log(run(workspace, name="early", max_steps=12, resume=True))
    assert np.allclose(straight[EXACT_COLUMNS].to_numpy(float), resumed[EXACT_COLUMNS].to_numpy(float),
                       atol=1e-6, equal_nan=True)
    assert not (out / "model.safetensors.next").exists()


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
        decayed, plain = make_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1),
                                        torch.device("cpu")).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        decayed_names = sorted(names[id(p)] for p in decayed["params"])
        assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
        assert all(n.endswith("weight") and ("attention." in n or "mlp." in n or n == "head.weight")
                   for n in decayed_names)
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


DISTRIBUTED_SETTINGS = ["--tokenizer=bytes", "--preset=llama3-1m", "--dim=32", "--n_layers=2", "--context_length=32",
                        "--max_steps=8", "--log_every=4", "--eval_every=4", "--eval_batches=2", "--warmup_steps=2",
                        "--device=cpu"]


def torchrun(workspace, name, nproc, *extra):
    args = [f"--name={name}", *extra] + ([] if "--resume" in extra else [f"--data={workspace}", *DISTRIBUTED_SETTINGS])
    # --standalone: a free port for each launch (a fixed one may still be held by the previous launch)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
               *args]
    env = {**os.environ, "TRAINED_DIR": str(checkpoint.TRAINED), "DATA_CACHE": str(data.CACHE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # On failure, the workers' own errors first: torchrun's summary at the end hides them.
    errors = [line for line in done.stderr.splitlines() if "rror" in line or "bort" in line or "terminate" in line]
    assert done.returncode == 0, " ".join(args) + "\n" + "\n".join(errors[:20]) + "\n...\n" + done.stderr[-1500:]
    return log(checkpoint.TRAINED / name)


MUP = ("--parametrization=mup", "--base_dim=16")  # muP's multipliers and per-group rates, sharded too


@pytest.mark.parametrize(("sharding", "optimizer", "extra"), [("ddp", "adamw", ()), ("fsdp", "adamw", ()),
                                                              ("fsdp", "muon", ()), ("fsdp", "adamw", MUP)])
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch_through_a_resume(workspace, sharding,
                                                                                          optimizer, extra):
    from train import configs as parse
    model_cfg, train_cfg, _, _ = parse([f"--data={workspace}", *DISTRIBUTED_SETTINGS, "--batch_size=8", "--name=one",
                                        f"--optimizer={optimizer}", *extra])
    one = log(train(model_cfg, train_cfg, progress_bar=False))
    # Stopped at step 6, half way through the row of steps 5-8: the resumed run must log the mean loss of
    # both processes' steps 5 and 6, not only rank 0's. A stop and a resume also gather and scatter FSDP's shards;
    # Muon under FSDP orthogonalises each whole matrix, so its losses are the one-process run's too.
    torchrun(workspace, "two", 2, "--batch_size=4", f"--fsdp={sharding == 'fsdp'}", "--stop_at=6",
             f"--optimizer={optimizer}", *extra)
    two = torchrun(workspace, "two", 2, "--resume")
    assert np.allclose(one[EXACT_COLUMNS].to_numpy(float), two[EXACT_COLUMNS].to_numpy(float), atol=1e-5,
                       equal_nan=True)
    assert two["step"].tolist() == [4, 8] and two["tokens_seen"].iloc[-1] == 8 * 8 * 32
    written = (checkpoint.TRAINED / "two").iterdir()  # (and the diff of this checkout, when it has changes)
    assert sorted(p.name for p in written if not p.match(provenance.DIFF_PATTERN)) == [
        "command.txt", "log_data.csv", "model.safetensors", "model_config.json", "provenance.json", "stability.csv",
        "train_config.json",
        "training_state.pt"]


def test_real_text_tiny_shakespeare_learns(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    rows = log(run("shakespeare", max_steps=60, eval_every=30, batch_size=8))  # shipped in data/
    assert rows["val_loss"].dropna().iloc[-1] < 3.5  # far below ln(259) = 5.56, the loss of knowing nothing


def test_gpu_peaks_match_the_card_not_just_its_family():
    """torch's device names: the PCIe and NVL H100 are slower cards than the SXM one that "H100" names."""
    assert trainer.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert trainer.peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert trainer.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert trainer.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert trainer.peak_flops_of("NVIDIA GeForce RTX 4090") == 165e12
    assert trainer.peak_flops_of("Some Future GPU") is None


@pytest.mark.parametrize(("name", "world_size", "expected"), [("cuda", 1, "cuda:3"), ("cuda", 2, "cuda:1"),
                                                             ("cuda:2", 2, "cuda:2")])
def test_a_bare_cuda_device_gets_an_index_before_set_device(name, world_size, expected, monkeypatch):
    """torch.cuda.set_device refuses a bare "cuda" on some torch versions (2.11 did): pick_device names the
    current GPU alone, the local rank's under torchrun, and keeps an index it was given."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    device = trainer.pick_device(name, trainer.Distributed(rank=1, world_size=world_size, local_rank=1))
    assert device == torch.device(expected) and chosen == [device]


def test_a_warmup_as_long_as_the_run_is_noted_once_with_the_peak_it_reaches(workspace, capsys):
    model_cfg, train_cfg = configs(workspace, max_steps=4, warmup_steps=8, lr=1e-3, eval_every=4, save_every=4)
    train(model_cfg, train_cfg, progress_bar=False)
    assert capsys.readouterr().err.count("note: warmup_steps=8 >= max_steps=4: the rate rises all run, to "
                                         "0.0005 (lr=0.001), and never decays") == 1
    model_cfg, train_cfg = configs(workspace, max_steps=8, warmup_steps=2, name="other")
    train(model_cfg, train_cfg, progress_bar=False)
    assert "note: warmup" not in capsys.readouterr().err
