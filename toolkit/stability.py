"""Stability figures of a run, written to trained/NAME/stability.csv at the log steps: the gradient
norm of each part of the model (embeddings, each layer, the final norm, the head) and, at evaluation
steps, the RMS of the output logits over the validation set and the largest attention logit over the
first PROBE_SEQUENCES validation sequences.

Cheap by construction: gradient norms are measured only on steps that are logged (an optimizer
pre-step hook, armed before those steps), logits only while the validation set is scored, attention
logits by one small forward with the shape logger's statistics on (which is what makes the scores,
never materialised by the attention kernels, explicit).
Loss spikes need nothing here: the report finds them in log_data.csv's train loss.
"""
import csv
from contextlib import contextmanager
from pathlib import Path

import torch

from toolkit.checkpoint import unwrap
from toolkit.metrics import autocast

STABILITY = "stability.csv"
PROBE_SEQUENCES = 4  # validation sequences the attention logits are measured on


def part_of(parameter_name: str) -> str:
    """The model part a parameter belongs to: "layers.3" for "layers.3.mlp.up.weight", else its first name."""
    parts = parameter_name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def tensor_norm(tensor: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(tensor.float())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded gradient's norm


class StabilityLog:
    """Measures on every process (sharded models need every process for a norm), writes on the main one.
    On resume, rows after the checkpoint's step are dropped, as log_data.csv's are."""

    def __init__(self, out: Path, model, optimizer, resume_step: int | None, enabled: bool):
        self.model, self.enabled, self.path = unwrap(model), enabled, out / STABILITY
        self.parts: dict[str, list[torch.nn.Parameter]] = {}
        for name, parameter in self.model.named_parameters():
            self.parts.setdefault(part_of(name), []).append(parameter)
        self.columns = ["step", "logits_rms", "attn_logit_max"] + [f"grad_norm.{part}" for part in self.parts]
        self.armed, self.grad_norms, self.logits_rms, self.attn_logit_max = False, None, None, None
        optimizer.register_step_pre_hook(self.measure_gradients)
        if enabled:
            self.start(resume_step)

    def start(self, resume_step: int | None):
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def arm(self, will_log: bool):
        """Measure gradients in the coming step (only steps that write a row need them)."""
        self.armed = will_log

    def measure_gradients(self, optimizer, args, kwargs):
        if not self.armed:
            return
        self.grad_norms = {}
        for part, parameters in self.parts.items():
            norms = [tensor_norm(p.grad) for p in parameters if p.grad is not None]
            self.grad_norms[part] = torch.linalg.vector_norm(torch.stack(norms)) if norms else None

    @contextmanager
    def measuring_logits(self):
        """Sum the squares of every logit the model produces inside this block (the validation set): the
        head's output times the parametrization's output multiplier (muP's 1/m), as the loss sees them."""
        totals = {"count": 0, "norms": []}
        multiplier = self.model.scales.output

        def hook(module, inputs, output):  # norms stay on the device until the block ends: no waiting
            totals["norms"].append(torch.linalg.vector_norm(output.detach()) * multiplier)
            totals["count"] += output.numel()

        handle = self.model.head.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        squares = sum(float(n) ** 2 for n in totals["norms"])
        self.logits_rms = (squares / totals["count"]) ** 0.5 if totals["count"] else None

    def measure_attention(self, batch: dict, device):
        """The largest attention logit (scaled query-key product plus any score bias, at the pairs the
        mask allows) of any head of any layer over the batch's first PROBE_SEQUENCES sequences."""
        probe = {k: v[:PROBE_SEQUENCES].to(device) for k, v in batch.items() if k != "targets"}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(device), self.model.log_shapes(stats=True, print_fn=None) as log:
                self.model(**probe)
        finally:
            self.model.train(was_training)
        maxima = [r.outputs["scores"].stats["max"] for r in log.records if r.method == "scores"]
        self.attn_logit_max = max(maxima) if maxima else None

    def write(self, step: int, grad_norm: float):
        """One row. Gradients are measured after clipping; scaled by the unclipped total `grad_norm`
        over the clipped total, each part's norm is its norm before clipping."""
        row = {"step": step, "logits_rms": self.logits_rms, "attn_logit_max": self.attn_logit_max}
        if self.grad_norms is not None:
            norms = {part: float(n) for part, n in self.grad_norms.items() if n is not None}
            clipped_total = sum(n * n for n in norms.values()) ** 0.5
            scale = grad_norm / clipped_total if clipped_total > 0 else 1.0
            row.update({f"grad_norm.{part}": n * scale for part, n in norms.items()})
        self.armed, self.grad_norms, self.logits_rms, self.attn_logit_max = False, None, None, None
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
