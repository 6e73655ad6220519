"""AR prior over the AF latent with the informative / redundant channel split (arXiv v2 §3.2–3.3).

Each AR token z_i (after the optional token merge) is split channel-wise into z_i^I (first d_I channels,
informative) and z_i^R (the remaining d_R, redundant). A causal transformer reads

    [c, c, ..., c (M copies of the class embedding), z_1^I, ..., z_N^I]      (positions 0 .. M+N-1)

with a learned position embedding over all M+N positions (so the M copies differ by position only). The output
at position M-2+i predicts G_i, a K_I-component GMM for z_i^I; the output at the last position predicts ONE
K_R-component GMM G_{N+1} from which every z_i^R is scored i.i.d.:

    log p(Z | c) = sum_i log G_i(z_i^I | z_<i^I, c)  +  sum_i log G_{N+1}(z_i^R | Z^I, c)

Index ``num_classes`` of the class table is the learned null class used for classifier-free guidance.
``cfg.grad_checkpoint`` turns on activation checkpointing of the transformer in training (``cfg.checkpoint_fraction``
of its layers; see
:class:`TransformerStack`).
"""

from __future__ import annotations

import torch
from torch import nn

from farmer_cli.config.schema import ModelConfig
from farmer_cli.model.attention import KVCache, TransformerStack
from farmer_cli.model.gmm import GMMHead


class ARPrior(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.M, self.N = cfg.cond_repeat, cfg.ar_tokens
        self.d_I, self.d_R = cfg.d_informative, cfg.d_redundant
        self.null_class = cfg.num_classes
        W = cfg.ar_width
        self.class_emb = nn.Embedding(cfg.num_classes + 1, W)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        self.in_proj = nn.Linear(self.d_I, W)
        self.pos = nn.Parameter(torch.randn(1, self.M + self.N, W) * 0.02)
        self.stack = TransformerStack(W, cfg.ar_layers, cfg.ar_heads, cfg.mlp_ratio, checkpoint=cfg.checkpoint_share,
                                      gelu=cfg.gelu)
        self.info_head = GMMHead(W, cfg.informative_components, self.d_I, cfg.min_scale)
        self.red_head = GMMHead(W, cfg.redundant_components, self.d_R, cfg.min_scale) if self.d_R else None

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> informative (B, N, d_I), redundant (B, N, d_R)."""
        return z[..., : self.d_I], z[..., self.d_I :]

    def _embed(self, y: torch.Tensor, z_info: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of sequence positions start .. M+t-1 given t informative tokens so far: (B, M+t-start, W)."""
        parts = []
        if start < self.M:
            parts.append(self.class_emb(y)[:, None].expand(-1, self.M - start, -1))
        tokens = z_info[:, max(start - self.M, 0) :]
        if tokens.shape[1]:
            parts.append(self.in_proj(tokens))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return h + self.pos[:, start : start + h.shape[1]]

    def forward(self, z: torch.Tensor, y: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, N, d) AR tokens, y (B,) class indices -> (log p(Z^I|c), log p(Z^R|Z^I,c)), each (B,) float32, or
        with ``per_token`` each token's term, (B, N) each."""
        z_info, z_red = self.split(z)
        out = self.stack(self._embed(y, z_info[:, :-1] if self.red_head is None else z_info, 0))
        info = self.info_head(out[:, self.M - 1 : self.M - 1 + self.N])  # (B, N, K_I, ...)
        log_info = info.log_prob(z_info[:, :, None]).squeeze(-1)  # (B, N)
        if self.red_head is None:
            log_red = torch.zeros_like(log_info)
        else:  # one mixture per sample; all N redundant vectors share it
            log_red = self.red_head(out[:, -1]).log_prob(z_red)  # (B, N)
        return (log_info, log_red) if per_token else (log_info.sum(-1), log_red.sum(-1))

    def next_hidden(self, y: torch.Tensor, z_info: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, W) at the last position given the prefix z_info (B, t, d_I), the whole prefix
        recomputed (the reference path for tests and benchmarks; decoding uses :meth:`prefill` and
        :meth:`token_step`)."""
        return self.stack(self._embed(y, z_info, 0))[:, -1]

    def prefill(self, y: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the M class positions of classes y (B,) into an empty cache: the hidden state (B, W) that predicts
        the first informative token."""
        return self.stack(self._embed(y, self.pos.new_zeros(y.shape[0], 0, self.d_I), 0), cache)[:, -1]

    def token_step(self, z_info: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One fixed-shape decoding step: feed informative token p - M of z_info (B, N, d_I) at sequence position
        p = ``cache.position``; the hidden state (B, W) that predicts the next token (or, after the last one, the
        shared redundant mixture). Every index is a device tensor, so the step is the same at every p."""
        fed = cache.position.view(1)
        h = self.in_proj(z_info.index_select(1, fed - self.M)) + self.pos.index_select(1, fed)
        return self.stack(h, cache)[:, -1]
