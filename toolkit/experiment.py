"""Experiments: variants x seeds (x learning rates x sizes) trained under one budget, resumably, on
this machine or a cluster; toolkit/report.py then writes the verdict.

A plan (`Experiment`) comes from a TOML file (see experiments/) or from experiment.py's command line.
Every run is an ordinary trained model named NAME/[SIZE/]VARIANT/[lrRATE/]seedK under trained/,
plus a result.json written when it ends (finished or diverged) with its held-out score. A run with
a result.json is done; one with a checkpoint is resumed; others start. With a learning-rate grid,
the first seed runs at every rate, and the other seeds follow at the rate with the best validation.

    python -m toolkit.experiment SPEC_JSON   # one run, as --parallel and the submitit executors start it
"""
import dataclasses
import functools
import itertools
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import tomllib
import torch
from safetensors.torch import save_file

from config import PRESETS, ConfigError, ModelConfig, TrainConfig, closest
from modules.model import Model
from toolkit import checkpoint, data, trainer
from toolkit.checkpoint import (
    MODEL_CONFIG,
    TRAIN_CONFIG,
    WEIGHTS,
    load_checkpoint,
    load_state_dict_file,
    read_json,
    write_atomically,
)
from toolkit.cli import parse_value
from toolkit.data import read_documents
from toolkit.hf import LoadError
from toolkit.metrics import score, text_batches, token_byte_lengths
from toolkit.tokenizer import load_tokenizer
from toolkit.trainer import (
    LOG,
    LOG_COLUMNS,
    STATE,
    Distributed,
    DivergedError,
    TrainError,
    pick_device,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
EVAL_DATA_DEFAULT = "tinystories-heldout"  # the embedded sample's held-out stories
RESULT = "result.json"
PLAN = "experiment.json"  # the resolved plan, saved beside the runs: `experiment.py trained/NAME/experiment.json`
BUDGETS = {"steps": "equal optimizer steps", "tokens": "equal training tokens",
           "flops": "equal training FLOPs (a variant that costs more per token gets fewer tokens)",
           "minutes": "equal wall-clock minutes of training"}
KEYS = ("name", "base", "seeds", "budget", "eval_data", "train", "model", "variants", "lr_grid", "grid_seeds",
        "grid_extend", "sizes", "threads", "slurm")
GRID_SEEDS = ("first", "all")  # which seeds train at every rate of lr_grid
# How a run executes, not what it computes: these may change between invocations of one experiment.
# data: the trainer checks its sha256
RUN_ONLY = ("name", "device", "compile", "tensorboard", "save_every", "fsdp", "data")
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


class ExperimentError(ValueError):
    """An experiment that cannot be planned or run; the message is one line that says what to do."""


class Interrupted(RuntimeError):
    """A run stopped before its end (Ctrl+C, a signal): rerunning the experiment resumes it."""


# --- the plan ---

@dataclass(frozen=True)
class Budget:
    kind: str  # steps | tokens | flops | minutes
    amount: float

    @classmethod
    def parse(cls, value) -> "Budget":
        """{"flops": 3e13} (a file) or "flops:3e13" (the command line)."""
        if isinstance(value, str):
            kind, _, amount = value.partition(":")
            try:
                value = {kind.strip(): float(amount)}
            except ValueError:
                raise ExperimentError(f"--budget={value!r} is not valid: write KIND:AMOUNT with KIND one of "
                                      f"{', '.join(BUDGETS)} and a positive number, e.g. --budget=steps:400") from None
        if not isinstance(value, dict) or len(value) != 1:
            raise ExperimentError(f"budget={value!r} is not valid: give one of {', '.join(BUDGETS)}, "
                                  f"e.g. budget = {{ flops = 3e13 }} or --budget=steps:400")
        (kind, amount), = value.items()
        if kind not in BUDGETS:
            raise ExperimentError(f"budget kind {kind!r} is not valid{closest(kind, BUDGETS)}; "
                                  f"choose one of: {', '.join(BUDGETS)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            raise ExperimentError(f"budget {kind}={amount!r} is not valid: must be a positive number")
        return cls(kind, float(amount))

    def max_steps(self, tokens_per_step: int, flops_per_token: float, steps: int) -> int:
        """The steps a run gets: whole steps within the budget (at least one); for minutes, `steps`
        (the run's max_steps, which its learning-rate schedule follows) with a time limit on top."""
        if self.kind == "steps":
            return max(1, int(self.amount))
        if self.kind == "tokens":
            return max(1, int(self.amount // tokens_per_step))
        if self.kind == "flops":
            return max(1, int(self.amount // (flops_per_token * tokens_per_step)))
        return steps

    def to_dict(self) -> dict:
        return {self.kind: int(self.amount) if self.amount.is_integer() and self.kind != "flops" else self.amount}

    def describe(self) -> str:
        unit = {"steps": "steps", "tokens": "tokens", "flops": "FLOPs", "minutes": "minutes"}[self.kind]
        return f"{BUDGETS[self.kind]}: {self.amount:.4g} {unit} per run"


@dataclass
class Run:
    """One training run of the plan, with its configs and what the budget gives it."""
    name: str  # under trained/
    size: str  # the size's label; "" without sizes
    variant: str
    seed: int
    lr: float | None  # the grid's rate; None without a grid
    model: ModelConfig
    train: TrainConfig
    params: int
    params_without_embeddings: int
    flops_per_token: float

    @property
    def folder(self) -> Path:
        return checkpoint.TRAINED / self.name

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.context_length

    def result(self) -> dict | None:
        """result.json once the run has ended (finished or diverged), else None."""
        path = self.folder / RESULT
        return read_json(path) if path.is_file() else None


def size_label(overrides: dict) -> str:
    """"dim64-n_layers8" for {"dim": 64, "n_layers": 8}: a folder name."""
    return "-".join(f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"
                    for key, value in overrides.items())


def parse_assignments(text: str, where: str) -> dict:
    """{"dim": 64, "n_layers": 8} from "dim=64,n_layers=8", each value parsed by its field's type (in
    sizes, a budget kind too: "dim=64,tokens=5e5")."""
    values = {}
    for part in text.split(","):
        key, has_value, raw = part.strip().partition("=")
        if not has_value:
            raise ExperimentError(f"{where} {text!r} is not valid: write field=value pairs, e.g. dim=64,n_layers=8")
        if where == "sizes" and key in BUDGETS:
            values[key] = Budget.parse(f"{key}:{raw}").amount
        else:
            values[key] = parse_value(field_of(key, where), raw)
    return values


def size_list(sizes) -> list[dict]:
    """The sizes of a plan: a list of "field=value,..." texts or tables, or one table of lists whose
    product is taken ({dim = [32, 64], tokens = [5e5, 1e6]}: four sizes, tokens varying fastest)."""
    how = ("a list such as [\"dim=64\", \"dim=128\"], or a table of lists such as "
           "{ dim = [32, 64], tokens = [5e5, 1e6] }")
    if isinstance(sizes, dict):
        if not sizes or not all(isinstance(v, list) and v for v in sizes.values()):
            raise ExperimentError(f"sizes={sizes!r} is not valid: {how}")
        return [dict(zip(sizes, values)) for values in itertools.product(*sizes.values())]
    if not isinstance(sizes, list) or not all(isinstance(s, (str, dict)) for s in sizes):
        raise ExperimentError(f"sizes={sizes!r} is not valid: {how}")
    return [parse_assignments(s, "sizes") if isinstance(s, str) else dict(s) for s in sizes]


def field_of(key: str, where: str) -> dataclasses.Field:
    if key in MODEL_FIELDS:
        return MODEL_FIELDS[key]
    if key in TRAIN_FIELDS:
        return TRAIN_FIELDS[key]
    raise ExperimentError(f"{where}: unknown field {key!r}{closest(key, [*MODEL_FIELDS, *TRAIN_FIELDS])}; "
                          f"any field of ModelConfig or TrainConfig")


def split_fields(values: dict, where: str) -> tuple[dict, dict]:
    """(model fields, train fields) of a variant's or a size's settings."""
    model, train_values = {}, {}
    for key, value in values.items():
        (model if field_of(key, where) is MODEL_FIELDS.get(key) else train_values)[key] = value
    return model, train_values


def underived(values: dict) -> dict:
    """A saved model config with its derived fields (head_dim, n_kv_heads, mlp_hidden) set back to None
    where they equal what derivation gives, so that a variant changing dim or n_heads derives them anew."""
    values = dict(values)
    for name in ("head_dim", "n_kv_heads", "mlp_hidden"):
        if name in values and getattr(ModelConfig.from_dict({**values, name: None}), name) == values[name]:
            values[name] = None
    return values


@functools.cache
def vocab_size_of(tokenizer: str) -> int:
    return load_tokenizer(tokenizer).vocab_size


def cost(model_cfg: ModelConfig) -> tuple[int, int, float]:
    """(parameters, parameters without embeddings, training FLOPs per token), from a model built on
    the meta device: no memory, no time, whatever its size."""
    with torch.device("meta"):
        model = Model(model_cfg)
    return model.n_params(), model.n_params(embeddings=False), float(model.flops_per_token(model_cfg.context_length))


def read_plan(path) -> dict:
    """The settings of a TOML experiment file, or of the experiment.json an experiment saves beside its runs."""
    path = Path(path)
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as e:
        raise ExperimentError(f"cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ExperimentError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


@dataclass
class Experiment:
    name: str
    base: str  # a preset, or a trained model (its configs)
    budget: Budget
    variants: dict[str, dict]  # the first is the baseline
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_data: str = EVAL_DATA_DEFAULT
    train: dict = field(default_factory=dict)  # shared TrainConfig fields
    model: dict = field(default_factory=dict)  # shared ModelConfig fields
    lr_grid: list[float] | None = None
    grid_seeds: str = "first"  # first: seed 0 on the grid, the others at its best rate; all: every seed at every rate
    grid_extend: int = 0  # rates a variant's grid may grow by, per side, while its best rate is at an edge
    sizes: list[dict] | None = None  # model (and train, and budget) overrides per size
    threads: int | None = None  # CPU threads per run (runs of one study should share it)
    slurm: dict = field(default_factory=dict)  # submitit parameters (timeout_min, slurm_partition, gpus_per_node, ...)

    @classmethod
    def from_dict(cls, values: dict, where: str = "the experiment") -> "Experiment":
        for key in values:
            if key not in KEYS:
                raise ExperimentError(f"{where}: unknown key {key!r}{closest(key, KEYS)}; keys: {', '.join(KEYS)}")
        for key in ("name", "base", "budget", "variants"):
            if key not in values:
                raise ExperimentError(f"{where} has no {key!r}: see experiments/ for examples")
        for key in ("train", "model", "slurm"):
            if not isinstance(values.get(key, {}), dict):
                raise ExperimentError(f"{where}: {key} must be a table ([{key}] with field = value lines)")
        if not isinstance(values["variants"], dict) or not all(isinstance(v, dict)
                                                               for v in values["variants"].values()):
            raise ExperimentError(f"{where}: variants must be a table of tables, "
                                  f"e.g. layernorm = {{ norm = \"layernorm\" }}")
        seeds = values.get("seeds", [0, 1, 2])
        seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
        sizes = values.get("sizes")
        if sizes is not None:
            sizes = size_list(sizes)
        experiment = cls(name=values["name"], base=values["base"], budget=Budget.parse(values["budget"]),
                         variants={k: dict(v) for k, v in values["variants"].items()}, seeds=seeds,
                         eval_data=values.get("eval_data", EVAL_DATA_DEFAULT), train=dict(values.get("train", {})),
                         model=dict(values.get("model", {})), lr_grid=values.get("lr_grid"),
                         grid_seeds=values.get("grid_seeds", "first"), grid_extend=values.get("grid_extend", 0),
                         sizes=sizes, threads=values.get("threads"), slurm=dict(values.get("slurm", {})))
        experiment.check()
        return experiment

    @classmethod
    def from_file(cls, path) -> "Experiment":
        return cls.from_dict(read_plan(path), str(path))

    def to_dict(self) -> dict:
        values = {"name": self.name, "base": self.base, "seeds": self.seeds, "budget": self.budget.to_dict(),
                  "eval_data": self.eval_data, "train": self.train, "model": self.model, "variants": self.variants}
        values.update({k: v for k, v in (("lr_grid", self.lr_grid), ("sizes", self.sizes), ("threads", self.threads),
                                          ("slurm", self.slurm)) if v})
        if self.grid_seeds != "first":
            values["grid_seeds"] = self.grid_seeds
        if self.grid_extend:
            values["grid_extend"] = self.grid_extend
        return values

    def check(self):
        """Every setting of every run is valid: fail before the first step, not at the fourth run."""
        names = [("name", n) for n in self.name.split("/")] + [("variant", v) for v in self.variants]
        for what, name in names:
            if not PLAIN_NAME.fullmatch(name):
                raise ExperimentError(f"{what} {name!r} is not valid: use letters, digits and . _ - + =")
        if not self.variants:
            raise ExperimentError("the experiment has no variants: add [variants] with at least a baseline = {}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ExperimentError(f"seeds={self.seeds!r} is not valid: a count (3) or distinct seeds ([0, 1, 2])")
        if self.lr_grid is not None:
            if not isinstance(self.lr_grid, list) or not self.lr_grid or \
                    not all(isinstance(r, (int, float)) and r > 0 for r in self.lr_grid):
                raise ExperimentError(f"lr_grid={self.lr_grid!r} is not valid: positive rates, e.g. [5e-4, 1e-3, 2e-3]")
            self.lr_grid = sorted(float(r) for r in self.lr_grid)
            setting_lr = [v for v, values in self.variants.items() if "lr" in values]
            if setting_lr or "lr" in self.train:
                raise ExperimentError(f"{'variant ' + setting_lr[0] if setting_lr else '[train]'} sets lr, which "
                                      f"lr_grid chooses: drop one of them")
        if self.grid_seeds not in GRID_SEEDS:
            raise ExperimentError(f"grid_seeds={self.grid_seeds!r} is not valid; "
                                  f"choose one of: {', '.join(GRID_SEEDS)}")
        if self.grid_seeds != "first" and not self.lr_grid:
            raise ExperimentError("grid_seeds is about lr_grid: give lr_grid too, or drop grid_seeds")
        if not (isinstance(self.grid_extend, int) and not isinstance(self.grid_extend, bool) and self.grid_extend >= 0):
            raise ExperimentError(f"grid_extend={self.grid_extend!r} is not valid: a count of rates, 0 or more")
        if self.grid_extend and len(self.lr_grid or []) < 2:
            raise ExperimentError("grid_extend grows lr_grid by its own spacing: give lr_grid at least two rates")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads > 0):
            raise ExperimentError(f"threads={self.threads!r} is not valid: a positive integer")
        for table, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
            for key in getattr(self, table):
                if key not in fields:
                    raise ExperimentError(f"[{table}] has no field {key!r}{closest(key, fields)}: "
                                          f"{'ModelConfig' if table == 'model' else 'TrainConfig'} fields go there")
        for size in self.sizes or [{}]:
            for variant in self.variants:
                self.run(size_label(size), variant, self.seeds[0], self.lr_grid[0] if self.lr_grid else None)

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))

    @property
    def folder(self) -> Path:
        return checkpoint.TRAINED / self.name

    @property
    def size_labels(self) -> list[str]:
        return [size_label(s) for s in self.sizes] if self.sizes else [""]

    def size_overrides(self, label: str) -> dict:
        """The size's field overrides (its budget, if it has one, apart: see size_budget)."""
        size = next((s for s in self.sizes if size_label(s) == label), {}) if self.sizes else {}
        return {k: v for k, v in size.items() if k not in BUDGETS}

    def size_budget(self, label: str) -> Budget:
        """The size's own budget ("dim=64,tokens=5e5"), else the experiment's."""
        size = next((s for s in self.sizes if size_label(s) == label), {}) if self.sizes else {}
        kinds = [k for k in size if k in BUDGETS]
        if len(kinds) > 1:
            raise ExperimentError(f"size {label!r} gives two budgets ({', '.join(kinds)}): keep one")
        return Budget(kinds[0], float(size[kinds[0]])) if kinds else self.budget

    @functools.cached_property
    def base_configs(self) -> tuple[dict, dict]:
        """(model fields, train fields) of the base: a preset with config.py's train defaults, or a
        trained model's saved configs."""
        if self.base in PRESETS:
            return dict(PRESETS[self.base]), TrainConfig().to_dict()
        folder = checkpoint.TRAINED / self.base
        if not (folder / MODEL_CONFIG).is_file():
            raise ExperimentError(f"base {self.base!r} is neither a preset ({', '.join(PRESETS)}) nor a model under "
                                  f"trained/{closest(self.base, PRESETS)}")
        train_values = read_json(folder / TRAIN_CONFIG) if (folder / TRAIN_CONFIG).is_file() else {}
        train_values = {k: v for k, v in train_values.items() if k in TRAIN_FIELDS}
        # not the records
        model_values = {k: v for k, v in read_json(folder / MODEL_CONFIG).items() if k in MODEL_FIELDS}
        return underived(model_values), {**TrainConfig().to_dict(), **train_values}

    def settings(self, size: str, overrides: dict, where: str) -> tuple[dict, dict]:
        """(model fields, train fields) in the order base, [model]/[train], size, then `overrides` (a variant's)."""
        base_model, base_train = self.base_configs
        size_model, size_train = split_fields(self.size_overrides(size), "sizes")
        variant_model, variant_train = split_fields(overrides, where)
        model_values = {**base_model, **self.model, **size_model, **variant_model}
        train_values = {**base_train, **self.train, **size_train, **variant_train}
        chosen = {**self.model, **size_model, **variant_model}
        if "vocab_size" not in chosen and (self.base in PRESETS
                                           or train_values["tokenizer"] != base_train["tokenizer"]):
            model_values["vocab_size"] = vocab_size_of(train_values["tokenizer"])  # as train.py: follow the tokenizer
        return model_values, train_values

    def reference(self, size: str) -> tuple[dict, dict]:
        """The configs before any variant (model fields derived), which variants are described against."""
        model_values, train_values = self.settings(size, {}, "the base")
        return ModelConfig.from_dict(model_values).to_dict(), train_values

    def run(self, size: str, variant: str, seed: int, lr: float | None = None) -> Run:
        """The run of this size, variant, seed (and grid rate); the budget sets its steps."""
        where = f"variant {variant}" + (f" at size {size}" if size else "")
        model_values, train_values = self.settings(size, self.variants[variant], where)
        if lr is not None:  # the decayed rate keeps the base's ratio to the peak
            train_values["min_lr"] = lr * train_values["min_lr"] / train_values["lr"]
            train_values["lr"] = lr
        parts = [self.name, size, variant, f"lr{lr:g}" if lr is not None else "", f"seed{seed}"]
        train_values.update(name="/".join(p for p in parts if p), seed=seed)
        try:
            model_cfg = ModelConfig.from_dict(model_values)
            params, params_without_embeddings, flops_per_token = cost(model_cfg)
            tokens_per_step = train_values["batch_size"] * train_values["grad_accum"] * model_cfg.context_length
            budget = self.size_budget(size)
            train_values["max_steps"] = budget.max_steps(tokens_per_step, flops_per_token, train_values["max_steps"])
            if budget.kind == "minutes":
                train_values["max_minutes"] = budget.amount
            train_cfg = TrainConfig.from_dict(train_values)
        except ConfigError as e:
            raise ExperimentError(f"{where}: {e}") from None
        return Run(train_cfg.name, size, variant, seed, lr, model_cfg, train_cfg, params, params_without_embeddings,
                   flops_per_token)

    def grid(self, size: str, variant: str) -> list[float]:
        """The variant's rates: lr_grid, grown by the grid's own spacing beyond an edge whose rate was best
        (once every run of the grid so far has ended), at most grid_extend rates per side."""
        rates, grown = list(self.lr_grid), {"up": 0, "down": 0}
        while True:
            scores = self.grid_scores(size, variant, rates)
            if scores is None or not math.isfinite(min(scores)):
                return rates
            best = scores.index(min(scores))
            if best == len(rates) - 1 and grown["up"] < self.grid_extend:
                rates.append(rates[-1] * self.lr_grid[-1] / self.lr_grid[-2])
                grown["up"] += 1
            elif best == 0 and len(rates) > 1 and grown["down"] < self.grid_extend:
                rates.insert(0, rates[0] * self.lr_grid[0] / self.lr_grid[1])
                grown["down"] += 1
            else:
                return rates

    def grid_scores(self, size: str, variant: str, rates: list[float]) -> list[float] | None:
        """Validation bits per byte at each rate, on the first seed or (grid_seeds "all") averaged over
        the seeds; a diverged run counts as the worst (inf). None until every one of these runs has ended."""
        results = [[self.run(size, variant, seed, lr).result() for lr in rates] for seed in self.grid_seed_list]
        if any(r is None for per_seed in results for r in per_seed):
            return None
        return [sum(per_seed[i]["val_bpb"] if per_seed[i]["status"] == "finished" else math.inf
                    for per_seed in results) / len(results) for i in range(len(rates))]

    def grid_runs(self, size: str, variant: str, seed: int | None = None) -> list[Run]:
        """The runs at every rate of the variant's grid of one seed (the first by default)."""
        return [self.run(size, variant, self.seeds[0] if seed is None else seed, lr)
                for lr in self.grid(size, variant)]

    @property
    def grid_seed_list(self) -> list[int]:
        return self.seeds if self.grid_seeds == "all" else self.seeds[:1]

    @property
    def all_rates(self) -> list[float]:
        """Every rate some variant's grid holds, low to high."""
        if not self.lr_grid:
            return []
        return sorted({lr for size in self.size_labels for name in self.variants for lr in self.grid(size, name)})

    def best_lr(self, size: str, variant: str) -> float | None:
        """The grid's rate with the lowest final validation bits per byte (see grid_scores). None until
        every grid run has ended (a grown grid included), or when all diverged."""
        rates = self.grid(size, variant)
        scores = self.grid_scores(size, variant, rates)
        if scores is None or not math.isfinite(min(scores)):
            return None
        return rates[scores.index(min(scores))]

    def verdict_runs(self, size: str, variant: str) -> list[Run]:
        """The runs the verdict compares: every seed, at the grid's best rate when there is a grid
        ([] while that rate is unknown)."""
        if not self.lr_grid:
            return [self.run(size, variant, seed) for seed in self.seeds]
        lr = self.best_lr(size, variant)
        return [] if lr is None else [self.run(size, variant, seed, lr) for seed in self.seeds]

    def runs(self) -> list[Run]:
        """Every run whose settings are known now: with a grid, the grid first, then the other seeds
        at each variant's best rate once its grid has ended."""
        runs = []
        for size in self.size_labels:
            for variant in self.variants:
                grid = [r for seed in self.grid_seed_list for r in self.grid_runs(size, variant, seed)] \
                    if self.lr_grid else []
                runs += grid + [r for r in self.verdict_runs(size, variant) if r.name not in {g.name for g in grid}]
        return runs


# --- one run ---

def run_spec(run: Run, eval_data: str, threads: int | None, command: str | None, progress_bar: bool) -> dict:
    """What a worker needs to train and score one run: plain JSON, for subprocesses and submitit."""
    return {"name": run.name, "model": run.model.to_dict(), "train": run.train.to_dict(), "eval_data": eval_data,
            "threads": threads, "command": command, "progress_bar": progress_bar,
            "trained_dir": str(checkpoint.TRAINED), "data_cache": str(data.CACHE),
            "cost": {"params": run.params, "params_without_embeddings": run.params_without_embeddings,
                     "flops_per_token": run.flops_per_token},
            "where": {"size": run.size, "variant": run.variant, "seed": run.seed, "lr": run.lr}}


def execute_run(spec: dict) -> dict:
    """Train one run to its end (resuming it when it has a checkpoint), score it on the held-out text,
    write its result.json and return it. The same function for every executor."""
    checkpoint.TRAINED, data.CACHE = Path(spec["trained_dir"]), Path(spec["data_cache"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model_cfg, train_cfg = ModelConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"])
    out = checkpoint.TRAINED / train_cfg.name
    resume = (out / STATE).is_file()
    status, message = "finished", None
    try:
        train(model_cfg, train_cfg, resume=resume, overwrite=not resume, command=spec["command"],
              progress_bar=spec["progress_bar"])
    except DivergedError as e:
        status, message = "diverged", str(e)
    except trainer.Interrupted:  # a signal: the run saved a checkpoint and stopped
        raise Interrupted(f"{train_cfg.name} stopped before its step {train_cfg.max_steps}: run the same command "
                          f"again to resume") from None
    except (TrainError, LoadError) as e:
        if not resume:
            raise
        raise ExperimentError(f"{e} (or delete trained/{train_cfg.name} to start that run again)") from None
    # A run that diverged before its first checkpoint leaves no folder (the trainer removes it): record it anyway.
    log = pd.read_csv(out / LOG) if (out / LOG).is_file() else pd.DataFrame(columns=LOG_COLUMNS)
    if status == "finished" and not reached_end(log, train_cfg):
        raise Interrupted(f"{train_cfg.name} stopped before its step {train_cfg.max_steps}: run the same command "
                          f"again to resume")
    device = pick_device(train_cfg.device, Distributed())
    result = {"name": train_cfg.name, **spec["where"], "status": status, "message": message, **spec["cost"],
              **last_logged(log), "eval_data": spec["eval_data"], "threads": torch.get_num_threads(),
              "device": device_name(device), "torch": torch.__version__, "model": spec["model"], "train": spec["train"]}
    if status == "finished":
        result.update(score_held_out(out, train_cfg, spec["eval_data"], device))
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / RESULT, lambda p: p.write_text(json.dumps(result, indent=2)))
    return result


def reached_end(log: pd.DataFrame, cfg: TrainConfig) -> bool:
    """Whether the run trained to its end: its last step, or its time limit (the last row is written
    at the step that reached it; elapsed_s is rounded to milliseconds)."""
    if not len(log):
        return False
    last = log.iloc[-1]
    return int(last["step"]) >= cfg.max_steps or (
        cfg.max_minutes is not None and float(last["elapsed_s"]) >= cfg.max_minutes * 60 - 1e-3)


def last_logged(log: pd.DataFrame) -> dict:
    """Steps, tokens and training time from the last log row; the last validation bits per byte."""
    if not len(log):
        return {"steps": 0, "tokens": 0, "elapsed_s": 0.0, "val_bpb": None}
    val = log.dropna(subset=["val_bpb"])
    return {"steps": int(log["step"].iloc[-1]), "tokens": int(log["tokens_seen"].iloc[-1]),
            "elapsed_s": float(log["elapsed_s"].iloc[-1]),
            "val_bpb": float(val["val_bpb"].iloc[-1]) if len(val) else None}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=4)
def held_out_documents(spec: str) -> tuple[str, ...]:
    return tuple(read_documents(spec))


def score_held_out(out: Path, cfg: TrainConfig, eval_data: str, device) -> dict:
    """The trained model on the held-out text: every token scored once, bits per byte."""
    model, _ = load_checkpoint(out, device)
    tokenizer = load_tokenizer(cfg.tokenizer)
    batches = text_batches(tokenizer, list(held_out_documents(eval_data)), model.cfg.context_length, cfg.batch_size)
    scores = score(model, batches, token_byte_lengths(tokenizer, model.cfg.vocab_size), device)
    return {"eval_loss": scores.loss, "eval_bpb": scores.bits_per_byte, "eval_tokens": scores.tokens,
            "eval_bytes": scores.bytes}


# --- a lean study to keep ---

def prune(experiment: Experiment, echo=print, keep_weights: bool = True) -> tuple[list[str], int]:
    """Make a study small enough to commit, also half way through: every run that has ended keeps its
    configs, command, logs, stability figures, provenance and result (all the report reads) and loses its
    training state; weights stay for one run per variant only, the first seed at the variant's chosen
    rate whose weights are still there, stored in bfloat16 (half the bytes; loaded back into float32).
    A variant whose rate is not chosen yet keeps none, and none at all without keep_weights (studies read
    only for their report); runs that have not ended are not touched, so the study resumes as before.
    Returns (the runs that keep weights, bytes freed)."""
    keep = set()
    for size in experiment.size_labels if keep_weights else []:
        for name in experiment.variants:
            chosen = [r for r in experiment.verdict_runs(size, name)
                      if (r.folder / WEIGHTS).is_file() and (r.result() or {}).get("status") == "finished"]
            keep.update(r.name for r in chosen[:1])
    freed = 0
    for run in experiment.runs():
        state, weights = run.folder / STATE, run.folder / WEIGHTS
        if run.result() is None:
            continue
        if state.is_file():
            freed += state.stat().st_size
            state.unlink()
        if not weights.is_file():
            continue
        before = weights.stat().st_size
        if run.name in keep:
            tensors, metadata = load_state_dict_file(weights)
            if any(t.dtype != torch.bfloat16 for t in tensors.values()):
                half = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in tensors.items()}
                write_atomically(weights, lambda p: save_file(half, str(p), metadata=metadata))
        else:
            weights.unlink()
        freed += before - (weights.stat().st_size if weights.is_file() else 0)
    echo(f"{experiment.name}: weights kept (bfloat16) for {len(keep)} run(s)"
         f"{': ' + ', '.join(sorted(keep)[:4]) if keep else ''}{' ...' if len(keep) > 4 else ''}; "
         f"{freed / 1e6:.1f} MB freed")
    return sorted(keep), freed


# --- many runs ---

def check_settings(run: Run):
    """Refuse to mix results: a run folder trained with other settings than the plan's is an error."""
    result = run.result()
    if result is not None:
        saved_model, saved_train = result["model"], result["train"]
    elif (run.folder / MODEL_CONFIG).is_file() and (run.folder / TRAIN_CONFIG).is_file():
        saved_model, saved_train = read_json(run.folder / MODEL_CONFIG), read_json(run.folder / TRAIN_CONFIG)
    else:
        return
    planned = {**run.model.to_dict(), **run.train.to_dict()}
    saved = {**saved_model, **saved_train}
    changed = [k for k in planned if k not in RUN_ONLY and k in saved and saved[k] != planned[k]]
    if changed:
        k = changed[0]
        raise ExperimentError(f"trained/{run.name} was trained with {k}={saved[k]!r}, the plan now says "
                              f"{planned[k]!r}: delete that folder or give the experiment another name")


def run_experiment(experiment: Experiment, parallel: int = 1, executor: str | None = None, command: str | None = None,
                   progress_bar: bool = True, echo=print):
    """Run every run that has not ended: in this process one after another (the default), in `parallel`
    subprocesses, or through submitit (executor "slurm", or "local" to try that path on this machine).
    With a grid this takes two rounds: the grid, then the other seeds at the rates it chose."""
    experiment.folder.mkdir(parents=True, exist_ok=True)
    write_atomically(experiment.folder / PLAN, lambda p: p.write_text(json.dumps(experiment.to_dict(), indent=2)))
    while True:
        runs = experiment.runs()
        for run in runs:
            check_settings(run)
        pending = [r for r in runs if r.result() is None]
        if not pending:
            return
        echo(f"{experiment.name}: {len(pending)} run(s) to go" + (f", {parallel} at a time" if parallel > 1 else ""))
        threads = experiment.threads
        if executor is not None:
            specs = [run_spec(r, experiment.eval_data, threads, command, False) for r in pending]
            run_with_submitit(specs, executor, experiment.folder / "submitit", experiment.slurm, echo)
        elif parallel > 1:
            threads = threads or max(1, (os.cpu_count() or 1) // parallel)
            specs = [run_spec(r, experiment.eval_data, threads, command, False) for r in pending]
            run_in_subprocesses(specs, parallel, experiment.folder / "logs", echo)
        else:
            for run in pending:
                result = execute_run(run_spec(run, experiment.eval_data, threads, command, progress_bar))
                echo(outcome(result))


def outcome(result: dict) -> str:
    if result["status"] == "diverged":
        return f"{result['name']}: diverged ({result['message']})"
    return f"{result['name']}: held-out {result['eval_bpb']:.4f} bits per byte after {result['steps']} steps"


def worker_environment(slot: int, threads: int, gpus: int) -> dict:
    """A subprocess's environment: its share of the CPU threads, and one GPU per slot when there are GPUs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": python_path()}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def python_path() -> str:
    return os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


def run_in_subprocesses(specs: list[dict], parallel: int, log_folder: Path, echo):
    """`parallel` runs at a time, each `python -m toolkit.experiment SPEC` with its own slot (a GPU, or
    a share of the CPU threads); output goes to log_folder. Ctrl+C, SIGTERM and SIGHUP reach the runs
    through this process alone (they run in their own sessions), so each run gets the signal once: it
    saves and stops, and no new run starts. The same signal again is passed on again (a second Ctrl+C
    makes the runs quit at once). A runner started in the background, where Ctrl+C is ignored, still
    stops on `kill -INT` or `kill`."""
    log_folder.mkdir(parents=True, exist_ok=True)
    wants_gpu = any(s["train"]["device"].split(":")[0] in ("auto", "cuda") for s in specs)
    gpus = torch.cuda.device_count() if wants_gpu and torch.cuda.is_available() else 0
    slots = queue.Queue()
    for slot in range(parallel):
        slots.put(slot)
    live, lock, stopping = set(), threading.Lock(), threading.Event()

    def work(spec):
        slot = slots.get()
        try:
            log = log_folder / (spec["name"].replace("/", "__") + ".log")
            with lock:
                if stopping.is_set():
                    return None, log
                with open(log, "w") as f:
                    process = subprocess.Popen([sys.executable, "-m", "toolkit.experiment", json.dumps(spec)],
                                               cwd=ROOT, env=worker_environment(slot, spec["threads"], gpus),
                                               stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                live.add(process)
            code = process.wait()
            with lock:
                live.discard(process)
            return code, log
        finally:
            slots.put(slot)

    def pass_on(signum, frame):
        with lock:
            for process in live:
                process.send_signal(signum)
            first = not stopping.is_set()
            stopping.set()
        if first:
            raise Interrupted("run the same command again to resume")

    failures, handlers = [], {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        handlers = {sig: signal.signal(sig, pass_on) for sig in trainer.STOP_SIGNALS}
    try:
        with ThreadPoolExecutor(parallel) as pool:
            futures = {pool.submit(work, spec): spec for spec in specs}
            try:
                for future, spec in futures.items():
                    code, log = future.result()
                    if code == 0:
                        echo(outcome(read_json(checkpoint.TRAINED / spec["name"] / RESULT)))
                    elif code is not None:
                        failures.append(f"{spec['name']} (exit {code}; see {log})")
            except (Interrupted, KeyboardInterrupt):  # the runs got the signal: wait while they save and stop
                pool.shutdown(wait=True, cancel_futures=True)
                raise Interrupted("run the same command again to resume") from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failures:
        raise ExperimentError(f"{len(failures)} run(s) failed: {'; '.join(failures)}")


@contextmanager
def importable_here():
    """Jobs started while inside import this project (submitit pickles execute_run by reference)."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = python_path()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous


def run_with_submitit(specs: list[dict], cluster: str, folder: Path, parameters: dict, echo):
    """One submitit job per run (Slurm, or submitit's local executor), then wait for all of them."""
    try:
        import submitit
    except ImportError:
        raise ExperimentError("--executor needs the submitit package: pip install submitit") from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:  # e.g. no srun: not on a Slurm cluster
        raise ExperimentError(f"--executor={cluster}: {str(e).splitlines()[0]} Run this on the cluster's login "
                              f"node, or leave --executor out to run here") from None
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"[slurm] settings: {str(e).splitlines()[0]}") from None
    with importable_here():
        jobs = [executor.submit(execute_run, spec) for spec in specs]
    echo(f"submitted {len(jobs)} job(s) to {cluster}: {', '.join(job.job_id for job in jobs)}; logs in {folder}")
    failures = []
    for job, spec in zip(jobs, specs):
        try:
            echo(outcome(job.result()))
        except Exception as e:  # submitit re-raises the job's failure with its traceback as text
            last = [line for line in str(e).strip().splitlines() if line.strip()]
            failures.append(f"{spec['name']} ({last[-1].strip() if last else type(e).__name__})")
    if failures:
        raise ExperimentError(f"{len(failures)} job(s) failed: {'; '.join(failures)}; logs in {folder}")


def main(argv=None):
    """Entry point of one run in a subprocess: the spec as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m toolkit.experiment SPEC_JSON (experiment.py starts these)")
    from toolkit.data import DataError
    from toolkit.tokenizer import TokenizerError
    try:
        print(outcome(execute_run(json.loads(argv[0]))))
    except Interrupted as e:
        sys.exit(f"stopped: {e}")
    except (ExperimentError, ConfigError, DataError, LoadError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
