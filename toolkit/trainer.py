"""The training loop. `train()` reads as its list of steps; each step is a function below.

One process, or many under torchrun (DDP, or FSDP2 with train.fsdp): only rank 0 writes, every rank
reads its own slice of each global batch, and gradients are synchronised once per optimizer step.
"""
import csv
import math
import os
import shlex
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from config import ModelConfig, TrainConfig
from modules.model import Model
from toolkit import checkpoint
from toolkit.checkpoint import (MODEL_CONFIG, TRAIN_CONFIG, WEIGHTS, load_state_dict_file, save_configs,
                                save_model, unwrap, write_atomically)
from toolkit.data import Batches, TokenData, prepare_data, validation_batches
from toolkit.metrics import autocast, score, token_byte_lengths
from toolkit.schedule import learning_rate
from toolkit.stability import StabilityLog
from toolkit.tokenizer import load_tokenizer

STATE = "training_state.pt"
LOG = "log_data.csv"
LOG_COLUMNS = ["step", "tokens_seen", "elapsed_s", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm", "tokens_per_s"]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message is one line that says what to do."""


class DivergedError(TrainError):
    """The loss became NaN or infinite: the run stopped (an experiment records it as diverged)."""


@dataclass
class Progress:
    """Where a run stands; saved in the training state so that a resumed run continues exactly."""
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    interval_loss: float = 0.0  # sum of step losses since the last log row
    interval_steps: int = 0


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0


# --- setup ---

def setup_distributed(device_name: str) -> Distributed:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return Distributed()
    env = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if pick_device(device_name, env).type == "cuda" else "gloo"
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
        if device.index is None and env.world_size > 1:
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError("device=mps but MPS is not available: use --device=cpu")
    return device


def prepare_output(out: Path, resume: bool, overwrite: bool):
    """Never overwrite a run silently: resume it, or start again only when told to."""
    exists = out.exists() and any(out.iterdir())
    if resume and not (out / STATE).is_file():
        raise TrainError(f"nothing to resume in {out}: it has no {STATE} (train without --resume to start a run)")
    if exists and not resume and not overwrite:
        raise TrainError(f"{out} already exists: pass --resume to continue it or --overwrite to start again")
    if overwrite and not resume:
        for name in (WEIGHTS, MODEL_CONFIG, TRAIN_CONFIG, STATE, LOG, "command.txt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def make_optimizer(model: Model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: never on norms, biases or embeddings (a tied head
    is the embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


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


# --- checkpoints ---

def full_state(model, optimizer, cfg: TrainConfig):
    """(model state, optimizer state) gathered in full on rank 0 (FSDP shards them across ranks)."""
    if cfg.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(out, model, optimizer, batches, progress, cfg, env):
    """Weights (safetensors) and the training state (optimizer, data position, RNG), both tagged
    with the step so that a mismatched pair is detected on resume."""
    model_state, optimizer_state = full_state(model, optimizer, cfg)
    rngs = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(rngs, rng_states())
    else:
        rngs = [rng_states()]
    if env.is_main:
        state = {"step": progress.step, "progress": vars(progress).copy(), "optimizer": optimizer_state,
                 "batches": batches.state(), "rng": rngs}
        write_atomically(out / STATE, lambda p: torch.save(state, p))
        save_model(unwrap(model), out, cfg.to_dict(), state_dict=model_state, metadata={"step": str(progress.step)})
    if env.world_size > 1:
        dist.barrier()


def load_training_state(out: Path, model, optimizer, batches, progress: Progress, cfg: TrainConfig, env):
    try:
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the file is damaged
        raise TrainError(f"{out / STATE} cannot be read ({type(e).__name__}): it is damaged; "
                         f"start again with --overwrite") from None
    weights, metadata = load_state_dict_file(out / WEIGHTS)
    if metadata.get("step") != str(state["step"]):
        raise TrainError(f"{out}: the weights (step {metadata.get('step')}) and {STATE} (step {state['step']}) "
                         f"differ, the last save was interrupted; start again with --overwrite")
    target = unwrap(model)
    if target.cfg.tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    if cfg.fsdp and env.world_size > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        target.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
    batches.load_state(state["batches"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
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
            writer = csv.DictWriter(f, LOG_COLUMNS)
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


class StopRequest:
    """Ctrl+C (SIGINT) or SIGTERM asks the loop to save and stop at the next step boundary; a second
    Ctrl+C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step: saving a checkpoint (Ctrl+C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, env: Distributed) -> bool:
        """Whether any process was asked to stop (every process must stop at the same step)."""
        return any_process(self.requested, env)


def any_process(flag: bool, env: Distributed) -> bool:
    if env.world_size == 1:
        return flag
    tensor = torch.tensor([float(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# --- the steps of the loop ---

def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches), grad_norm


def mean_across_processes(value: float, env: Distributed) -> float:
    if env.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / env.world_size


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# --- the run ---

def train(model_cfg: ModelConfig, cfg: TrainConfig, resume=False, overwrite=False, stop_at: int | None = None,
          command: str | None = None, progress_bar=True) -> Path:
    """Train `model_cfg` as `cfg` says into trained/NAME; returns that folder."""
    env = setup_distributed(cfg.device)
    device = pick_device(cfg.device, env)
    out = checkpoint.TRAINED / cfg.name
    if env.is_main:
        prepare_output(out, resume, overwrite)
        if command:
            with open(out / "command.txt", "a") as f:
                f.write(command + "\n")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"vocab_size={model_cfg.vocab_size} is smaller than tokenizer {cfg.tokenizer}'s "
                         f"{tokenizer.vocab_size}: raise vocab_size or pick a smaller tokenizer")
    data_dir = None
    if env.is_main:
        data_dir = prepare_data(cfg.data, tokenizer, cfg.text_format, cfg.val_fraction, cfg.max_docs, progress_bar)
    if env.world_size > 1:  # the others wait until rank 0 has built the token cache
        shared = [data_dir]
        dist.broadcast_object_list(shared)
        data_dir = shared[0]
    train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")

    torch.manual_seed(cfg.seed)  # every process builds the same initial model
    model = Model(model_cfg).to(device)
    seq_len = model_cfg.context_length
    batches = Batches(train_data, seq_len, cfg.batch_size, cfg.seed, cfg.grad_accum, env.rank, env.world_size,
                      cfg.doc_masking)
    # eval_batches global batches (so the set does not depend on how a batch is spread over processes),
    # run batch_size sequences at a time.
    val_set = validation_batches(val_data, seq_len, cfg.batch_size, cfg.eval_batches * batches.global_batch,
                                 cfg.doc_masking)
    byte_lengths = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    progress = Progress()
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs between processes
    wrapped = wrap_model(model, cfg, env, device)
    optimizer = make_optimizer(model, cfg, device)  # after sharding: FSDP replaces the parameters
    if resume:
        load_training_state(out, wrapped, optimizer, batches, progress, cfg, env)
    if env.is_main and not resume:
        save_configs(out, model_cfg, cfg.to_dict())  # the weights follow at the first save
    log = RunLog(out, progress.step if resume else None, cfg.tensorboard, env.is_main)
    stability = StabilityLog(out, model, optimizer, progress.step if resume else None, env.is_main)
    time_limit = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf

    tokens_per_step = batches.global_batch * seq_len
    flops_per_step = model.flops_per_token(seq_len) * tokens_per_step
    peak = peak_flops(device)
    end = min(stop_at or cfg.max_steps, cfg.max_steps)
    bar = None
    if env.is_main and progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=progress.step, desc=cfg.name, dynamic_ncols=True)
    loss_sum = torch.full((), progress.interval_loss, dtype=torch.float64, device=device)
    session_start, previous_elapsed = time.perf_counter(), progress.elapsed_s
    interval_start, interval_steps = session_start, 0
    with StopRequest() as stop:
        while progress.step < end and progress.elapsed_s < time_limit:
            lr = learning_rate(progress.step, cfg)
            stability.arm(logs_at(progress.step + 1, cfg))
            wrapped, loss, grad_norm = run_step(wrapped, model, optimizer, batches.next(), cfg, env, device, lr)
            loss_sum += loss.double()
            progress.step += 1
            progress.interval_steps += 1
            progress.tokens_seen += tokens_per_step
            interval_steps += 1
            over_time = previous_elapsed + time.perf_counter() - session_start >= time_limit
            out_of_time = time_limit < math.inf and any_process(over_time, env)  # max_minutes: evaluate, save, end
            stopping = stop.agreed(env) or out_of_time or progress.step == end  # this session ends here
            # A session that stops mid-interval writes no row: the resumed run completes it, so the
            # log reads exactly as an uninterrupted run's.
            evaluate_now = progress.step % cfg.eval_every == 0 or progress.step == cfg.max_steps or out_of_time
            log_now = logs_at(progress.step, cfg) or evaluate_now
            save_now = progress.step % cfg.save_every == 0 or stopping
            if log_now or save_now:
                now = time.perf_counter()
                progress.elapsed_s = previous_elapsed + now - session_start
                train_loss = mean_across_processes(loss_sum.item() / progress.interval_steps, env)
                if not math.isfinite(train_loss):
                    raise DivergedError(f"the loss became {train_loss} by step {progress.step}: stopped, keeping the "
                                        f"last good checkpoint in {out}; lower --lr or raise --warmup_steps, then --resume")
            if log_now:
                seconds = now - interval_start
                row = {"step": progress.step, "tokens_seen": progress.tokens_seen,
                       "elapsed_s": round(progress.elapsed_s, 3), "lr": lr, "train_loss": train_loss,
                       "grad_norm": float(grad_norm), "tokens_per_s": round(interval_steps * tokens_per_step / seconds, 1)}
                if evaluate_now:  # every process scores the whole set, so sharded models run the same collectives
                    with stability.measuring_logits():
                        scores = score(wrapped, val_set, byte_lengths, device)
                    row["val_loss"], row["val_bpb"] = scores.loss, scores.bits_per_byte
                log.write(row)
                stability.write(progress.step, row["grad_norm"])
                if bar is not None:
                    postfix = {"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                    if evaluate_now:
                        postfix["val"] = f"{row['val_loss']:.4f}"
                    if peak:
                        postfix["mfu"] = f"{flops_per_step * interval_steps / seconds / peak:.1%}"
                    bar.set_postfix(postfix)
                loss_sum.zero_()
                progress.interval_steps = 0
            if save_now:
                progress.interval_loss = loss_sum.item()
                save_checkpoint(out, wrapped, optimizer, batches, progress, cfg, env)
            if log_now or save_now:
                interval_start, interval_steps = time.perf_counter(), 0  # evaluation and saving are not training speed
            if bar is not None:
                bar.update(1)
            if stopping:
                break
    if bar is not None:
        bar.close()
    if env.world_size > 1:
        dist.destroy_process_group()
    return out


def logs_at(step: int, cfg: TrainConfig) -> bool:
    """Whether `step` writes a row to the logs (evaluation steps always do)."""
    return step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps


def run_step(wrapped, model, optimizer, micro_batches, cfg, env, device, lr):
    """train_step, falling back to the plain model (with a warning) if torch.compile fails.
    Returns (the model to use from now on, loss, gradient norm)."""
    try:
        return (wrapped, *train_step(wrapped, optimizer, micro_batches, cfg, env, device, lr))
    except Exception as e:
        if not cfg.compile or not hasattr(wrapped, "_orig_mod"):
            raise
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training without it")
        optimizer.zero_grad(set_to_none=True)
        wrapped = wrapped._orig_mod
        return (wrapped, *train_step(wrapped, optimizer, micro_batches, cfg, env, device, lr))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
