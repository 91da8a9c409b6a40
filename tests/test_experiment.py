"""Experiments: the plan, budgets, the runner (resume, parallel, submitit), the statistics and the verdict."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_trainer import corpus

import experiment as experiment_script
import inference
import model_comparison
import tools
from config import ConfigError, TrainConfig
from conftest import ROOT
from modules.context import Context
from toolkit import checkpoint, data, report, stability, stats, trainer
from toolkit.experiment import (
    PLAN,
    Experiment,
    ExperimentError,
    Interrupted,
    check_settings,
    execute_run,
    prune,
    reached_end,
    run_experiment,
    run_spec,
    run_with_submitit,
)
from toolkit.metrics import score, text_batches, token_byte_lengths

TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context_length": 32}
TINY_TRAIN = {"tokenizer": "bytes", "device": "cpu", "batch_size": 4, "warmup_steps": 3, "lr": 3e-3, "min_lr": 3e-4,
              "log_every": 5, "eval_every": 10, "eval_batches": 2, "save_every": 10}


def write_texts(folder):
    """Training stories and held-out stories (another seed of the same tiny grammar)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.txt").write_text("".join(doc + "\n<|endoftext|>\n" for doc in corpus()))
    (folder / "heldout.txt").write_text("".join(doc + "\n<|endoftext|>\n" for doc in corpus(30, seed=1)))
    return folder


def plan(folder, **values) -> dict:
    """A tiny experiment: 2-layer 32-dim models on bytes, one CPU thread per run (identical settings
    give identical results)."""
    base = {"name": "study", "base": "llama3-1m", "seeds": 2, "budget": {"steps": 20}, "threads": 1,
            "eval_data": str(folder / "heldout.txt"), "model": dict(TINY_MODEL),
            "train": {**TINY_TRAIN, "data": str(folder / "stories.txt")}, "variants": {"baseline": {}}}
    return {**base, **values}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    threads = torch.get_num_threads()
    yield write_texts(tmp_path / "texts")
    torch.set_num_threads(threads)


