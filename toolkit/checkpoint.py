"""The one checkpoint format: a folder with model_config.json, train_config.json and model.safetensors.

Weights are safetensors (loading never runs code), saved from the plain module (never with
torch.compile's `_orig_mod.` or DDP's `module.` prefixes) and with a tied head stored once.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from config import ConfigError, ModelConfig
from modules.model import Model
from toolkit.hf import LoadError

WEIGHTS, MODEL_CONFIG, TRAIN_CONFIG = "model.safetensors", "model_config.json", "train_config.json"
# Where runs live: trained/ next to this code, or TRAINED_DIR (tests point it elsewhere).
TRAINED = Path(os.environ.get("TRAINED_DIR", Path(__file__).resolve().parent.parent / "trained"))


def unwrap(model: torch.nn.Module) -> Model:
    """The Model inside torch.compile (`_orig_mod`) and DDP/FSDP (`module`) wrappers."""
    while not isinstance(model, Model):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def write_atomically(path: Path, write):
    """Write through a temporary file and rename, so an interruption never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save_model(model, directory, train_config: dict | None = None, state_dict: dict | None = None,
               metadata: dict | None = None) -> Path:
    """Write the model (and, if given, the training settings) into `directory`. `state_dict`
    replaces the model's own (a sharded model's gathered weights); `metadata` goes into the
    safetensors header."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)  # the same tensor as embed.weight
    write_atomically(directory / WEIGHTS, lambda p: save_file(state, str(p), metadata=metadata))
    return save_configs(directory, model.cfg, train_config)


def save_configs(directory, model_config: ModelConfig, train_config: dict | None = None) -> Path:
    directory = Path(directory)
    write_atomically(directory / MODEL_CONFIG, lambda p: p.write_text(model_config.to_json()))
    if train_config is not None:
        write_atomically(directory / TRAIN_CONFIG, lambda p: p.write_text(json.dumps(train_config, indent=2)))
    return directory


def is_checkpoint(path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} cannot be read ({e}): the checkpoint is damaged; retrain or restore it") from None


def load_state_dict_file(path: Path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, or a one-line LoadError if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{path} cannot be read ({e}): the file is missing, truncated or corrupt; "
                        f"retrain or restore it") from None


def load_checkpoint(directory, device="cpu") -> tuple[Model, dict]:
    """(model in eval mode, train settings as a dict, {} if none were saved) from a checkpoint folder."""
    directory = Path(directory)
    try:
        cfg = ModelConfig.from_dict(read_json(directory / MODEL_CONFIG))
    except ConfigError as e:
        raise LoadError(f"{directory / MODEL_CONFIG}: {e}") from None
    train_config = read_json(directory / TRAIN_CONFIG) if (directory / TRAIN_CONFIG).is_file() else {}
    state, _ = load_state_dict_file(directory / WEIGHTS)
    if cfg.tie_embeddings and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    model = Model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise LoadError(f"{directory / WEIGHTS} does not match {MODEL_CONFIG}: {first}") from None
    return model.to(device).eval(), train_config
