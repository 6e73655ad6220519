"""One-step distillation of the AF inverse (arXiv v2 §3.5, Algorithm 2).

Student: a copy of the trained teacher AF with every attention made bidirectional. Student block g_t maps
Z^t -> Z^(t-1) in one parallel pass with the teacher block's affine form and permutation, its shift and
log-scale now read from all of Z^t (see :meth:`AFBlock.one_pass_inverse`):

    x_i = z_i · exp(alpha_i(Z^t)) + mu_i(Z^t),   x_1 = z_1

Loss (Algorithm 2): the frozen teacher's forward pass gives Z^0..Z^n; Z~^n = Z^n + s·eps with s ~ U[0, s_max]
per sample; the student blocks run chained on their own outputs Z~^n -> Z~^(n-1) -> ... -> Z~^0, and

    L = (1/n) Σ_t mean((Z~^(t-1) - Z^(t-1))²)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from farmer_cli.model.flow import AutoregressiveFlow


def make_student(teacher: AutoregressiveFlow) -> AutoregressiveFlow:
    """A trainable copy of ``teacher`` with bidirectional attention in every block."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    for block in student.blocks:
        block.stack.causal = False
    return student


class OnePassInverse(nn.Module):
    """The student as a module whose ``forward`` is its one-pass inverse, so a DDP / FSDP wrapper sees the
    training computation as a forward call (and synchronises its gradients). ``flow`` holds the weights."""

    def __init__(self, flow: AutoregressiveFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, return_intermediates: bool = False):
        return self.flow.one_pass_inverse(z, y, return_intermediates=return_intermediates)


def distill_loss(teacher: AutoregressiveFlow, student: nn.Module, x: torch.Tensor, noise_max: float,
                 y: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x: patchified images (B, N, d) -> (loss, per-block losses from block n down to block 1, 0-dim tensors
    detached from the graph: reading them is left to whoever logs them).

    ``student``: an :class:`OnePassInverse` (possibly wrapped by DDP / FSDP)."""
    with torch.no_grad():
        _, _, states = teacher(x, y, return_intermediates=True)  # [Z^0, ..., Z^n]
    z_n = states[-1]
    s = torch.rand(z_n.shape[0], 1, 1, device=z_n.device) * noise_max
    _, outputs = student(z_n + s * torch.randn_like(z_n), y, return_intermediates=True)
    targets = states[-2::-1]  # Z^(n-1), ..., Z^0
    losses = [((out - tgt.float()) ** 2).mean() for out, tgt in zip(outputs, targets)]
    return torch.stack(losses).mean(), [v.detach() for v in losses]