def ran_study(tmp, plan_of):
    """A module's study, run once: trained/, the data cache and the texts in `tmp`, the experiment
    plan_of(texts) run and reported. Yields (experiment, report files, texts)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "TRAINED", tmp / "trained")
        patch.setattr(data, "CACHE", tmp / "cache")
        texts = write_texts(tmp / "texts")
        experiment = Experiment.from_dict(plan_of(texts))
        run_experiment(experiment, progress_bar=False, echo=lambda line: None)
        yield experiment, report.write_report(experiment), texts
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """baseline, an identical copy and a variant with a learning rate of 1e-6, 3 seeds each, run once."""
    variants = {"baseline": {}, "same": {}, "slow": {"lr": 1e-6, "min_lr": 1e-7}}
    yield from ran_study(tmp_path_factory.mktemp("study"), lambda texts: plan(texts, seeds=3, variants=variants))


# --- statistics ---

def test_statistics_match_a_hand_computation():
    baseline, variant = {0: 1.0, 1: 1.2, 2: 1.1}, {0: 1.1, 1: 1.25, 2: 1.3}
    paired = stats.paired_test(variant, baseline)
    # differences 0.1, 0.05, 0.2: mean 7/60, variance 7/1200, so t^2 = (7/60)^2 / (7/1200 / 3) = 7; with 2 degrees of
    # freedom Student's t has the cdf 1/2 + t / (2 sqrt(t^2 + 2)), so p = 1 - sqrt(7)/3 and the 97.5% quantile is
    # sqrt(2 * 0.9025 / 0.0975).
    assert paired.mean == pytest.approx(7 / 60) and paired.std == pytest.approx(math.sqrt(7 / 1200))
    assert paired.t == pytest.approx(math.sqrt(7)) and paired.p == pytest.approx(1 - math.sqrt(7) / 3)
    half = math.sqrt(2 * 0.9025 / 0.0975) * math.sqrt(7 / 1200) / math.sqrt(3)
    assert (paired.ci_low, paired.ci_high) == pytest.approx((7 / 60 - half, 7 / 60 + half))
    summary = stats.summarize([1.0, 1.2, 1.1])
    assert (summary.mean, summary.std) == pytest.approx((1.1, 0.1))
    assert summary.ci_high - summary.mean == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975) * 0.1 / math.sqrt(3))
    assert math.isnan(stats.summarize([1.0]).std)

    same = stats.paired_test(baseline, dict(baseline))
    assert (same.mean, same.p) == (0.0, 1.0)
    assert stats.call(same.mean, same.p) == "within noise"
    assert (stats.call(-0.1, 0.01) == "better" and stats.call(0.1, 0.049) == "worse"
            and stats.call(-0.1, 0.05) == "within noise")

    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04, made non-decreasing: 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and stats.holm([0.02]) == [0.02]
    untested = stats.paired_test({0: 1.0}, {0: 1.5})  # one pair: no test, and it does not count in Holm's m
    assert math.isnan(untested.p) and untested.mean == -0.5
    assert stats.holm([0.02, math.nan]) == pytest.approx([0.02, math.nan], nan_ok=True)


def test_the_detectable_difference_is_found_with_80_percent_power():
    rng = np.random.default_rng(0)
    for n in (3, 5):
        delta = stats.min_detectable_difference(1.0, n)
        d = rng.normal(delta, 1.0, size=(200_000, n))  # simulated paired differences
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        assert (np.abs(t) > stats.t_quantile(n)).mean() == pytest.approx(0.8, abs=0.005)
    # many seeds: the normal approximation (1.96 + 0.8416) * sd / sqrt(n)
    assert stats.min_detectable_difference(1.0, 400) == pytest.approx(2.8016 / 20, rel=0.01)
    assert math.isnan(stats.min_detectable_difference(1.0, 1)) and math.isnan(stats.min_detectable_difference(0.0, 3))


def test_loss_spikes_and_rank_agreement():
    # lowest before the 4th value is 2.0: 2.5 is 25% above (a spike); 2.1 is 5% (none); 2.2 is 22% above 1.8 (a spike)
    assert stats.loss_spikes([3.0, 2.5, 2.0, 2.5, 2.1, 1.9, 1.8, 2.2]) == (2, pytest.approx(0.25))
    assert stats.loss_spikes([3.0, 2.0, 1.0]) == (0, 0.0)
    assert stats.ranking({"a": 1.2, "b": 1.1, "c": math.nan}) == ["b", "a", "c"]
    assert stats.kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert stats.kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0


# --- the verdict of a real (tiny) study ---

def test_identical_variants_differ_by_exactly_zero_and_a_tiny_learning_rate_is_worse(study):
    experiment, files, _ = study
    table = pd.read_csv(experiment.folder / "report.csv").set_index("variant")
    assert table.loc["same", "diff_mean"] == 0.0 and table.loc["same", "p"] == 1.0
    assert table.loc["same", "bpb_mean"] == table.loc["baseline", "bpb_mean"]
    assert table.loc["same", "call"] == "within noise"
    assert table.loc["slow", "call"] == "worse" and table.loc["slow", "p_holm"] < 0.05
    assert table.loc["slow", "diff_mean"] > 0.5  # barely trained: far more bits per byte
    # Holm over the two variants: the smaller p doubled
    assert table.loc["slow", "p_holm"] == pytest.approx(min(1.0, 2 * table.loc["slow", "p"]))
    assert (table["steps"] == 20).all() and (table["tokens"] == 20 * 4 * 32).all() and (table["seeds"] == 3).all()
    text = (experiment.folder / "report.md").read_text()
    assert "| `slow` |" in text and "**worse**" in text and "lr: 0.003 → 1e-06" in text
    assert "Budget: equal optimizer steps: 20 steps per run" in text and "Noise floor" in text
    names = {f.name for f in files}
    assert {"bpb_vs_step.png", "bpb_vs_tokens.png", "bpb_vs_flops.png", "bpb_vs_time.png", "difference.png",
            "gradient_norms.png"} <= names
    assert all(f.stat().st_size > 0 for f in files)


def test_the_held_out_score_is_every_token_of_the_text_once(study):
    experiment, _, texts = study
    runs = pd.read_csv(experiment.folder / "runs.csv")
    assert len(runs) == 9 and set(runs["status"]) == {"finished"}
    row = runs[runs["name"] == "study/slow/seed2"].iloc[0]
    model, tokenizer = tools.load_model("study/slow/seed2")
    documents = list(tools.read_documents(str(texts / "heldout.txt")))
    scores = score(model, text_batches(tokenizer, documents, 32, 4), token_byte_lengths(tokenizer, 259), "cpu")
    assert row["eval_bpb"] == pytest.approx(scores.bits_per_byte, rel=1e-9)
    assert scores.bytes == sum(len(d.encode()) for d in documents)  # bytes tokens: every byte scored once


def test_runs_are_ordinary_trained_models_with_nested_names(study, capsys):
    _, _, texts = study
    assert "study/baseline/seed0" in tools.trained_names()
    table = model_comparison.compare(model_comparison.load_models(["study/baseline/seed0", "study/slow/seed0"]),
                                     list(tools.read_documents(str(texts / "heldout.txt"))))
    assert table["tokens_trained"].tolist() == [20 * 4 * 32] * 2
    assert table["bits_per_byte"].iloc[0] < table["bits_per_byte"].iloc[1]
    inference.main(["study/baseline/seed0", "Tom saw", "--temp=0", "--max_len=8"])
    assert "Tom saw" in capsys.readouterr().out
    with pytest.raises(tools.LoadError, match="no model 'study/baseline/seed9' .did you mean study/baseline/seed"):
        tools.load_model("study/baseline/seed9")
    # A study's folder is not a model (nor a hub id to download): it names the models inside.
    for folder in ("study", "study/baseline"):
        with pytest.raises(tools.LoadError, match=f"^{folder} is a folder of models, not one: name one of them, "
                                                  f"e.g. study/baseline/seed0"):
            tools.load_model(folder)
    with pytest.raises(tools.LoadError, match="^no model 'nostudy/baseline/seed0'"):  # two slashes: never a hub id
        tools.load_model("nostudy/baseline/seed0")
    for bad in ("../outside", "/absolute", "a//b", "a/./b", ""):
        with pytest.raises(ConfigError, match="must be a folder name under trained/"):
            TrainConfig(name=bad)


def test_each_run_logs_stability_figures(study):
    experiment, _, texts = study
    folder = checkpoint.TRAINED / "study/baseline/seed1"
    log = pd.read_csv(folder / "log_data.csv")
    figures = pd.read_csv(folder / "stability.csv")
    assert figures["step"].tolist() == log["step"].tolist()
    parts = [c for c in figures.columns if c.startswith("grad_norm.")]
    assert parts == ["grad_norm.embed", "grad_norm.layers.0", "grad_norm.layers.1", "grad_norm.norm", "grad_norm.head"]
    # the parts' norms make up the whole gradient norm (before clipping, which the loop logs)
    assert np.sqrt((figures[parts] ** 2).sum(axis=1)).to_numpy() == pytest.approx(log["grad_norm"].to_numpy(), rel=1e-5)
    # the logits RMS at the last evaluation is that of the saved model over the validation set
    model, tokenizer = tools.load_model("study/baseline/seed1")
    val = data.validation_batches(
        data.TokenData(data.prepare_data(str(texts / "stories.txt"), tokenizer, progress=False), "val"), 32, 4, 2 * 4)
    with torch.no_grad():
        logits = torch.cat([model(**batch)[0].flatten(0, 1) for batch in val])
    assert figures["logits_rms"].dropna().iloc[-1] == pytest.approx(logits.square().mean().sqrt().item(), rel=1e-5)
    assert figures["logits_rms"].notna().sum() == 2  # evaluated at steps 10 and 20
    # the largest attention logit at the last evaluation: q k^T / sqrt(head_dim) written out by hand over the
    # first validation sequences, causal pairs only, every layer and head of the saved model
    probe, largest = val[0]["input_ids"][:stability.PROBE_SEQUENCES], -math.inf
    with torch.no_grad():
        x = model.embed(probe)
        for layer in model.layers:
            h = layer.attention_norm(x)  # pre-norm (the preset)
            q, k, _ = layer.attention.project(h, Context.of(h))
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            largest = max(largest, scores[..., causal].max().item())
            x = layer(x, Context.of(x))
    assert figures["attn_logit_max"].dropna().iloc[-1] == pytest.approx(largest, rel=1e-5)
    assert figures["attn_logit_max"].notna().sum() == 2
    assert "| `baseline` |" in (experiment.folder / "report.md").read_text().split("## Stability")[1]


def test_a_finished_experiment_is_not_run_again_and_a_changed_plan_is_refused(study):
    experiment, _, texts = study
    before = (checkpoint.TRAINED / "study/baseline/seed0/log_data.csv").stat().st_mtime_ns
    run_experiment(experiment, progress_bar=False, echo=lambda line: None)
    assert (checkpoint.TRAINED / "study/baseline/seed0/log_data.csv").stat().st_mtime_ns == before
    saved = Experiment.from_file(experiment.folder / "experiment.json")  # the plan kept beside the runs
    assert saved == experiment and [r.train for r in saved.runs()] == [r.train for r in experiment.runs()]
    changed = Experiment.from_dict(plan(texts, seeds=3, variants={"baseline": {}, "same": {"warmup_steps": 5}}))
    with pytest.raises(ExperimentError, match=r"trained/study/same/seed0 was trained with warmup_steps=3, the plan now "
                                              r"says 5: delete that folder or give the experiment another name"):
        run_experiment(changed, progress_bar=False, echo=lambda line: None)


def test_a_trained_model_can_be_the_base(study):
    experiment, _, texts = study
    based = Experiment.from_dict(plan(texts, name="rebased", base="study/slow/seed0", model={},
                                      variants={"baseline": {}, "wide": {"dim": 64}}))
    base, wide = (based.run("", name, 0) for name in based.variants)
    assert base.model == experiment.run("", "slow", 0).model  # its own architecture
    assert base.train.lr == 3e-3  # [train] wins over the base's own settings (lr 1e-6)
    assert (wide.model.dim, wide.model.head_dim, wide.model.mlp_hidden) == (64, 16, 170)  # derived again for dim 64


def test_the_report_warns_when_runs_differ_in_code_or_device(study):
    experiment, _, _ = study
    folders = [checkpoint.TRAINED / f"study/{v}/seed{s}" for v in experiment.variants for s in range(3)]
    try:
        for k, folder in enumerate(folders):  # the trainer's layout: one entry per session
            session = {"git_commit": "abc1234" if k else "def5678", "git_dirty": False, "git_diff": None, "threads": 1}
            (folder / "provenance.json").write_text(json.dumps({"sessions": [session]}))
        table, warnings = report.provenance(report.Study(experiment))
    finally:
        for folder in folders:
            (folder / "provenance.json").unlink()
    assert table["commit"].tolist() == ["def5678"] + ["abc1234"] * 8
    assert warnings == ["runs differ in code (git commit): abc1234 (8 runs), def5678 (1 runs)"]
    table, warnings = report.provenance(report.Study(experiment))  # without provenance.json: result.json's record
    assert warnings == [] and set(table["device"]) == {"cpu"} and set(table["threads"]) == {1}


# --- budgets ---

def test_equal_flops_budgets_give_the_cheaper_variant_more_tokens_by_the_flop_ratio(workspace):
    experiment = Experiment.from_dict(plan(workspace, budget={"flops": 2e10},
                                           variants={"baseline": {}, "deep": {"n_layers": 6}}))
    cheap, costly = (experiment.run("", name, 0) for name in ("baseline", "deep"))
    assert costly.flops_per_token > 2 * cheap.flops_per_token
    tokens = {run.variant: run.train.max_steps * run.tokens_per_step for run in (cheap, costly)}
    # whole steps within the budget: each spends it to within one step
    for run in (cheap, costly):
        assert 2e10 - run.flops_per_token * run.tokens_per_step < tokens[run.variant] * run.flops_per_token <= 2e10
    assert tokens["baseline"] / tokens["deep"] == pytest.approx(costly.flops_per_token / cheap.flops_per_token,
                                                                rel=0.01)

    for budget, steps in (({"tokens": 12800}, 100), ({"steps": 7}, 7)):
        equal = Experiment.from_dict(plan(workspace, budget=budget, variants={"baseline": {}, "deep": {"n_layers": 6}}))
        assert [equal.run("", name, 0).train.max_steps for name in equal.variants] == [steps, steps]
    timed = Experiment.from_dict(plan(workspace, budget={"minutes": 2}))
    run = timed.run("", "baseline", 0)
    assert (run.train.max_minutes, run.train.max_steps) == (2.0, TrainConfig().max_steps)


def test_a_minutes_budget_stops_the_run_and_evaluates_it(workspace):
    experiment = Experiment.from_dict(plan(workspace, budget={"minutes": 0.002}, seeds=1,
                                           train={**TINY_TRAIN, "data": str(workspace / "stories.txt"),
                                                  "max_steps": 100000}))
    run = experiment.run("", "baseline", 0)
    result = execute_run(run_spec(run, experiment.eval_data, 1, None, False))
    log = pd.read_csv(run.folder / "log_data.csv")
    assert result["status"] == "finished" and 0 < result["steps"] < 100000
    assert log["elapsed_s"].iloc[-1] >= 0.12 and not math.isnan(log["val_bpb"].iloc[-1])  # evaluated where it stopped
    assert reached_end(log, run.train)
    again = execute_run(run_spec(run, experiment.eval_data, 1, None, False))  # resuming a run out of time adds nothing
    assert again["steps"] == result["steps"] and again["eval_bpb"] == result["eval_bpb"]


# --- learning rates, divergence, sizes ---

def test_a_learning_rate_grid_picks_the_best_rate_records_divergence_and_checks_transfer(workspace, monkeypatch):
    real_step = trainer.train_step

    def diverging_step(model, optimizer, micro_batches, cfg, *args):
        loss, grad_norm = real_step(model, optimizer, micro_batches, cfg, *args)
        return (loss * float("nan") if cfg.lr >= 1 else loss), grad_norm  # as a far too high rate would

    monkeypatch.setattr(trainer, "train_step", diverging_step)
    train = ({k: v for k, v in TINY_TRAIN.items() if k not in ("lr", "min_lr")}
             | {"data": str(workspace / "stories.txt")})
    experiment = Experiment.from_dict(plan(workspace, lr_grid=[1e-5, 3e-3, 1.0], sizes=["dim=16", "dim=32"],
                                           train=train,
                                           variants={"baseline": {}, "layernorm": {"norm": "layernorm"}}))
    run_experiment(experiment, progress_bar=False, echo=lambda line: None)
    files = report.write_report(experiment)
    runs = pd.read_csv(experiment.folder / "runs.csv")
    assert len(runs) == 2 * 2 * 3 + 2 * 2  # the grid on seed 0, then seed 1 at the best rate
    assert set(runs[runs["lr"] == 1.0]["status"]) == {"diverged"}  # recorded, never dropped
    assert set(runs[runs["seed"] == 1]["lr"]) == {3e-3}
    assert (checkpoint.TRAINED / "study/dim16/layernorm/lr0.003/seed1/result.json").is_file()
    min_lr = json.loads((checkpoint.TRAINED
                         / "study/dim16/baseline/lr1e-05/seed0/train_config.json").read_text())["min_lr"]
    assert min_lr == pytest.approx(1e-5 * TrainConfig().min_lr / TrainConfig().lr)  # the base's ratio
    table = pd.read_csv(experiment.folder / "report.csv")
    assert table["size"].tolist() == ["dim16", "dim16", "dim32", "dim32"] and set(table["lr"]) == {3e-3}
    assert not table["call"].str.startswith("inconclusive").any()
    text = (experiment.folder / "report.md").read_text()
    assert "## Learning rate" in text and "diverged" in text.split("## Learning rate")[1]
    assert ("The ranking holds at every size" in text) == report.transfer(report.Study(experiment))[0]
    assert {"learning_rate.png", "transfer.png"} <= {f.name for f in files}


def test_the_transfer_sentence_ranks_only_variants_scored_at_every_size(monkeypatch):
    scores = {"small": {"baseline": 1.30, "muon": 1.10, "alibi": 1.20},
              "large": {"baseline": 1.25, "muon": math.nan, "alibi": 1.15}}  # muon not yet run at "large"
    monkeypatch.setattr(report, "verdict", lambda study, size: pd.DataFrame(
        {"variant": list(scores[size]), "bpb_mean": list(scores[size].values())}))
    study = types.SimpleNamespace(experiment=types.SimpleNamespace(size_labels=["small", "large"]))
    holds, sentence = report.transfer(study)
    assert holds and sentence == ("The ranking holds at every size: alibi < baseline (lowest bits per byte first) "
                                  "(muon: not yet scored at every size).")
    scores["large"].update(alibi=math.nan)  # only the baseline scored at "large": nothing to rank
    assert report.transfer(study) == (False, "No ranking across sizes yet: fewer than two variants are scored at "
                                             "every size (muon, alibi: not yet scored at every size).")
    scores["large"].update(muon=1.18, alibi=1.16)
    holds, sentence = report.transfer(study)
    assert not holds and sentence.startswith("The ranking changes with size: small: muon < alibi < baseline; "
                                             "large: alibi < muon < baseline (Kendall tau")
    assert sentence.endswith(": 0.33).")


def test_a_best_rate_at_the_edge_of_the_grid_is_inconclusive():
    def variant(name, lr, edge, values, diverged=()):
        results = {seed: {"status": "diverged" if seed in diverged else "finished", "eval_bpb": v}
                   for seed, v in enumerate(values)}
        return report.Variant("", name, [], results, lr, edge)

    baseline = variant("baseline", 1e-3, False, [1.30, 1.32, 1.31])
    better = variant("better", 2e-3, True, [1.20, 1.21, 1.20])
    paired = stats.paired_test(better.finished, baseline.finished)
    assert paired.p < 0.01
    assert report.variant_call(better, baseline, paired, paired.p, 3) == report.EDGE
    better.lr_at_edge = False
    assert report.variant_call(better, baseline, paired, paired.p, 3) == "better"
    broken = variant("broken", 1e-3, False, [1.2, math.nan, 1.2], diverged=(1,))
    assert report.variant_call(broken, baseline, paired, paired.p, 3) == "worse (diverged in 1 of 3 seeds)"
    assert report.variant_call(baseline, broken, paired, paired.p, 3) == "inconclusive (the baseline diverged)"
    hopeless = report.Variant("", "hopeless", [], {}, None, False, diverged_on_grid=True)
    assert report.variant_call(hopeless, baseline, paired, paired.p, 3) == "worse (diverged at every rate of the grid)"


# --- the command line ---

def test_the_command_line_without_a_file_plans_one_variant_per_value(workspace, capsys):
    args = ["--base=llama3-1m", "--vary", "norm=rmsnorm,layernorm,cosinenorm", "--seeds=3", "--budget=steps:400",
            "--tokenizer=bytes", "--model.dim=64", "--train.batch_size=8", "--dry_run"]
    experiment_script.main(args)
    out = capsys.readouterr().out
    assert "llama3-1m-norm: base llama3-1m, 3 variants x 3 seeds; budget: equal optimizer steps: 400 steps" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("llama3-1m-norm/")]
    assert [r[0] for r in rows] == [f"llama3-1m-norm/{v}/seed{s}" for v in ("rmsnorm", "layernorm", "cosinenorm")
                                    for s in range(3)]
    assert all(r[4] == "400" and r[5] == "819K" and r[-2:] == ["to", "run"] for r in rows)  # 400 x 8 x 256 tokens


@pytest.mark.parametrize("args, message", [
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=weeks:3"], "budget kind 'weeks' is not valid"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=steps:3", "--prune=some"], "--prune='some' is not valid"),
    (["--base=llama3-1m", "--vary", "nrom=rmsnorm", "--budget=steps:3"], "unknown field 'nrom' (did you mean norm?)"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm,scalenorm", "--budget=steps:3"],
     "variant scalenorm: norm='scalenorm' is not valid"),
    (["--base=llama3-2m", "--vary", "norm=rmsnorm", "--budget=steps:3"], "base 'llama3-2m' is neither a preset"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm"], "give an experiment file (see experiments/), or --base"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=steps:3", "--lr_grid=1e-3,2e-3", "--lr=1e-3"],
     "[train] sets lr, which lr_grid chooses"),
    (["missing.toml"], "cannot read missing.toml"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=flops:abc"], "--budget='flops:abc' is not valid: write "
                                                                            "KIND:AMOUNT"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=steps:3", "--parallel=zero"],
     "--parallel='zero' is not valid: give how many runs at a time, e.g. --parallel=2"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=steps:3", "--seeds=a"],
     "--seeds='a' is not valid: expected whole numbers separated by commas, e.g. --seeds=0,1,2"),
    (["--base=llama3-1m", "--vary", "norm=rmsnorm", "--budget=steps:3", "--dryrun"], "(did you mean dry_run?)"),
])
def test_bad_experiments_fail_with_one_line(workspace, args, message):
    with pytest.raises(SystemExit) as exit_info:
        experiment_script.main(args + ["--dry_run"])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert "\n" not in str(exit_info.value)


@pytest.mark.parametrize("command", [["experiment.py", "experiments/quick.toml", "--dry_run"],
                                     ["inference.py", "Llama3_1m_atto", "Once upon a time", "--max_len=20"]])
def test_a_closed_pipe_ends_a_script_quietly(tmp_path, command):
    """`python SCRIPT ... | head -1`: the reader has gone before anything is printed."""
    env = {**subprocess_env(tmp_path), "TRAINED_DIR": str(ROOT / "trained")}
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr and "Error" not in stderr


def test_experiment_files_are_checked_key_by_key(workspace, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nbase = "llama3-1m"\nbudget = { steps = 3 }\nseed = [0]\n[variants]\nbaseline = {}\n')
    with pytest.raises(ExperimentError, match=r"unknown key 'seed' \(did you mean seeds\?\)"):
        Experiment.from_file(path)
    path.write_text('name = "x"\nbase = "llama3-1m"\nbudget = { steps = 3 }\n[variants]\nbase line = {}\n')
    with pytest.raises(ExperimentError, match="is not valid TOML"):
        Experiment.from_file(path)
    shipped = sorted((ROOT / "experiments").glob("*.toml"))
    assert shipped and all(Experiment.from_file(f).variants for f in shipped)  # the examples plan without error


def test_the_shipped_studies_plan_what_their_runs_were_trained_with(monkeypatch):
    """A default changed in config.py must not change a shipped study: rerunning any experiment file whose
    study is under trained/ plans each finished run with the settings it was trained with (a changed
    default is pinned in the file), so its command reproduces it and resumes instead of refusing."""
    monkeypatch.setattr(checkpoint, "TRAINED", ROOT / "trained")  # wherever other tests pointed it
    checked = 0
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        experiment = Experiment.from_file(path)
        if (experiment.folder / PLAN).is_file():
            for run in experiment.runs():
                if run.result() is not None:
                    check_settings(run)
                    checked += 1
    assert checked > 0


def test_a_grid_grows_past_an_edge_whose_rate_was_best(workspace):
    """Best at the top rate: the next rate up (the grid's spacing) joins, at most grid_extend times; the
    same downwards; a best rate inside the grid stops the growth. Results are written by hand here."""
    train = {k: v for k, v in plan(workspace)["train"].items() if k not in ("lr", "min_lr")}
    experiment = Experiment.from_dict(plan(workspace, train=train, lr_grid=[1e-3, 2e-3], grid_extend=2,
                                           variants={"baseline": {}, "low": {"weight_decay": 0.0}}))

    def finish(variant, lr, bpb, seed=0):
        folder = experiment.run("", variant, seed, lr).folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps({"status": "finished", "val_bpb": bpb}))

    names = lambda: sorted(run.name for run in experiment.runs())  # noqa: E731
    assert names() == ["study/baseline/lr0.001/seed0", "study/baseline/lr0.002/seed0",
                       "study/low/lr0.001/seed0", "study/low/lr0.002/seed0"]
    finish("baseline", 1e-3, 2.0)
    finish("baseline", 2e-3, 1.9)  # best at the top: 4e-3 joins, no seed 1 yet
    assert experiment.grid("", "baseline") == [1e-3, 2e-3, 4e-3] and experiment.best_lr("", "baseline") is None
    assert "study/baseline/lr0.004/seed0" in names() and not any("baseline" in n and "seed1" in n for n in names())
    finish("baseline", 4e-3, 1.8)
    finish("baseline", 8e-3, 1.7)  # still the top, but two rates up is the limit
    assert experiment.grid("", "baseline") == [1e-3, 2e-3, 4e-3, 8e-3] and experiment.best_lr("", "baseline") == 8e-3
    assert "study/baseline/lr0.008/seed1" in names()
    finish("low", 1e-3, 1.5)
    finish("low", 2e-3, 1.6)  # best at the bottom: 5e-4 joins, and is worse: the growth stops
    finish("low", 5e-4, 1.55)
    assert experiment.grid("", "low") == [5e-4, 1e-3, 2e-3] and experiment.best_lr("", "low") == 1e-3
    assert experiment.all_rates == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
    study = report.Study(experiment)
    assert [v.lr_at_edge for v in study.variants[""]] == [True, False]  # the baseline's grid could grow no more
    rows = report.learning_rate_table(study).splitlines()
    assert rows[0] == "| variant | 0.0005 | 0.001 | 0.002 | 0.004 | 0.008 | best |"
    assert rows[2] == "| `baseline` |  | 2.0000 | 1.9000 | 1.8000 | 1.7000 | 0.008 (edge) |"
    assert rows[3] == "| `low` | 1.5500 | 1.5000 | 1.6000 |  |  | 0.001 |"
    assert "grown: `baseline` (0.004, 0.008), `low` (0.0005)" in report.grown(experiment)
    for bad, message in ((-1, "grid_extend=-1 is not valid"), (True, "grid_extend=True is not valid")):
        with pytest.raises(ExperimentError, match=message):
            Experiment.from_dict(plan(workspace, train=train, lr_grid=[1e-3, 2e-3], grid_extend=bad))
    with pytest.raises(ExperimentError, match="give lr_grid at least two rates"):
        Experiment.from_dict(plan(workspace, train=train, lr_grid=[1e-3], grid_extend=1))


def test_ctrl_c_stops_the_experiment_and_a_rerun_resumes_it_exactly(workspace, monkeypatch):
    straight = Experiment.from_dict(plan(workspace, name="straight", seeds=[0]))
    run_experiment(straight, progress_bar=False, echo=lambda line: None)
    real_step, calls = trainer.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl+C: the run saves at the end of this step and stops
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    stopped = Experiment.from_dict(plan(workspace, name="stopped", seeds=[0]))
    with pytest.raises(Interrupted,
                       match="stopped/baseline/seed0 stopped before its step 20: run the same command again"):
        run_experiment(stopped, progress_bar=False, echo=lambda line: None)
    assert stopped.runs()[0].result() is None
    monkeypatch.setattr(trainer, "train_step", real_step)
    run_experiment(stopped, progress_bar=False, echo=lambda line: None)
    first, second = straight.runs()[0].result(), stopped.runs()[0].result()
    assert (second["steps"], second["eval_bpb"]) == (first["steps"], pytest.approx(first["eval_bpb"], abs=1e-7))


# --- where runs execute ---

def subprocess_env(tmp_path):
    return {**os.environ, "TRAINED_DIR": str(tmp_path / "trained"), "DATA_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("srun") is not None, reason="a Slurm cluster: submitit would submit for real")
def test_the_slurm_executor_off_a_slurm_cluster_is_one_line(tmp_path):
    pytest.importorskip("submitit")
    with pytest.raises(ExperimentError) as error:
        run_with_submitit([], "slurm", tmp_path, {}, print)
    assert str(error.value).startswith("--executor=slurm: ") and "leave --executor out" in str(error.value)
    assert "\n" not in str(error.value)


def test_parallel_subprocesses_and_the_submitit_local_executor_give_the_same_results(workspace):
    pytest.importorskip("submitit")
    results = {}
    for name, options in (("inline", {}), ("parallel", {"parallel": 2}), ("submitit", {"executor": "local"})):
        experiment = Experiment.from_dict(plan(workspace, name=name, budget={"steps": 10}))
        run_experiment(experiment, progress_bar=False, echo=lambda line: None, **options)
        results[name] = [run.result()["eval_bpb"] for run in experiment.runs()]
    assert results["parallel"] == results["inline"] and results["submitit"] == results["inline"]
    assert (checkpoint.TRAINED / "parallel/logs/parallel__baseline__seed1.log").is_file()
    assert list((checkpoint.TRAINED / "submitit/submitit").glob("*_result.pkl"))


@pytest.mark.slow
def test_an_interrupted_experiment_resumes_to_the_same_report(workspace, tmp_path):
    values = plan(workspace, seeds=[0], budget={"steps": 150},
                  variants={"baseline": {}, "layernorm": {"norm": "layernorm"}},
                  train={**TINY_TRAIN, "data": str(workspace / "stories.txt"), "log_every": 10, "eval_every": 50})
    path = tmp_path / "study.json"  # the form an experiment saves beside its runs
    path.write_text(json.dumps(values))
    command = [sys.executable, "experiment.py", str(path)]
    env = subprocess_env(tmp_path)
    straight = subprocess.run(command + ["--name=straight"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    process = subprocess.Popen(command + ["--name=resumed"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    second = tmp_path / "trained/resumed/layernorm/seed0"
    deadline = time.time() + 300
    while not (second / "training_state.pt").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # no chance to save: the last checkpoint is all there is
    process.wait()
    assert not (second / "result.json").is_file()  # killed mid-run
    assert (tmp_path / "trained/resumed/baseline/seed0/result.json").is_file()

    resumed = subprocess.run(command + ["--name=resumed"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    columns = ["steps", "tokens", "val_bpb", "eval_bpb", "status"]
    a = pd.read_csv(tmp_path / "trained/straight/runs.csv")[columns]
    b = pd.read_csv(tmp_path / "trained/resumed/runs.csv")[columns]
    assert a.to_dict("list") == b.to_dict("list")
    keep = ["variant", "bpb_mean", "diff_mean", "p", "call"]
    assert pd.read_csv(tmp_path / "trained/straight/report.csv")[keep].equals(
        pd.read_csv(tmp_path / "trained/resumed/report.csv")[keep])
    assert len((tmp_path / "trained/resumed/baseline/seed0/command.txt").read_text().splitlines()) == 1  # not rerun
    assert len((second / "command.txt").read_text().splitlines()) == 2  # started, then resumed


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_background_parallel_runner_stops_every_run_with_a_checkpoint(workspace, tmp_path, signum):
    """Started in the background (Ctrl+C ignored, as a shell's `&` does), the runner still stops on
    `kill -INT` or `kill`: each run gets the signal once, saves and ends, and nothing is left running."""
    values = plan(workspace, seeds=[0, 1], budget={"steps": 100000}, threads=1)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(values))
    process = subprocess.Popen([sys.executable, "experiment.py", str(path), "--parallel=2"], cwd=ROOT,
                               env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    runs = [tmp_path / f"trained/study/baseline/seed{seed}" for seed in (0, 1)]
    deadline = time.time() + 300
    while (not all((run / "training_state.pt").is_file() for run in runs) and time.time() < deadline
           and process.poll() is None):  # both past their first checkpoint: training, not setting up
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1] == "stopped: run the same command again to resume"  # said once
    for run in runs:
        assert not (run / "result.json").is_file()
        step = torch.load(run / "training_state.pt", weights_only=True)["step"]
        assert step > 10 and step >= pd.read_csv(run / "log_data.csv")["step"].max()  # saved where it stopped
    assert not [pid for pid in running_processes() if str(tmp_path).encode() in pid[1]]  # no run outlives the runner


def running_processes() -> list[tuple[str, bytes]]:
    """(pid, command line) of this machine's processes, from /proc; [] where there is none."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            found.append((entry.name, (entry / "cmdline").read_bytes()))
        except OSError:  # ended while we looked
            pass
    return found


def test_prune_keeps_what_the_report_reads_and_one_seed_of_weights(workspace, monkeypatch):
    experiment = Experiment.from_dict(plan(workspace, budget={"steps": 6}, variants={"baseline": {}, "qk": {
        "qk_norm": True}}, train={**plan(workspace)["train"], "save_every": 3}))
    real_step, calls = trainer.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # half way through the first run, after its checkpoint at step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    with pytest.raises(Interrupted):
        run_experiment(experiment, progress_bar=False, echo=lambda line: None)
    monkeypatch.setattr(trainer, "train_step", real_step)
    # half way, prune leaves the stopped run as it is: it resumes
    assert prune(experiment, echo=lambda line: None) == ([], 0)
    assert (checkpoint.TRAINED / "study/baseline/seed0/training_state.pt").is_file()
    run_experiment(experiment, progress_bar=False, echo=lambda line: None)
    report.write_report(experiment)
    before = (experiment.folder / "report.csv").read_text()
    original, _ = tools.load_model("study/qk/seed0")
    kept, freed = prune(experiment, echo=lambda line: None)
    assert kept == ["study/baseline/seed0", "study/qk/seed0"] and freed > 0
    assert not list(checkpoint.TRAINED.rglob("training_state.pt"))
    weights = checkpoint.TRAINED.rglob("model.safetensors")
    assert sorted(str(p.parent.relative_to(checkpoint.TRAINED)) for p in weights) == kept
    pruned, _ = tools.load_model("study/qk/seed0")
    for (name, a), b in zip(original.state_dict().items(), pruned.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name  # bfloat16 on disk, float32 once loaded
    report.write_report(experiment)
    assert (experiment.folder / "report.csv").read_text() == before  # the report never needed the weights
    with pytest.raises(tools.LoadError):
        tools.load_model("study/qk/seed1")
    kept_again, freed_again = prune(experiment, echo=lambda line: None)  # a second prune changes nothing
    assert kept_again == kept and freed_again == 0
    assert prune(experiment, echo=lambda line: None, keep_weights=False)[0] == []  # --prune=all: no weights at all
    assert not list(checkpoint.TRAINED.rglob("model.safetensors"))
