"""Normalisation layers over the last dimension. Add a variant: one class and one line in NORMS.

Every norm is built by `make_norm(cfg, layer_index, dim)`, the one place that reads the norm settings.
"""
import torch
import torch.nn.functional as F
from torch import nn

from modules.logging import LoggingModule, log_io


class Norm(LoggingModule):
    """Shared parts: an optional learned scale (norm_affine) and an optional learned shift (norm_bias).
    dim defaults to the model's width; attention passes its head size for per-head norms."""

    def __init__(self, cfg, layer_index: int | None = None, dim: int | None = None):
        super().__init__()
        self.dim, self.eps = dim or cfg.dim, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(self.dim)) if cfg.norm_affine else None
        self.bias = nn.Parameter(torch.zeros(self.dim)) if cfg.norm_bias else None

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}, bias={self.bias is not None}"


class RMSNorm(Norm):
    """x / sqrt(mean(x^2) + eps) * weight (+ bias)."""

    @log_io
    def forward(self, x):
        y = F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return y if self.bias is None else y + self.bias


class LayerNorm(Norm):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias."""

    @log_io
    def forward(self, x):
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class CosineNorm(Norm):
    """x / max(||x||_2, eps) * weight (+ bias): projects onto the unit sphere, then scales."""

    @log_io
    def forward(self, x):
        y = F.normalize(x, dim=-1, eps=self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


class DyT(Norm):
    """Dynamic tanh (Zhu et al. 2025, "Transformers without Normalization"): tanh(alpha * x) * weight
    (+ bias), a learned scalar alpha (initial value dyt_alpha) in place of any statistics."""

    def __init__(self, cfg, layer_index: int | None = None, dim: int | None = None):
        super().__init__(cfg, layer_index, dim)
        self.alpha = nn.Parameter(torch.full((1,), cfg.dyt_alpha))

    @staticmethod
    def check_config(cfg):
        if not cfg.dyt_alpha > 0:
            raise ValueError(f"dyt_alpha={cfg.dyt_alpha!r} is not valid: must be positive")

    @log_io
    def forward(self, x):
        y = torch.tanh(self.alpha * x)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


NORMS = {
    "rmsnorm": RMSNorm,
    "layernorm": LayerNorm,
    "cosinenorm": CosineNorm,
    "dyt": DyT,
}


def make_norm(cfg, layer_index: int | None = None, dim: int | None = None) -> Norm:
    """The norm `cfg.norm` over `dim` features (default: the model's width)."""
    return NORMS[cfg.norm](cfg, layer_index, dim)
