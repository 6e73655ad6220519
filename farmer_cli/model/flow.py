"""Autoregressive flow (AF): TARFlow-style stack of affine next-token transforms (arXiv v2 §3.2, Fig. 2).

Block t reads its input tokens in a permuted order (identity or flip), and for every token i > 1 predicts from
the tokens before it a shift mu_i and a log-scale alpha_i:

    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),     z_1 = x_1 (first token: identity)
    x_i = z_i * exp(alpha_i(x_<i)) + mu_i(x_<i)          (inverse: sequential over i)
    log|det dz/dx| = -sum_i sum_j alpha_ij               (summed in float32)

So sigma_t = exp(-alpha) in the arXiv v2 Eq. 8. alpha is soft-bounded, alpha = c·tanh(raw / c), so a block can
scale a channel by at most exp(±c) and log-dets cannot explode. The output projection is zero-initialised: an
untrained block is the identity.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from farmer_cli.model.attention import KVCache, TransformerStack, decoding_attention
from farmer_cli.model.steps import StepRunner


class AFBlock(nn.Module):
    """One affine autoregressive block over tokens (B, N, d) given in the block's own order.

    Args:
        dim: d, channels per token. tokens: N. width/layers/heads: the causal transformer.
        num_classes: > 0 makes the block class-conditional (a class embedding added to every position; index
            ``num_classes`` is the null class); 0 (the paper's choice) makes it unconditional.
        checkpoint: activation checkpointing of the transformer in training, the share of its layers recomputed
            (0 to 1; see :class:`TransformerStack`).
        gelu: the MLPs' GELU, "exact" (erf) or "tanh" (the approximation).
    """

    def __init__(self, dim: int, tokens: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 max_log_scale: float, num_classes: int = 0, checkpoint: float = 0.0, gelu: str = "exact") -> None:
        super().__init__()
        self.dim, self.max_log_scale = dim, max_log_scale
        self.in_proj = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.class_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.stack = TransformerStack(width, layers, heads, mlp_ratio, checkpoint=checkpoint, gelu=gelu)
        self.out_proj = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _offsets(self, start: int, length: int, y: torch.Tensor | None) -> torch.Tensor:
        """Position (and class) embeddings of positions start..start+length-1: (1 or B, length, W)."""
        h = self.pos[:, start : start + length]
        return h if self.class_emb is None else h + self.class_emb(y)[:, None]

    def _hidden(self, x: torch.Tensor, start: int, y: torch.Tensor | None) -> torch.Tensor:
        """Embed tokens x (B, t, d) sitting at positions start..start+t-1 -> (B, t, W)."""
        return self.in_proj(x) + self._offsets(start, x.shape[1], y)

    def _affine(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output (B, t, W) -> (alpha, mu), each (B, t, d) in float32, |alpha| < max_log_scale."""
        return self._bounded(self.out_proj(out))

    def _bounded(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection (B, t, 2d) -> (alpha, mu) in float32, alpha = c·tanh(raw / c)."""
        raw_alpha, mu = projected.float().chunk(2, dim=-1)
        c = self.max_log_scale
        return c * torch.tanh(raw_alpha / c), mu

    def _shifted_params(self, source: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Params for every token from ``source`` (B, N, d): token i's come from position i-1, token 0's are 0
        (one zero row in front of the projected output gives alpha = mu = 0)."""
        projected = self.out_proj(self.stack(self._hidden(source[:, :-1], 0, y)))
        return self._bounded(F.pad(projected, (0, 0, 1, 0)))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d) -> z (B, N, d) float32, logdet (B,) float32 = -sum alpha; with ``per_token`` each token's
        share (B, N), in the block's token order."""
        alpha, mu = self._shifted_params(x, y)
        z = (x.float() - mu) * torch.exp(-alpha)
        return z, (-alpha.sum(dim=-1) if per_token else -alpha.sum(dim=(1, 2)))

    def decode_step(self, x: torch.Tensor, z: torch.Tensor, offsets: torch.Tensor, cache: KVCache) -> None:
        """One token of the inverse, fixed-shape: with p = ``cache.position``, feed token p of x (B, N, d) and
        write token p + 1 of x, x_(p+1) = z_(p+1)·exp(alpha) + mu. ``offsets`` (B, N, W): position (and class)
        embeddings. Every index is a device tensor, so the step is the same computation at every p."""
        fed = cache.position.view(1)
        h = self.in_proj(x.index_select(1, fed)) + offsets.index_select(1, fed)
        alpha, mu = self._affine(self.stack(h, cache))  # the stack moves cache.position on to p + 1
        new = cache.position.view(1)
        x.index_copy_(1, new, torch.addcmul(mu, z.index_select(1, new), torch.exp(alpha)).to(x.dtype))

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, use_cache: bool = True,
                runner: StepRunner | None = None, key: Hashable = 0) -> torch.Tensor:
        """z (B, N, d) -> x (B, N, d) float32, token by token. With the KV cache each step feeds one token
        (:meth:`decode_step`, run by ``runner``: eager by default) into buffers ``runner`` keeps for every block
        of this shape; ``key`` names this block among them. Without the cache every step recomputes the prefix
        (the reference path)."""
        B, N, _ = z.shape
        if not use_cache:
            x = z.float().clone()
            for i in range(1, N):
                alpha, mu = self._affine(self.stack(self._hidden(x[:, :i], 0, y))[:, -1:])
                x[:, i : i + 1] = torch.addcmul(mu, z[:, i : i + 1].float(), torch.exp(alpha))
            return x
        runner = runner or StepRunner()
        buffers = runner.buffers(("af", B, N, self.dim, z.device), lambda: (
            z.new_empty(z.shape, dtype=torch.float32), z.new_empty(z.shape, dtype=torch.float32),
            z.new_empty((B, N, self.pos.shape[-1]), dtype=self.pos.dtype), self.stack.new_cache(B, N, z.device)))
        x, z_static, offsets, cache = buffers
        z_static.copy_(z)
        x.copy_(z)  # token 0 is z_0; the others are written step by step
        offsets.copy_(self._offsets(0, N, y).expand(B, -1, -1))  # once per block, not per token
        cache.restart()
        with decoding_attention(z.device):
            for i in range(1, N):
                span = runner.attend(cache, i)
                runner.run(("af", key, span), AFBlock.decode_step, self, x, z_static, offsets, cache)
        return x.clone()

    @torch.no_grad()
    def jacobi_inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, tol: float = 1e-5,
                       max_iter: int = 0) -> tuple[torch.Tensor, int]:
        """z (B, N, d) -> (x (B, N, d), iterations): the exact inverse by Jacobi fixed-point iteration, all tokens in
        parallel, x <- z·exp(alpha(x_<i)) + mu(x_<i) (training-free; as in STARFlow's block-Jacobi decoding).

        Token i is exact once tokens < i are, so the iteration reaches the sequential inverse after at most N - 1
        rounds; it stops earlier when no entry moves by more than ``tol`` (``max_iter`` > 0 caps the rounds)."""
        z = z.float()
        x = z.clone()
        rounds = max_iter if max_iter > 0 else z.shape[1]
        for k in range(1, rounds + 1):
            alpha, mu = self._shifted_params(x, y)
            new = z * torch.exp(alpha) + mu
            moved = (new - x).abs().max().item()
            x = new
            if moved <= tol:
                break
        return x, k

    def one_pass_inverse(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Student form (arXiv v2 §3.5, Algorithm 2): x_i = z_i·exp(alpha_i(z)) + mu_i(z), params from
        position i-1 of the stack run over z (bidirectional when ``stack.causal`` is False), x_1 = z_1. One
        parallel pass."""
        alpha, mu = self._shifted_params(z, y)
        return z.float() * torch.exp(alpha) + mu


def _flip(t: torch.Tensor) -> torch.Tensor:
    return t.flip(1)


class AutoregressiveFlow(nn.Module):
    """n AF blocks; block t permutes tokens in (flip or identity), transforms, and permutes back out.

    ``permutation="alternate"`` flips every odd block (TARFlow); ``"always-flip"`` flips every block.
    ``checkpoint`` turns on activation checkpointing in every block's transformer, for that share of its layers
    (training only; see
    :class:`TransformerStack`).
    """

    def __init__(self, dim: int, tokens: int, blocks: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, max_log_scale: float = 3.0, permutation: str = "alternate",
                 num_classes: int = 0, checkpoint: float = 0.0, gelu: str = "exact") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AFBlock(dim, tokens, width, layers, heads, mlp_ratio, max_log_scale, num_classes, checkpoint, gelu)
            for _ in range(blocks)
        )
        self.flips = [permutation == "always-flip" or t % 2 == 1 for t in range(blocks)]

    def _in(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return _flip(x) if self.flips[t] else x

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, return_intermediates: bool = False,
                per_token: bool = False):
        """x (B, N, d) -> (z (B, N, d), logdet (B,)) or, with ``return_intermediates``, also [Z^0, ..., Z^n].
        ``per_token``: logdet (B, N), each token's share summed over blocks, in the input's token order (every
        block's permutation undone)."""
        logdet = x.new_zeros((x.shape[0], x.shape[1]) if per_token else x.shape[:1], dtype=torch.float32)
        states = [x]
        for t, block in enumerate(self.blocks):
            z, ld = block(self._in(t, x), y, per_token)
            x = self._in(t, z)
            logdet = logdet + (self._in(t, ld[..., None])[..., 0] if per_token else ld)
            states.append(x)
        return (x, logdet, states) if return_intermediates else (x, logdet)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, use_cache: bool = True,
                upto: int | None = None, on_block: Callable[[int], None] | None = None,
                runner: StepRunner | None = None) -> torch.Tensor:
        """Z^t -> Z^0 through blocks t..1 (t = ``upto``, default n), each sequential over tokens; the blocks'
        decoding steps share one ``runner`` (eager by default) and its buffers."""
        upto = len(self.blocks) if upto is None else upto
        runner = runner or StepRunner()
        for t in reversed(range(upto)):
            z = self._in(t, self.blocks[t].inverse(self._in(t, z), y, use_cache, runner, t))
            if on_block is not None:
                on_block(t)
        return z

    @torch.no_grad()
    def jacobi_inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, tol: float = 1e-5, max_iter: int = 0,
                       on_block: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Z^n -> Z^0 with :meth:`AFBlock.jacobi_inverse` in every block; also the rounds each block took
        (blocks n..1)."""
        rounds = []
        for t in reversed(range(len(self.blocks))):
            x, k = self.blocks[t].jacobi_inverse(self._in(t, z), y, tol, max_iter)
            z = self._in(t, x)
            rounds.append(k)
            if on_block is not None:
                on_block(t)
        return z, rounds

    def one_pass_inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, upto: int | None = None,
                         return_intermediates: bool = False):
        """Student decode: Z~^t -> Z~^0 with one parallel pass per block; optionally every Z~^(t-1)."""
        upto = len(self.blocks) if upto is None else upto
        states = []
        for t in reversed(range(upto)):
            z = self._in(t, self.blocks[t].one_pass_inverse(self._in(t, z), y))
            states.append(z)
        return (z, states) if return_intermediates else z
