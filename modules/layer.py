"""The residual block: attention then MLP, each wrapped in norms by `norm_placement`, a key of NORM_PLACEMENTS:

    pre      (GPT-2, Llama)          x = x + f(norm(x))
    post     (original Transformer)  x = norm(x + f(x))
    sandwich (CogView, Gemma 2)      x = x + post_norm(f(norm(x)))

Add a placement: one subclass of Layer with its forward, and one line in NORM_PLACEMENTS.
"""
from torch import nn

from modules.attention import ATTENTIONS
from modules.logging import LoggingModule, log_io
from modules.mlp import MLPS
from modules.norm import make_norm


def make_dropout(p):
    # Identity rather than Dropout(0): nothing to run at all when the site is off.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Layer(LoggingModule):
    """The parts every placement has: attention and MLP from their registries, a norm for each, and
    dropout on each block's output before it joins the residual stream."""

    def __init__(self, cfg, layer_index: int = 0):
        super().__init__()
        self.attention_norm = make_norm(cfg, layer_index)
        self.attention = ATTENTIONS[cfg.attention](cfg, layer_index)
        self.mlp_norm = make_norm(cfg, layer_index)
        self.mlp = MLPS[cfg.mlp](cfg, layer_index)
        self.resid_dropout = make_dropout(cfg.resid_dropout)


class PreNorm(Layer):
    @log_io
    def forward(self, x, ctx=None):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), ctx))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class PostNorm(Layer):
    @log_io
    def forward(self, x, ctx=None):
        x = self.attention_norm(x + self.resid_dropout(self.attention(x, ctx)))
        return self.mlp_norm(x + self.resid_dropout(self.mlp(x)))


class SandwichNorm(Layer):
    def __init__(self, cfg, layer_index: int = 0):
        super().__init__(cfg, layer_index)
        self.attention_post_norm = make_norm(cfg, layer_index)
        self.mlp_post_norm = make_norm(cfg, layer_index)

    @log_io
    def forward(self, x, ctx=None):
        x = x + self.resid_dropout(self.attention_post_norm(self.attention(self.attention_norm(x), ctx)))
        return x + self.resid_dropout(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))


NORM_PLACEMENTS = {
    "pre": PreNorm,
    "post": PostNorm,
    "sandwich": SandwichNorm,
}
