"""The one transformer layer stack used by every sequence model in farmer (AF blocks, AR prior, student).

Pre-norm layers: ``h = h + Attn(LN(h))``, ``h = h + MLP(LN(h))`` with ``scaled_dot_product_attention``.
Attention is causal (token i attends to tokens <= i) unless ``causal=False`` (the distilled student).

For sequential decoding a :class:`KVCache` stores every layer's keys and values: feeding the next ``t`` tokens
costs O(t · prefix) instead of recomputing attention over the whole prefix.

For training, activation checkpointing (``checkpoint=True``) keeps only each layer's input and recomputes the
layer's activations in the backward pass: activation memory drops from O(layers · activations per layer) to
O(layers · B·T·W + activations of one layer) at the cost of one more forward pass per step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class KVCache:
    """Per-layer key/value buffers of shape (B, heads, capacity, head_dim), preallocated and written in place left
    to right (``length`` positions are filled). With ``max_len`` known (a decoder's sequence length) the buffers
    are allocated once; without, capacity doubles when full (amortised O(1) per token instead of a copy of the
    whole prefix per token)."""

    def __init__(self, num_layers: int, max_len: int | None = None) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, t, hd) keys/values for ``layer`` after the ``length`` cached ones; return views of all
        keys/values so far, (B, H, length + t, hd)."""
        end = self.length + k.shape[2]
        buffer = self.keys[layer]
        if buffer is None or buffer.shape[2] < end:
            capacity = self.max_len if self.max_len and self.max_len >= end else max(2 * end, 16)
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if buffer is not None:
                grown_k[:, :, : self.length] = buffer[:, :, : self.length]
                grown_v[:, :, : self.length] = self.values[layer][:, :, : self.length]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _recompute_with_forward_attention_backends() -> tuple[contextlib.AbstractContextManager,
                                                            contextlib.AbstractContextManager]:
    """``context_fn`` for checkpointing: the recomputation in backward runs with the attention backends that were
    enabled in the forward pass. (Training picks a backend with ``sdpa_kernel`` around the forward pass only; with
    another kernel the recomputation saves different tensors and fails checkpoint's consistency check.)"""
    flags = torch.backends.cuda  # despite the name, these flags steer the CPU kernels too
    enabled = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
                                           (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
                                           (SDPBackend.CUDNN_ATTENTION, flags.cudnn_sdp_enabled()),
                                           (SDPBackend.MATH, flags.math_sdp_enabled())) if on]
    return contextlib.nullcontext(), sdpa_kernel(enabled)


def decoding_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Attention backends for token-by-token decoding, where every step's key length is new.

    On a CUDA GPU, recent PyTorch prefers cuDNN attention on Hopper/Blackwell, and cuDNN builds and caches a graph
    per shape, so decoding would pay that for each of its N key lengths: on an H100 the first AF inverse of an
    imagenet256-patch8 sample call (cut depth) took 62.7 s, ~30 ms a step, and the whole sample 2.6 s once warm.
    Flash / memory-efficient attention need no per-shape setup, so decoding uses them (math as the fallback).
    Elsewhere nothing changes."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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
    def __init__(self, width: int, heads: int, mlp_ratio: float, gelu: str = "exact") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        # erf (TARFlow's GELU): forward + backward 2.3x faster than the tanh approximation on an EPYC CPU
        activation = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation, nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor, causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), causal, cache, layer)
        return h + self.mlp(self.norm2(h))


class TransformerStack(nn.Module):
    """L pre-norm transformer layers followed by a final LayerNorm.

    ``forward(h)``: (B, T, W) -> (B, T, W). ``causal`` is an attribute so a trained causal stack can be turned
    bidirectional (the distillation student) without new parameters. ``checkpoint`` (also an attribute) runs each
    layer under activation checkpointing whenever that can save memory: in training mode, with grad enabled and
    without a KV cache; otherwise (evaluation, ``torch.no_grad``, cached decoding) it has no effect. Outputs and
    gradients are the same either way.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, causal: bool = True,
                 checkpoint: bool = False, gelu: str = "exact") -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio, gelu) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.causal = causal
        self.checkpoint = checkpoint

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for decoding up to ``max_len`` positions (buffers allocated once when given)."""
        return KVCache(len(self.layers), max_len)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        recompute = self.checkpoint and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                h = activation_checkpoint(layer, h, self.causal, None, i, use_reentrant=False,
                                          context_fn=_recompute_with_forward_attention_backends)
            else:
                h = layer(h, self.causal, cache, i)
        if cache is not None:
            cache.length += h.shape[1]
        return self.norm(h)
