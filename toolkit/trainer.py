"""The training loop. `train()` reads as its list of steps; each step is a function below.

One process, or many under torchrun (DDP, or FSDP2 with train.fsdp): only rank 0 writes, every rank
reads its own slice of each global batch, and gradients are synchronised once per optimizer step.

No work is lost and nothing blocks a rerun: trained/NAME is prepared only once data and model are
ready, and what this invocation created there is removed again if it fails before its first
checkpoint. SIGINT (Ctrl+C), SIGTERM and SIGHUP finish the current step, save a checkpoint and raise
Interrupted (train.py exits with 128 + the signal's number); a second Ctrl+C quits at once, except
during a save, which no signal interrupts. Timing counts training alone: evaluation and saving have
their own totals.
"""
import csv
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from config import ModelConfig, TrainConfig, require
from modules.model import Model
from toolkit import checkpoint
from toolkit.checkpoint import (
    MODEL_CONFIG,
    TRAIN_CONFIG,
    WEIGHTS,
    check_tokenizer,
    load_state_dict_file,
    read_json,
    read_model_config,
    save_configs,
    save_model,
    unwrap,
    weights_metadata,
    write_atomically,
)
from toolkit.cli import safe
from toolkit.data import (
    Batches,
    TokenData,
    check_same_data,
    data_record,
    prepare_data,
    validation_batches,
)
from toolkit.metrics import autocast, score, token_byte_lengths
from toolkit.optim import make_optimizer, set_learning_rate
from toolkit.provenance import DIFF_PATTERN, PROVENANCE, append_session, session_record
from toolkit.schedule import learning_rate
from toolkit.stability import StabilityLog
from toolkit.tokenizer import load_tokenizer

STATE = "training_state.pt"
PENDING_WEIGHTS = WEIGHTS + ".next"  # a save's weights until its training state is written (see save_checkpoint)
LOG = "log_data.csv"
COMMAND = "command.txt"
RUN_FILES = (WEIGHTS, MODEL_CONFIG, TRAIN_CONFIG, STATE, PENDING_WEIGHTS, LOG, COMMAND, PROVENANCE)
LOG_COLUMNS = ["step", "tokens_seen", "elapsed_s", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm",
               "tokens_per_s", "mfu", "eval_elapsed_s", "save_elapsed_s"]  # mfu: on a GPU of PEAK_BF16_FLOPS
