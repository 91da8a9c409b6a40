"""The residual block: attention then MLP, each wrapped in norms by `norm_placement`:

    pre      (GPT-2, Llama)  x = x + f(norm(x))
    post     (original Transformer)  x = norm(x + f(x))
    sandwich (CogView, Gemma 2)  x = x + post_norm(f(norm(x)))
"""
from torch import nn

from modules.attention import ATTENTIONS
from modules.logging import LoggingModule, log_io
from modules.mlp import MLPS
from modules.norm import NORMS


def make_norm(cfg, dim=None):
    return NORMS[cfg.norm](dim or cfg.dim, cfg.norm_eps, cfg.norm_affine, cfg.norm_bias)


def make_dropout(p):
    # Identity rather than Dropout(0): nothing to run at all when the site is off.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Layer(LoggingModule):
    def __init__(self, cfg, index: int = 0):
        super().__init__()
        self.norm_placement = cfg.norm_placement
        self.attention_norm = make_norm(cfg)
        self.attention = ATTENTIONS[cfg.attention](cfg, index)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)
        if cfg.norm_placement == "sandwich":
            self.attention_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)
        self.resid_dropout = make_dropout(cfg.resid_dropout)

    @log_io
    def forward(self, x, rope=None, mask=None, cache=None):
        if self.norm_placement == "pre":
            x = x + self.resid_dropout(self.attention(self.attention_norm(x), rope, mask, cache))
            return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))
        if self.norm_placement == "post":
            x = self.attention_norm(x + self.resid_dropout(self.attention(x, rope, mask, cache)))
            return self.mlp_norm(x + self.resid_dropout(self.mlp(x)))
        x = x + self.resid_dropout(self.attention_post_norm(self.attention(self.attention_norm(x), rope, mask, cache)))
        return x + self.resid_dropout(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))
