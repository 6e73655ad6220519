"""The one transformer layer stack used by every sequence model in farmer (AF blocks, AR prior, student).

Pre-norm layers: ``h = h + Attn(LN(h))``, ``h = h + MLP(LN(h))`` with ``scaled_dot_product_attention``.
Attention is causal (token i attends to tokens <= i) unless ``causal=False`` (the distilled student).

For sequential decoding a :class:`KVCache` stores every layer's keys and values: feeding the next ``t`` tokens
costs O(t · prefix) instead of recomputing attention over the whole prefix, with the same shapes at every step.

For training (and denoising), activation checkpointing (``checkpoint=True``) keeps only each layer's input and
recomputes the layer's activations in the backward pass: activation memory drops from O(layers · activations per
layer) to O(layers · B·T·W + activations of one layer) at the cost of one more forward pass per step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class KVCache:
    """Fixed-shape key/value storage for token-by-token decoding.

    Per layer a (B, heads, capacity, head_dim) key and value buffer, zero-filled, in the dtype the keys are computed
    in (bfloat16 under bf16 autocast, see :func:`activation_dtype`). The next write position is ``position``, a
    0-dim int64 tensor on the buffers' device advanced in place, so a decoding step has no Python value that
    changes from token to token: its shapes and the addresses it touches are the same every step, which is what
    ``torch.compile`` (one graph for all positions) and CUDA graphs (capture once, replay per token) need.

    Attention reads the first ``span`` positions of the buffers under a mask (key j is visible to new token r iff
    j <= position + r). The decoder sets ``span`` (:meth:`~.steps.StepRunner.attend`): the exact filled length when
    running eagerly (then one new token needs no mask), a bucket of it for CUDA graphs (one graph per bucket),
    ``capacity`` for a compiled step. Buffers may be reused by several decoders of the same shape (the AF
    blocks): :meth:`restart` rewinds the position; stale entries beyond it are finite and masked.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity
        self.span = capacity
        self.exact_span = False  # span == filled positions: one new token needs no mask
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._key_index = torch.arange(capacity, device=device)
        self._write_index: torch.Tensor | None = None  # (t,) positions of the tokens being fed
        self.mask: torch.Tensor | None = None  # (t, span) bool for the tokens being fed

    def restart(self) -> None:
        """Decode a new sequence into the same buffers (position 0)."""
        self.position.zero_()

    def begin(self, t: int) -> None:
        """Before feeding t new tokens: their write positions and their (t, span) attention mask."""
        self._write_index = self.position + torch.arange(t, device=self.position.device)
        exact = t == 1 and self.exact_span
        self.mask = None if exact else self._key_index[: self.span] <= self._write_index[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, t, hd) keys/values of ``layer`` at the current positions; return the (B, H, span, hd)
        keys/values attention reads."""
        self.keys[layer].index_copy_(2, self._write_index, k)
        self.values[layer].index_copy_(2, self._write_index, v)
        return self.keys[layer][:, :, : self.span], self.values[layer][:, :, : self.span]

    def advance(self, t: int) -> None:
        """After feeding t tokens: the next write position moves on by t (in place, on the device)."""
        self.position.add_(t)


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


def activation_dtype(device: torch.device | str, weights: torch.dtype) -> torch.dtype:
    """The dtype linear layers compute in on ``device`` here: autocast's while it is on for floating weights,
    else the weights' own."""
    device_type = torch.device(device).type
    if weights.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weights


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        """h: (B, t, W) -> (B, t, W). With a cache, the t new tokens follow the cache's ``position`` tokens."""
        B, t, W = h.shape
        q, k, v = self.qkv(h).view(B, t, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # the t new tokens after what the cache holds; the mask says which keys are filled
            k, v = cache.write(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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
    bidirectional (the distillation student) without new parameters. ``checkpoint`` (also an attribute; a share of
    the layers, 0 to 1, or a bool for none / all) runs the first round(checkpoint·L) layers under activation
    checkpointing whenever that can save memory: in training mode (or in evaluation mode
    inside :func:`checkpointing`: the denoising step's backward pass), with grad enabled and without a KV cache;
    otherwise (evaluation, ``torch.no_grad``, cached decoding) it has no effect. Outputs and gradients are the
    same either way.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, causal: bool = True,
                 checkpoint: float = 0.0, gelu: str = "exact") -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio, gelu) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.causal = causal
        self.checkpoint = checkpoint  # share of the layers recomputed: the first round(checkpoint * L); True = all
        self.checkpoint_in_eval = False  # set by :func:`checkpointing` for the denoising step

    def new_cache(self, batch: int, capacity: int, device: torch.device | str) -> KVCache:
        """An empty cache for decoding ``batch`` sequences of up to ``capacity`` positions (causal stacks only), in
        the dtype this stack's keys are computed in here (:func:`activation_dtype`)."""
        attn = self.layers[0].attn
        head_dim = attn.qkv.in_features // attn.heads
        return KVCache(len(self.layers), batch, attn.heads, capacity, head_dim, device,
                       activation_dtype(device, attn.qkv.weight.dtype))

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        active = (self.training or self.checkpoint_in_eval) and cache is None and torch.is_grad_enabled()
        recomputed = round(float(self.checkpoint) * len(self.layers)) if active else 0
        if cache is not None:
            cache.begin(h.shape[1])
        for i, layer in enumerate(self.layers):
            if i < recomputed:
                h = activation_checkpoint(layer, h, self.causal, None, i, use_reentrant=False,
                                          context_fn=_recompute_with_forward_attention_backends)
            else:
                h = layer(h, self.causal, cache, i)
        if cache is not None:
            cache.advance(h.shape[1])
        return self.norm(h)


@contextlib.contextmanager
def checkpointing(module: nn.Module, enabled: bool = True):
    """Activation checkpointing of every layer of every :class:`TransformerStack` of ``module`` for the duration
    (restored after): the denoising step's backward pass keeps one input per layer instead of every activation."""
    stacks = [m for m in module.modules() if isinstance(m, TransformerStack)]
    before = [(stack.checkpoint, stack.checkpoint_in_eval) for stack in stacks]
    for stack in stacks:
        stack.checkpoint, stack.checkpoint_in_eval = (1.0 if enabled else stack.checkpoint), enabled
    try:
        yield
    finally:
        for stack, (flag, in_eval) in zip(stacks, before):
            stack.checkpoint, stack.checkpoint_in_eval = flag, in_eval