# Dense bf16 peaks from the spec sheets, matched by the first key found in torch's device name (so the
# PCIe and NVL cards of the H100 come before the SXM figure that "H100" alone gets).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L4": 121e12, "A10": 125e12, "4090": 165e12}
STOP_SIGNALS = {signal.SIGINT: "Ctrl+C (SIGINT)", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message is one line that says what to do."""


class DivergedError(TrainError):
    """The loss became NaN or infinite: the run stopped (an experiment records it as diverged)."""


class Interrupted(Exception):
    """A signal stopped the run; the message says whether a checkpoint was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what shells report for a process a signal ended: 130 for Ctrl+C


@dataclass
class Progress:
    """Where a run stands; saved in the training state so that a resumed run continues exactly."""
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time only
    eval_elapsed_s: float = 0.0
    save_elapsed_s: float = 0.0
    interval_loss: float = 0.0  # sum of step losses since the last log row (averaged over processes when saved)
    interval_steps: int = 0


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0


@dataclass
class Run:
    """What one invocation of train() works with."""
    cfg: TrainConfig
    env: Distributed
    device: torch.device
    out: Path
    model: Model  # the plain model
    wrapped: nn.Module  # what the loop calls: the model inside DDP/FSDP and torch.compile
    optimizer: torch.optim.Optimizer
    batches: Batches
    val_set: list
    byte_lengths: torch.Tensor
    progress: Progress
    end: int  # the step this session stops at
    command: str | None
    settings: dict  # train_config.json: the settings, the data as a portable spec and its sha256
    tokenizer: object
    record: dict | None = None  # this session's provenance (rank 0), written with its first checkpoint
    checkpoint_step: int | None = None  # the step of the newest checkpoint on disk
    saved: bool = False  # whether this session has saved a checkpoint
    stability: StabilityLog | None = None  # stability.csv, made when the loop starts

    @property
    def tokens_per_step(self) -> int:
        return self.batches.global_batch * self.model.cfg.context_length


def shown(path: Path) -> str:
    """`path` as the user knows it: relative to the working directory (trained/NAME) when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def say(message: str):
    """Print to stderr; a closed pipe or terminal must not stop the run."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# --- the run ---

def train(model_cfg: ModelConfig, cfg: TrainConfig, resume=False, overwrite=False, stop_at: int | None = None,
          command: str | None = None, progress_bar=True) -> Path:
    """Train `model_cfg` as `cfg` says into trained/NAME; returns that folder. Bad input raises a one-line
    error before any work; a signal saves a checkpoint and raises Interrupted."""
    out = checkpoint.TRAINED / cfg.name
    check_stop_at(stop_at)
    check_output(out, resume, overwrite)
    with StopRequest(out) as stop:
        env = setup_distributed(cfg.device)
        try:
            run = build_run(model_cfg, cfg, env, out, resume, stop_at, command, progress_bar)
            with run_folder(run, fresh=not resume):
                loop(run, stop, progress_bar)
            if env.world_size > 1:  # every process past its last collective before the group goes away
                dist.barrier()
        finally:
            if env.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()
    return out


def build_run(model_cfg, cfg, env, out, resume, stop_at, command, progress_bar) -> Run:
    """Tokenizer, data, model, optimizer and, when resuming, the saved state: all but the run's folder."""
    device = pick_device(cfg.device, env)
    tokenizer = load_tokenizer(cfg.tokenizer)
    settings = {**cfg.to_dict(), **data_record(cfg.data, cfg.max_docs)}
    if resume:  # the run continues only on the data and tokenizer it was trained with
        check_same_data(read_json(out / TRAIN_CONFIG), settings)
        check_tokenizer(shown(out), read_model_config(out)[1], tokenizer)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"vocab_size={model_cfg.vocab_size} is smaller than tokenizer {cfg.tokenizer}'s "
                         f"{tokenizer.vocab_size}: raise vocab_size or pick a smaller tokenizer")
    train_data, val_data = load_data(cfg, tokenizer, env, progress_bar)
    torch.manual_seed(cfg.seed)  # every process builds the same initial model
    model = Model(model_cfg).to(device)
    seq_len = model_cfg.context_length
    batches = Batches(train_data, seq_len, cfg.batch_size, cfg.seed, cfg.grad_accum, env.rank, env.world_size,
                      cfg.doc_masking, cfg.shift_windows)
    # eval_batches global batches (so the set does not depend on how a batch is spread over processes),
    # run batch_size sequences at a time.
    val_set = validation_batches(val_data, seq_len, cfg.batch_size, cfg.eval_batches * batches.global_batch,
                                 cfg.doc_masking)
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs between processes
    wrapped = wrap_model(model, cfg, env, device)
    optimizer = make_optimizer(model, cfg, device)  # after sharding: FSDP replaces the parameters
    run = Run(cfg, env, device, out, model, wrapped, optimizer, batches, val_set,
              token_byte_lengths(tokenizer, model_cfg.vocab_size), Progress(), cfg.max_steps, command, settings,
              tokenizer)
    if resume:
        load_training_state(run)
        check_resumable(run, stop_at)
    run.end = min(stop_at or cfg.max_steps, cfg.max_steps)
    if env.is_main:
        run.record = session_record(cfg, tokenizer, device, env.world_size, run.progress.step, command)
        if not resume and cfg.warmup_steps >= cfg.max_steps:
            say(warmup_note(cfg))
    return run


def warmup_note(cfg: TrainConfig) -> str:
    """What a warmup as long as the run does to the rate (a short trial run keeps the default warmup)."""
    peak = learning_rate(cfg.max_steps - 1, cfg)
    return (f"note: warmup_steps={cfg.warmup_steps} >= max_steps={cfg.max_steps}: the rate rises all run, to "
            f"{peak:.3g} (lr={cfg.lr:g}), and never decays; lower --warmup_steps for the whole schedule")


