"""Feed-forward blocks. Add an activation: one function and one line in ACTIVATIONS;
add an MLP variant: one class, built as Cls(cfg, layer_index), and one line in MLPS."""
import functools

import torch.nn.functional as F
from torch import nn

from modules.logging import LoggingModule, log_io


def relu_squared(x):
    """relu(x)^2 (Primer, So et al. 2021)."""
    return F.relu(x).square()


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf), as nanoGPT
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,
    "relu2": relu_squared,
}


class MLP(LoggingModule):
    """down(act(up(x)))."""

    def __init__(self, cfg, layer_index: int | None = None):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=cfg.bias)
        self.down.residual_projection = True  # scaled init (see Model.init_weights)
        self.act = ACTIVATIONS[cfg.activation]

    @log_io
    def forward(self, x):
        return self.down(self.act(self.up(x)))


class GatedMLP(LoggingModule):
    """down(act(gate(x)) * up(x)), a GLU (Shazeer 2020); with silu it is Llama's SwiGLU.
    Gate and up projections are one matrix, [gate; up], so that one matmul computes both."""

    def __init__(self, cfg, layer_index: int | None = None):
        super().__init__()
        self.up = nn.Linear(cfg.dim, 2 * cfg.mlp_hidden, bias=cfg.bias)
        self.up.output_split = [cfg.mlp_hidden, cfg.mlp_hidden]  # gate and up: two projections
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=cfg.bias)
        self.down.residual_projection = True
        self.act = ACTIVATIONS[cfg.activation]

    @log_io
    def forward(self, x):
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


MLPS = {
    "plain": MLP,
    "gated": GatedMLP,
}
