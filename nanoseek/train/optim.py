"""AdamW and the warmup-stable-decay learning-rate schedule.

V3 (§4.2) trains with AdamW (β = 0.9/0.95, weight decay 0.1) and a schedule that warms up linearly, holds
the peak for most of training, then decays. We use the warmup-stable-decay (WSD) form of that idea: the
stable phase makes a run extendable (a checkpoint from the plateau can be decayed later), and the whole
schedule is a pure function of the step, so resuming needs nothing but the step number.

Weight decay applies to matrices only (linear weights, embeddings, fused experts); norms, biases and the
router's correction bias (a buffer, not a parameter) are never decayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nanoseek.recipe import Range


@dataclass
class OptimConfig:
    lr: float = 3e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # lr at the end of the decay, as a fraction of the peak (V3: 0.1)
    warmup_steps: int = 20          # linear warmup 0 → lr
    decay_frac: float = 0.3         # the last fraction of the steps decays linearly to min_lr_ratio·lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global grad norm; 0 disables clipping
    CHECKS: ClassVar[dict] = {"lr": Range(0), "min_lr_ratio": Range(0, 1), "decay_frac": Range(0, 1),
                              "weight_decay": Range(0), "beta1": Range(0, 1, open_hi=True),
                              "beta2": Range(0, 1, open_hi=True), "eps": Range(0), "grad_clip": Range(0)}


def wsd_lr(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: warmup, stable, linear decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = int(round(cfg.decay_frac * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)     # (0, 1]: the last step reaches min
    return cfg.lr * (1.0 - progress * (1.0 - cfg.min_lr_ratio))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying only tensors with ≥ 2 dims; fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