def loop(run: Run, stop: "StopRequest", progress_bar: bool):
    """Step until run.end or a signal; log, evaluate and save on schedule."""
    log = RunLog(run.out, run.checkpoint_step, run.cfg.tensorboard, run.env.is_main)
    run.stability = StabilityLog(run.out, run.model, run.optimizer, run.checkpoint_step, run.env.is_main)
    bar = make_bar(run) if progress_bar and run.env.is_main else None
    meter = Meter(run.progress, run.device)
    time_limit = run.cfg.max_minutes * 60 if run.cfg.max_minutes is not None else math.inf
    stop.phase = "training"
    # The loop ends where at_boundary was told the time was up, so that step is evaluated and saved (a
    # resumed run may have used its minutes already).
    out_of_time = run.progress.elapsed_s >= time_limit
    try:
        while run.progress.step < run.end and not out_of_time:
            lr = learning_rate(run.progress.step, run.cfg)
            run.stability.arm(logs_at(run.progress.step + 1, run.cfg))
            run.wrapped, loss, grad_norm = run_step(run, lr)
            meter.add(loss, run.tokens_per_step)
            signum = stop.agreed(run.env)
            # max_minutes counts training time only: the time since the last lap is training
            out_of_time = time_limit < math.inf and any_process(meter.training_seconds() >= time_limit, run.env)
            # A session that stops mid-interval writes no row: the resumed run completes it, so the
            # log reads exactly as an uninterrupted run's.
            at_boundary(run, meter, log, bar, stop, lr, grad_norm, out_of_time,
                        stopping=bool(signum) or out_of_time or run.progress.step == run.end)
            if bar is not None:
                bar.update(1)
            if signum:
                raise Interrupted(signum, f"{STOP_SIGNALS[signum]} at step {run.progress.step}: saved a checkpoint "
                                          f"in {shown(run.out)}; continue it with --resume")
    finally:
        stop.phase = "done"
        if bar is not None:
            bar.close()
        log.close()


# --- setup ---

def check_stop_at(stop_at: int | None) -> int | None:
    if stop_at is not None:
        require(stop_at > 0, "stop_at", stop_at, "must be a positive step number")
    return stop_at


def check_output(out: Path, resume: bool, overwrite: bool):
    """Refuse at once, before any work, what trained/NAME does not allow. Every message says what the
    folder holds, so that it never contradicts another."""
    if resume and overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pick one")
    holds_files = out.is_dir() and any(out.iterdir())
    if (out / STATE).is_file():
        if not resume and not overwrite:
            raise TrainError(f"{shown(out)} already exists: pass --resume to continue it or --overwrite to start again")
        return
    if not holds_files:
        if resume:
            raise TrainError(f"nothing to resume: {shown(out)} holds no run (train without --resume to start one)")
        return
    if resume or not overwrite:
        what = "a model" if (out / WEIGHTS).is_file() else "files"
        raise TrainError(f"{'nothing to resume: ' if resume else ''}{shown(out)} holds {what} but no checkpoint to "
                         f"resume from ({STATE}): pass --overwrite to start again, or choose another --name")


def check_resumable(run: Run, stop_at: int | None):
    step = run.progress.step
    if step >= run.cfg.max_steps:
        raise TrainError(f"{shown(run.out)} already finished its {step} steps: raise --max_steps to train on")
    if stop_at is not None and stop_at <= step:
        raise TrainError(f"--stop_at={stop_at} is not after step {step}, where {shown(run.out)} stands: "
                         f"pass a later step")


def setup_distributed(device_name: str) -> Distributed:
    """Join the torchrun process group when launched by torchrun. On CUDA, NCCL carries the GPU tensors
    and gloo the small CPU ones (loss means, the stop flag), which NCCL alone refuses."""
    if "RANK" not in os.environ:
        return Distributed()
    env = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    backend = "cpu:gloo,cuda:nccl" if pick_device(device_name, env).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return env


def pick_device(name: str, env: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("device=cuda but no CUDA GPU is visible: use --device=cpu")
        if device.index is None:  # set_device needs an index (torch 2.11 refused a bare "cuda")
            device = torch.device("cuda", env.local_rank if env.world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError("device=mps but MPS is not available: use --device=cpu")
    return device


def load_data(cfg: TrainConfig, tokenizer, env: Distributed, progress_bar: bool) -> tuple[TokenData, TokenData]:
    """The train and validation token streams; rank 0 builds the token cache while the others wait."""
    data_dir = None
    if env.is_main:
        data_dir = prepare_data(cfg.data, tokenizer, cfg.text_format, cfg.val_fraction, cfg.max_docs, progress_bar)
    if env.world_size > 1:
        shared = [data_dir]
        dist.broadcast_object_list(shared)
        data_dir = shared[0]
    return TokenData(data_dir, "train"), TokenData(data_dir, "val")


def wrap_model(model: Model, cfg: TrainConfig, env: Distributed, device: torch.device):
    """DDP or FSDP2 across processes, then torch.compile if asked."""
    if env.world_size > 1 and cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (env.world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    elif env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


@contextmanager
def run_folder(run: Run, fresh: bool):
    """trained/NAME for the loop (rank 0 writes): a fresh run replaces any run there and writes its
    configs. If this invocation fails before its first checkpoint, what it created goes again, so the
    same command can run again."""
    created = not run.out.exists()
    if run.env.is_main and fresh:
        clear_run(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        save_configs(run.out, run.model.cfg, run.settings, run.tokenizer)  # the weights follow at the first save
    try:
        yield
    except BaseException:
        if run.env.is_main and fresh and not run.saved:
            clear_run(run.out)
            if created:
                shutil.rmtree(run.out, ignore_errors=True)
        raise


def clear_run(out: Path):
    """Remove a run's files from its folder; anything else there stays."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for path in out.glob(DIFF_PATTERN):
        path.unlink()
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


# --- each step of the loop ---

class Meter:
    """Sums kept on the device between log rows (no host sync per step), and the wall clock split into
    training, evaluation and saving, each with its own total in Progress."""

    def __init__(self, progress: Progress, device: torch.device):
        self.progress = progress
        self.loss_sum = torch.full((), progress.interval_loss, dtype=torch.float64, device=device)
        self.clock = time.perf_counter()
        self.row_seconds, self.row_steps = 0.0, 0  # training time and steps since the last log row

    def add(self, loss, tokens: int):
        self.loss_sum += loss  # in place into float64: one kernel, no host sync
        self.progress.step += 1
        self.progress.interval_steps += 1
        self.progress.tokens_seen += tokens
        self.row_steps += 1

    def read(self, grad_norm) -> tuple[float, float]:
        """(loss sum, the last step's gradient norm), waiting for the device once."""
        loss_sum, grad_norm = torch.stack([self.loss_sum, grad_norm.double()]).tolist()
        return loss_sum, grad_norm

    def training_seconds(self) -> float:
        """Training time so far: the total at the last lap and the time since (which is training)."""
        return self.progress.elapsed_s + time.perf_counter() - self.clock

    def lap(self, total: str) -> float:
        """Seconds since the last lap, added to progress.<total> (elapsed_s, eval_elapsed_s, save_elapsed_s)."""
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        setattr(self.progress, total, getattr(self.progress, total) + seconds)
        if total == "elapsed_s":
            self.row_seconds += seconds
        return seconds

    def new_row(self):
        self.loss_sum.zero_()
        self.progress.interval_steps = 0
        self.row_seconds, self.row_steps = 0.0, 0


def logs_at(step: int, cfg: TrainConfig) -> bool:
    """Whether `step` writes a row to the logs (evaluation steps always do)."""
    return step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps


def at_boundary(run: Run, meter: Meter, log, bar, stop, lr: float, grad_norm, out_of_time: bool, stopping: bool):
    """Log (with validation) and save when the schedule says so, or when this session ends (a run out
    of its max_minutes is evaluated too)."""
    cfg, step = run.cfg, run.progress.step
    evaluate_now = step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time
    log_now = logs_at(step, cfg) or evaluate_now
    save_now = step % cfg.save_every == 0 or stopping
    if not (log_now or save_now):
        return
    train_loss, grad_norm = checked_loss(run, meter, grad_norm)  # waits for the device, so the clock below is true
    meter.lap("elapsed_s")
    if log_now:
        row = {"step": step, "tokens_seen": run.progress.tokens_seen, "lr": lr, "train_loss": train_loss,
               "grad_norm": grad_norm, "elapsed_s": round(run.progress.elapsed_s, 3),
               "tokens_per_s": round(meter.row_steps * run.tokens_per_step / meter.row_seconds, 1)}
        peak = peak_flops(run.device)
        if peak:
            row["mfu"] = round(model_flops_utilization(run.model, row["tokens_per_s"], peak), 4)
        if evaluate_now:
            row["val_loss"], row["val_bpb"] = evaluate(run, meter, bar)
        row["eval_elapsed_s"] = round(run.progress.eval_elapsed_s, 3)
        row["save_elapsed_s"] = round(run.progress.save_elapsed_s, 3)
        log.write(row)
        run.stability.write(step, grad_norm)
        show(bar, row)
        meter.new_row()
    if save_now:
        save(run, meter, bar, stop)


def checked_loss(run: Run, meter: Meter, grad_norm) -> tuple[float, float]:
    """(mean train loss since the last log row over all processes, last gradient norm); stops the run if
    either is not finite. A bad update shows in every later loss, and the last step's in its gradient
    norm, so the checkpoint on disk is always a good one."""
    loss_sum, grad_norm = meter.read(grad_norm)
    train_loss = mean_across_processes(loss_sum / run.progress.interval_steps, run.env)
    if math.isfinite(train_loss) and math.isfinite(grad_norm):
        return train_loss, grad_norm
    what, value = ("loss", train_loss) if not math.isfinite(train_loss) else ("gradient norm", grad_norm)
    advice = "lower --lr or raise --warmup_steps"
    if run.checkpoint_step is None:
        raise DivergedError(f"the {what} became {value} by step {run.progress.step}, before the first checkpoint: "
                         f"nothing was saved; {advice} and train again")
    raise DivergedError(f"the {what} became {value} by step {run.progress.step}: stopped, keeping the last good "
                     f"checkpoint (step {run.checkpoint_step}) in {shown(run.out)}; {advice}, then --resume")


def evaluate(run: Run, meter: Meter, bar) -> tuple[float, float]:
    """Validation loss and bits per byte. Every process scores the whole set, so sharded models run the
    same collectives."""
    with bar_note(bar, "evaluating"), run.stability.measuring_logits():
        scores = score(run.wrapped, run.val_set, run.byte_lengths, run.device)
    run.stability.measure_attention(run.val_set[0], run.device)
    meter.lap("eval_elapsed_s")
    return scores.loss, scores.bits_per_byte


def save(run: Run, meter: Meter, bar, stop):
    """A checkpoint and, with this session's first, its command and provenance. No signal interrupts it."""
    with stop.saving(), bar_note(bar, "saving"):
        # Every process's partial interval, averaged: a resumed run then logs the uninterrupted run's mean.
        run.progress.interval_loss = mean_across_processes(meter.loss_sum.item(), run.env)
        if run.env.is_main and not run.saved:  # first the record, so that no checkpoint exists without it
            record_session(run)
        save_checkpoint(run)
        run.saved, run.checkpoint_step = True, run.progress.step
        stop.checkpoint_step = run.progress.step
    meter.lap("save_elapsed_s")


def record_session(run: Run):
    if run.command:
        with open(run.out / COMMAND, "a") as f:
            f.write(run.command + "\n")
    append_session(run.out, run.record)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on `device`. A GPU gets it from pinned memory: the copy then runs asynchronously (from
    pageable memory it would wait for the queued steps), so the host can queue the next step meanwhile."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, micro_batches, cfg: TrainConfig, env: Distributed, device, lr: float):
    """Forward and backward over the micro-batches (gradients synchronised on the last one only),
    clip, step. Returns (mean loss, gradient norm) as tensors, without waiting for the device."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if cfg.fsdp and env.world_size > 1:
            model.set_requires_gradient_sync(last)
        sync = nullcontext() if last or env.world_size == 1 or cfg.fsdp else model.no_sync()
        with sync:
            with autocast(device):
                _, loss = model(**to_device(batch, device))
            (loss / len(micro_batches)).backward()
        total += loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP gives a DTensor
        grad_norm = grad_norm.full_tensor()
    set_learning_rate(optimizer, lr)  # each parameter group at its own share of the schedule's rate
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches), grad_norm


def run_step(run: Run, lr: float):
    """train_step, falling back to the plain model (with a warning) if torch.compile fails.
    Returns (the model to use from now on, loss, gradient norm)."""
    wrapped, micro_batches = run.wrapped, run.batches.next()
    try:
        return (wrapped, *train_step(wrapped, run.optimizer, micro_batches, run.cfg, run.env, run.device, lr))
    except Exception as e:
        if not run.cfg.compile or not hasattr(wrapped, "_orig_mod"):
            raise
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training without it")
        run.optimizer.zero_grad(set_to_none=True)
        wrapped = wrapped._orig_mod
        return (wrapped, *train_step(wrapped, run.optimizer, micro_batches, run.cfg, run.env, run.device, lr))


def mean_across_processes(value: float, env: Distributed) -> float:
    if env.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / env.world_size


# --- checkpoints ---

def full_state(model, optimizer, cfg: TrainConfig):
    """(model state, optimizer state) gathered in full on rank 0 (FSDP shards them across ranks)."""
    if cfg.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(run: Run):
    """Weights (safetensors) and the training state (optimizer, data position, RNG), both tagged with the
    step. The two files cannot be replaced at once, so a save is a commit: the weights go to
    model.safetensors.next, then the state replaces training_state.pt (the commit), then the weights replace
    model.safetensors. Killed before the commit, the run resumes from the previous checkpoint; after it, resume
    finds the state's weights in model.safetensors.next and finishes the save (load_training_state)."""
    model_state, optimizer_state = full_state(run.wrapped, run.optimizer, run.cfg)
    rngs = [None] * run.env.world_size
    if run.env.world_size > 1:
        dist.all_gather_object(rngs, rng_states())
    else:
        rngs = [rng_states()]
    if run.env.is_main:
        step = run.progress.step
        state = {"step": step, "progress": vars(run.progress).copy(), "optimizer": optimizer_state,
                 "batches": run.batches.state(), "rng": rngs}
        save_model(run.model, run.out, run.settings, state_dict=model_state, metadata={"step": str(step)},
                   weights_file=PENDING_WEIGHTS)
        write_atomically(run.out / STATE, lambda p: torch.save(state, p))
        (run.out / PENDING_WEIGHTS).replace(run.out / WEIGHTS)
    if run.env.world_size > 1:
        dist.barrier()


def finish_interrupted_save(out: Path, step: int):
    """A save killed after its commit left the weights of `step` in model.safetensors.next: move them into
    place. Weights of another step there are from a save killed before its commit: dropped."""
    pending = out / PENDING_WEIGHTS
    if not pending.is_file():
        return
    metadata = weights_metadata(pending)
    if metadata is not None and metadata.get("step") == str(step):
        pending.replace(out / WEIGHTS)
    else:
        pending.unlink()


def load_training_state(run: Run):
    out, env = run.out, run.env
    try:
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the file is damaged
        raise TrainError(f"{out / STATE} cannot be read ({type(e).__name__}): it is damaged; "
                         f"start again with --overwrite") from None
    if env.is_main:
        finish_interrupted_save(out, state["step"])
    if env.world_size > 1:  # the weights are in place before any process reads them
        dist.barrier()
    weights, metadata = load_state_dict_file(out / WEIGHTS)
    if metadata.get("step") != str(state["step"]):
        raise TrainError(f"{out}: the weights (step {metadata.get('step')}) and {STATE} (step {state['step']}) "
                         f"differ, the last save was interrupted; start again with --overwrite")
    if run.model.cfg.tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    if run.cfg.fsdp and env.world_size > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(run.wrapped, weights, options=options)
        set_optimizer_state_dict(run.wrapped, run.optimizer, state["optimizer"], options=options)
    else:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(state["optimizer"])
    run.batches.load_state(state["batches"])
    for key, value in state["progress"].items():
        setattr(run.progress, key, value)
    run.checkpoint_step = run.progress.step
    rng = state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- logging ---

class RunLog:
    """log_data.csv (and TensorBoard if asked), written by rank 0 only. On resume, rows after the
    checkpoint's step are dropped so that the log reads as one uninterrupted run."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool, enabled: bool):
        self.enabled, self.path, self.writer = enabled, out / LOG, None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(out / "tensorboard", purge_step=resume_step)

    def write(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and value != "":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def make_bar(run: Run):
    from tqdm import tqdm
    return tqdm(total=run.cfg.max_steps, initial=run.progress.step, desc=run.cfg.name, dynamic_ncols=True,
                file=safe(sys.stderr))


@contextmanager
def bar_note(bar, what: str):
    """Say in the progress bar what the run is doing besides training (evaluating, saving)."""
    if bar is None:
        yield
        return
    name = bar.desc
    bar.set_description_str(f"{name} ({what})")
    try:
        yield
    finally:
        bar.set_description_str(name)


def show(bar, row: dict):
    if bar is None:
        return
    postfix = {"loss": f"{row['train_loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    if "val_loss" in row:
        postfix["val"] = f"{row['val_loss']:.4f}"
    if "mfu" in row:
        postfix["mfu"] = f"{row['mfu']:.1%}"
    bar.set_postfix(postfix)


def model_flops_utilization(model: Model, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: training FLOPs per second, counted by Model.flops_per_token at the full
    context, over `peak` FLOP/s (the log's and the progress bar's figure; bench.py gpu reports the same)."""
    return model.flops_per_token(model.cfg.context_length) * tokens_per_s / peak


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s from its spec sheet (PEAK_BF16_FLOPS), None when unknown or not a GPU."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


# --- signals ---

class StopRequest:
    """SIGINT (Ctrl+C), SIGTERM and SIGHUP. While setting up they stop at once (there is nothing to
    save); while training the loop finishes its step, saves and raises Interrupted; a second Ctrl+C
    quits at once, except during a save, which no signal interrupts."""

    def __init__(self, out: Path):
        self.out, self.signum, self.phase, self.previous = out, 0, "setup", {}  # phase: setup, training, saving, done
        self.checkpoint_step = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        name = STOP_SIGNALS[signum]
        if self.phase == "setup":
            raise Interrupted(signum, f"{name} before the first step: nothing was saved")
        if self.phase == "training" and self.signum and signum == signal.SIGINT:
            kept = (f"{shown(self.out)} keeps its checkpoint of step {self.checkpoint_step}"
                    if self.checkpoint_step is not None else "nothing was saved")
            raise Interrupted(signum, f"a second Ctrl+C quit at once: {kept}")
        if not self.signum:
            self.signum = signum
            say(f"\n{name}: stopping after this step to save a checkpoint (Ctrl+C again quits at once without saving)")

    @contextmanager
    def saving(self):
        phase, self.phase = self.phase, "saving"
        try:
            yield
        finally:
            self.phase = phase

    def agreed(self, env: Distributed) -> int:
        """The signal any process received (0 for none): every process must stop at the same step."""
        return int(largest_across_processes(self.signum, env))


def largest_across_processes(value: float, env: Distributed) -> float:
    if env.world_size == 1:
        return value
    tensor = torch.tensor([float(value)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def any_process(flag: bool, env: Distributed) -> bool:
    """Whether `flag` holds on any process (so that all of them act on it at the same step)."""
    return bool(largest_across_processes(flag, env))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
