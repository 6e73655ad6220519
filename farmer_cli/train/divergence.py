"""Divergence detection for the training loop without waiting on the device: non-finite losses, terms and gradient
norms are watched in device tensors and read back only when the loop asks (logging and checkpoint steps)."""

from __future__ import annotations

import torch


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the term. The last checkpoint is kept."""


class FiniteWatch:
    """Non-finite values watched on the device without waiting for it: for each name, the first step at which it
    was non-finite (-1: never). Nothing is read back until :meth:`check`, which the loop calls at logging and
    checkpoint steps only, so a step that does neither makes no host sync; a blow-up is reported at most
    ``log_every`` steps late, and before any checkpoint could save its weights."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first: dict[str, torch.Tensor] = {}

    def observe(self, step: int, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            first = self.first.get(name)
            if first is None:
                first = self.first[name] = torch.full((), -1, dtype=torch.long, device=self.device)
            bad = ~torch.isfinite(value.detach()).all()
            first.copy_(torch.where(bad & (first < 0), step, first))

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` naming the first bad step and what blew up there (one host sync)."""
        if not self.first:
            return
        firsts = dict(zip(self.first, torch.stack(list(self.first.values())).tolist()))
        bad = {name: step for name, step in firsts.items() if step >= 0}
        if not bad:
            return
        step = min(bad.values())
        terms = [name for name, when in bad.items() if when == step]
        what = "non-finite gradient norm" if terms == ["grad_norm"] else (
            f"the loss became non-finite ({', '.join(t for t in terms if t != 'loss') or 'loss'} blew up)")
        raise TrainingDiverged(f"step {step}: {what}. No checkpoint holds the diverged weights. Try a lower --lr, a smaller "
                               "model.af_max_log_scale, or --mixed-precision fp32.")
