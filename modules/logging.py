"""Shape logging: see how tensors move through every module.

Methods decorated with `@log_io` report their arguments and outputs while logging is switched
on for their module, which `LoggingModule.log_shapes()` does for a model or any submodule:

    with model.log_shapes() as log:
        model(input_ids)
    log.records   # the same tree as data: one LogRecord per decorated call

Off (the default) a decorated call costs one attribute check, and under `torch.compile` the
logging branch is never traced.
"""
import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str
    device: str
    stats: dict | None = None  # mean, std, min, max, rms when asked for

    def __str__(self):
        text = f"{tuple(self.shape)} {self.dtype} {self.device}"
        if self.stats:
            text += " " + " ".join(f"{k}={v:.4g}" for k, v in self.stats.items())
        return text


@dataclass
class LogRecord:
    depth: int  # call depth below the module logging was switched on for
    path: str  # the module's name inside that module ("" for itself)
    module: str  # class name
    method: str
    inputs: dict = field(default_factory=dict)  # argument name -> TensorInfo or short text
    outputs: dict = field(default_factory=dict)  # output name -> TensorInfo or short text


def describe(value, stats=False):
    """A tensor as TensorInfo, containers element-wise, anything else as short text."""
    if isinstance(value, torch.Tensor):
        summary = None
        if stats and value.numel() > 0:
            v = value.detach().float()
            summary = {"mean": v.mean().item(), "std": v.std().item() if v.numel() > 1 else 0.0,
                       "min": v.min().item(), "max": v.max().item(), "rms": v.square().mean().sqrt().item()}
        return TensorInfo(tuple(value.shape), str(value.dtype).removeprefix("torch."), str(value.device), summary)
    if isinstance(value, (tuple, list)):
        return [describe(v, stats) for v in value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_info(info) -> str:
    if isinstance(info, list):
        return "[" + ", ".join(map(format_info, info)) + "]"
    return str(info)


class ShapeLog:
    """An active logging session: prints the call tree and keeps it as `records`."""

    def __init__(self, paths, stats, print_fn):
        self.paths, self.stats, self.print_fn = paths, stats, print_fn
        self.records: list[LogRecord] = []
        self.lines: list[str] = []
        self.depth = 0

    @property
    def text(self):
        return "\n".join(self.lines)

    def emit(self, indent, line):
        line = " " * indent + line
        self.lines.append(line)
        if self.print_fn is not None:
            self.print_fn(line)

    def call(self, module, fn, signature, output_names, args, kwargs):
        bound = signature.bind(module, *args, **kwargs)
        inputs = {name: describe(v, self.stats) for name, v in list(bound.arguments.items())[1:]}
        path = self.paths[id(module)]
        record = LogRecord(self.depth, path, type(module).__name__, fn.__name__, inputs)
        self.records.append(record)
        # Calls indent by 4 per level of depth; their arguments and outputs by 2 more.
        self.emit(4 * self.depth, (f"{path}: " if path else "") + f"{record.module}.{record.method}")
        for name, info in inputs.items():
            self.emit(4 * self.depth + 2, f"in  {name}: {format_info(info)}")
        self.depth += 1
        try:
            out = fn(module, *args, **kwargs)
        finally:
            self.depth -= 1
        values = out if isinstance(out, tuple) and output_names and len(output_names) == len(out) else (out,)
        names = output_names if len(values) > 1 or output_names else ("output",)
        record.outputs = {name: describe(v, self.stats) for name, v in zip(names, values)}
        for name, info in record.outputs.items():
            self.emit(4 * self.depth + 2, f"out {name}: {format_info(info)}")
        return out


def log_io(fn=None, *, outputs: tuple[str, ...] | None = None):
    """Decorate a LoggingModule method so that its inputs and outputs can be logged.

    `@log_io` or `@log_io(outputs=("logits", "loss"))` to name the elements of a returned tuple.
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            session = self._shape_log
            if session is None or torch.compiler.is_compiling():
                return fn(self, *args, **kwargs)
            return session.call(self, fn, signature, outputs, args, kwargs)
        return wrapper
    return decorate(fn) if fn is not None else decorate


class LoggingModule(nn.Module):
    """An nn.Module whose `@log_io` methods report shapes while `log_shapes()` is active."""

    _shape_log: ShapeLog | None = None  # a class default, so the check never reaches nn.Module.__getattr__

    @property
    def logging_stats(self) -> bool:
        """Whether a logging session with statistics is on for this module (never while compiling)."""
        return self._shape_log is not None and self._shape_log.stats and not torch.compiler.is_compiling()

    @contextlib.contextmanager
    def log_shapes(self, stats: bool = False, print_fn=print):
        """Switch shape logging on for this module and everything inside it.

        `stats=True` adds mean/std/min/max/rms of every tensor, and attention modules then also log their
        scores (the pre-softmax logits they allow); `print_fn=None` only records.
        """
        modules = {id(m): (name, m) for name, m in self.named_modules() if isinstance(m, LoggingModule)}
        if any(m._shape_log is not None for _, m in modules.values()):
            raise RuntimeError("shape logging is already on for this module")
        session = ShapeLog({key: name for key, (name, _) in modules.items()}, stats, print_fn)
        for _, m in modules.values():
            m._shape_log = session
        try:
            yield session
        finally:
            for _, m in modules.values():
                del m._shape_log  # back to the class default
