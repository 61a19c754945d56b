"""Exponential moving average of a model's parameters (float32 shadow copies).

    shadow ← decay · shadow + (1 − decay) · param        after every optimiser step

With ``warmup=True`` the effective decay is min(decay, (1 + n) / (10 + n)) for the n-th
update, so a short run's average is not dominated by the random initialisation.
Buffers are copied, not averaged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s parameters (unwrap DDP before calling)."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        keys = list(self.shadow)
        shadows = [self.shadow[k] for k in keys]
        news = [params[k].detach().float() for k in keys]
        torch._foreach_lerp_(shadows, news, 1.0 - d)
        for k, b in model.named_buffers():
            self.buffers[k].copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same architecture)."""
        params = dict(model.named_parameters())
        for k, v in self.shadow.items():
            params[k].copy_(v.to(params[k].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.shadow) ^ set(sd["shadow"])
        if missing:
            raise ValueError(f"EMA state does not fit the model: differing keys {sorted(missing)[:4]}")
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)
        self.num_updates = int(sd["num_updates"])
        # self.warmup stays this run's (--ema-warmup), as the decay does: a resumed run goes on with its
        # own settings (the CLI names a changed one); the checkpoint's "warmup" is its writer's record
