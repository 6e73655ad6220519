"""The one transformer layer stack used by every sequence model in farmer (AF blocks, AR prior, student).

Pre-norm layers: ``h = h + Attn(LN(h))``, ``h = h + MLP(LN(h))`` with ``scaled_dot_product_attention``.
Attention is causal (token i attends to tokens <= i) unless ``causal=False`` (the distilled student).

For sequential decoding a :class:`KVCache` stores every layer's keys and values: feeding the next ``t`` tokens
costs O(t · prefix) instead of recomputing attention over the whole prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Per-layer key/value buffers of shape (B, heads, max_len, head_dim), filled left to right."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, t, hd) keys/values for ``layer``; return all keys/values so far."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. drop the unconditional half after guidance)."""
        self.keys = [k[index] if k is not None else None for k in self.keys]
        self.values = [v[index] if v is not None else None for v in self.values]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        """h: (B, t, W) -> (B, t, W). With a cache, the t new tokens follow the cache's ``length`` tokens."""
        B, t, W = h.shape
        q, k, v = self.qkv(h).view(B, t, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
        if not causal or t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # t new tokens after a prefix: new token j sees positions <= past + j
            mask = torch.ones(t, past + t, dtype=torch.bool, device=h.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, t, W))


class TransformerLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor, causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), causal, cache, layer)
        return h + self.mlp(self.norm2(h))


class TransformerStack(nn.Module):
    """L pre-norm transformer layers followed by a final LayerNorm.

    ``forward(h)``: (B, T, W) -> (B, T, W). ``causal`` is an attribute so a trained causal stack can be turned
    bidirectional (the distillation student) without new parameters.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.causal = causal

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, self.causal, cache, i)
        if cache is not None:
            cache.length += h.shape[1]
        return self.norm(h)
