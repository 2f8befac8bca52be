"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"), the optimizer ALBERT was pretrained with, and the schedule it used (linear warm-up, then
linear decay to zero).

Per parameter p with gradient g (Algorithm 2 of the LAMB paper):

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
    u = m^ / (sqrt(v^) + eps) + weight_decay * p
    r = ||p|| / ||u||  (1 where either norm is 0; 1 for groups with adapt=False)
    p = p - lr * r * u

As in ALBERT's optimizer code, the parameters excluded from weight decay (LayerNorm weights and
every bias) are also excluded from the layer-wise adaptation (``adapt=False`` in their group).
"""
from __future__ import annotations

import torch
from torch import nn


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, adapt: bool = True):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0 or not weight_decay >= 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got {eps!r}, {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                ratio = 1.0
                if group["adapt"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                        torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * ratio))
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, layer-wise adapted) and LayerNorm weights + biases (neither).
    Tied parameters appear once."""
    decay, no_decay = [], []
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or id(p) in norm_params:
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay, adapt=True),
            dict(params=no_decay, weight_decay=0.0, adapt=False)]


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """lr multiplier at step s: s / warmup_steps during warm-up, then linear decay to 0 at
    total_steps (for torch.optim.lr_scheduler.LambdaLR)."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                         f"warmup_steps={warmup_steps}, total_steps={total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor
