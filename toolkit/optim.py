"""Optimizers, chosen by name (`TrainConfig.optimizer`): OPTIMIZERS maps a name to a function
(model, cfg, device) -> torch.optim.Optimizer.

Every parameter group carries `lr_scale`, its rate relative to `cfg.lr`; the loop sets
`group["lr"] = schedule(step) * group["lr_scale"]` (see `set_learning_rate`), so one schedule drives
groups with different rates. Each optimizer is one torch Optimizer, so checkpoints, resume and FSDP
handle them all alike. Under muP the layers' matrices get the model's width factor on their rate
(modules/parametrization.py); everything else keeps cfg.lr.
"""
import math

import torch
from torch import nn

from modules.parametrization import Scales

EMBEDDING, HIDDEN, OTHER = "embedding", "hidden", "other"


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each parameter once, by role: `embedding` (token and position embeddings, the output head, tied
    or not), `hidden` (the other matrices: the layers' projections) and `other` (norm gains, biases)."""
    outer = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if head is not None:
        outer.add(id(head.weight))
    roles, seen = {EMBEDDING: [], HIDDEN: [], OTHER: []}, set()
    for p in model.parameters():
        if id(p) in seen:  # a tied matrix is one parameter
            continue
        seen.add(id(p))
        roles[EMBEDDING if id(p) in outer else HIDDEN if p.dim() >= 2 else OTHER].append(p)
    return roles


def output_splits(model: nn.Module) -> dict[int, list[int]]:
    """{id(weight): sizes} for linear layers whose output stacks several projections ([q; k; v],
    [gate; up]): they declare it as `linear.output_split`, and Muon orthogonalises each part alone."""
    return {id(m.weight): list(m.output_split) for m in model.modules()
            if isinstance(m, nn.Linear) and getattr(m, "output_split", None)}


def width_scales(model: nn.Module) -> Scales:
    """The model's parametrization multipliers (SP's, all 1, for a module that has none)."""
    return getattr(model, "scales", None) or Scales()


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- AdamW ---

def adamw(model, cfg, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: never on norms, biases or embeddings (a tied head is
    the embedding; an untied head is decayed, as in nanoGPT)."""
    roles = parameter_roles(model)
    tied = getattr(model, "head", None) is not None and any(model.head.weight is m.weight
                                                            for m in model.modules() if isinstance(m, nn.Embedding))
    head = [] if tied or getattr(model, "head", None) is None else [model.head.weight]
    embeddings = [p for p in roles[EMBEDDING] if not any(p is h for h in head)]
    hidden_scale = width_scales(model).hidden_lr
    if hidden_scale == 1:  # SP: the head decays with the hidden matrices, in one group
        groups = [{"params": roles[HIDDEN] + head, "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
    else:  # muP: the head keeps the base rate
        groups = [{"params": roles[HIDDEN], "weight_decay": cfg.weight_decay, "lr_scale": hidden_scale},
                  {"params": head, "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
    groups.append({"params": embeddings + roles[OTHER], "weight_decay": 0.0, "lr_scale": 1.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


# --- Muon ---

# The quintic Newton-Schulz coefficients of Keller Jordan's Muon (as torch.optim.Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T by a quintic Newton-Schulz iteration, as torch.optim.Muon,
    but in float32 on CPU (torch hard-codes bfloat16, which a CPU runs several times slower) and
    bfloat16 on CUDA. Returns a tensor of g's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def muon_lr_ratio(shape, adjust: str) -> float:
    """torch.optim.Muon's rate adjustment for a (fan_out, fan_in) matrix: "original" (Jordan):
    sqrt(max(1, fan_out / fan_in)); "match_rms_adamw" (Moonshot): 0.2 sqrt(max(fan_out, fan_in)),
    which makes the update's RMS that of AdamW so AdamW's rate and weight decay carry over."""
    fan_out, fan_in = shape
    if adjust == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    return 0.2 * math.sqrt(max(fan_out, fan_in))


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the groups marked `muon`, AdamW for the others, in one optimizer.

    A Muon step: momentum buffer B = mu B + (1 - mu) G (torch's lerp form), Nesterov update
    G + mu (B - G), orthogonalised per stacked projection, decoupled weight decay, and the rate
    adjusted by each projection's shape. Under FSDP2 a sharded matrix is gathered, orthogonalised
    whole and re-sharded, so every process applies the one-process update.
    """

    def __init__(self, groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr: str = "match_rms_adamw"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, adjust_lr=adjust_lr, muon=False, splits=None)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self.muon_update if group["muon"] else self.adamw_update
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    update(p, group, group["splits"][i] if group["splits"] else None)
        return loss

    def adamw_update(self, p, group, _split):
        state, beta1, beta2 = self.state[p], *group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))

    def muon_update(self, p, group, split):
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer, momentum = state["momentum_buffer"], group["momentum"]
        buffer.lerp_(p.grad, 1 - momentum)
        g = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        sharded = hasattr(g, "full_tensor")  # an FSDP2 DTensor: orthogonalise the whole matrix
        full = g.full_tensor() if sharded else g
        parts = full.split(split or [full.shape[0]], dim=0)
        delta = torch.cat([orthogonalize(part, group["ns_steps"]) * muon_lr_ratio(part.shape, group["adjust_lr"])
                           for part in parts])
        if sharded:
            from torch.distributed.tensor import distribute_tensor
            delta = distribute_tensor(delta, g.device_mesh, g.placements)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(delta, alpha=-group["lr"])


def muon(model, cfg, device) -> torch.optim.Optimizer:
    """Muon for the hidden matrices; AdamW for embeddings, the head, norms and biases (Muon is for
    hidden layers: its orthogonal updates do not suit a lookup table or a classifier)."""
    roles, splits = parameter_roles(model), output_splits(model)
    hidden = roles[HIDDEN]
    muon_scale = (cfg.muon_lr or cfg.lr) / cfg.lr
    if cfg.muon_adjust_lr == "match_rms_adamw":  # AdamW-sized updates need AdamW's muP width factor
        muon_scale *= width_scales(model).hidden_lr
    groups = [{"params": hidden, "muon": True, "weight_decay": cfg.weight_decay, "lr_scale": muon_scale,
               "splits": [splits.get(id(p)) for p in hidden]},
              {"params": roles[EMBEDDING] + roles[OTHER], "weight_decay": 0.0, "lr_scale": 1.0}]
    return Muon([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                momentum=cfg.muon_momentum, adjust_lr=cfg.muon_adjust_lr)


OPTIMIZERS = {
    "adamw": adamw,
    "muon": muon,
}


def make_optimizer(model, cfg, device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](model, cfg, device)
