"""Normalisation layers over the last dimension. Add a variant: one class and one line in NORMS."""
import torch
import torch.nn.functional as F
from torch import nn

from modules.logging import LoggingModule, log_io


class Norm(LoggingModule):
    """Shared parts: an optional learned scale (affine) and an optional learned shift (bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

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


NORMS = {
    "rmsnorm": RMSNorm,
    "layernorm": LayerNorm,
    "cosinenorm": CosineNorm,
}
