"""Where sampling's random numbers come from: one generator for the whole batch, or one stream per image.

Every random draw of sampling has the batch (image) as its leading dim and is made from float64 uniforms:
:func:`normal` by the inverse error function, :func:`categorical` by inverting the cumulative weights. Two sources
give those uniforms:

* :class:`SharedGenerator` — a ``torch.Generator`` (or the global one) for the whole batch; what library callers
  get when they pass a generator.
* :class:`ImageStreams` — one generator per image, seeded from (seed, image index), read through a per-image
  buffer. Image i's draws then depend only on (seed, i), not on the batch it shares or on the process that
  generates it (see :mod:`farmer_cli.sample.generate`).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, Union

import numpy as np
import torch

_TINY = 2.0**-53  # uniforms are kept in [_TINY, 1 - _TINY]: normals stay finite (|z| < 8.3)


class Randomness(Protocol):
    def uniform(self, shape: Sequence[int]) -> torch.Tensor:
        """float64 uniforms of ``shape`` = (B, ...), B the batch this source was made for."""


class SharedGenerator:
    """One ``torch.Generator`` (None: torch's global one) for every image of the batch."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator, self.device = generator, device

    def uniform(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, device=self.device, dtype=torch.float64)


class ImageStreams:
    """One random stream per image: B generators on ``device``, each refilling its own buffer of uniforms.

    An image's stream is a function of its seed alone (its generator's uniforms in order; draws take consecutive
    pieces of it), so the numbers image i receives do not depend on its batch or its position in it.

    Every generator call draws exactly ``block`` values (32,768 float64). On a CUDA device which Philox counter
    feeds which element depends on the launch grid, which PyTorch caps at what the GPU holds at once
    (streaming multiprocessors x resident blocks); a call of 32,768 values needs 128 blocks of 256 threads,
    below that cap on any GPU with at least 16 multiprocessors of 2,048 threads (or 32 of 1,024), so on all of
    those the same seed gives the same uniforms. Larger calls would not (the redundant step draws ~655k values
    per image at imagenet256-patch8). CPU and CUDA generators are different algorithms: the same seed gives
    different images on a CPU and on a GPU."""

    def __init__(self, seeds: Sequence[int], device: torch.device, block: int = 1 << 15) -> None:
        self.device, self.block = torch.device(device), block
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        self.buffer = torch.empty(len(seeds), 0, dtype=torch.float64, device=self.device)

    @classmethod
    def for_images(cls, seed: int, indices: Sequence[int], device: torch.device) -> "ImageStreams":
        """Streams for images ``indices`` of a call seeded with ``seed``."""
        return cls([image_seed(seed, i) for i in indices], device)

    def uniform(self, shape: Sequence[int]) -> torch.Tensor:
        B, k = shape[0], math.prod(shape[1:])
        if B != len(self.generators):
            raise ValueError(f"a draw for {B} images from streams made for {len(self.generators)}")
        if self.buffer.shape[1] < k:
            calls = math.ceil((k - self.buffer.shape[1]) / self.block)
            fresh = [torch.rand(self.block, generator=g, device=self.device, dtype=torch.float64)
                     for g in self.generators for _ in range(calls)]  # image-major: generator i's calls in order
            self.buffer = torch.cat([self.buffer, torch.stack(fresh).view(len(self.generators), -1)], dim=1)
        out, self.buffer = self.buffer[:, :k], self.buffer[:, k:]
        return out.reshape(tuple(shape))


RandomSource = Union[torch.Generator, Randomness, None]


def image_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for image ``index`` of a call with ``seed`` (NumPy's SeedSequence hash)."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32).tolist()
    return ((hi << 32) | lo) & (2**63 - 1)


def as_randomness(source: RandomSource, device: torch.device) -> Randomness:
    """A generator (or None for torch's global one) becomes a :class:`SharedGenerator`; streams pass through."""
    if source is None or isinstance(source, torch.Generator):
        return SharedGenerator(source, device)
    return source


def normal(rng: Randomness, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals of ``shape`` = (B, ...): sqrt(2)·erfinv(2u - 1)."""
    u = rng.uniform(shape).clamp(_TINY, 1.0 - _TINY)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).to(dtype)


def categorical(rng: Randomness, probs: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` draws with replacement from each distribution of probs (B, ..., K) (need not sum to 1):
    (B, ..., count) int64, by inverting the cumulative weights."""
    cdf = probs.double().cumsum(-1)
    u = rng.uniform((*probs.shape[:-1], count)) * cdf[..., -1:]
    return torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp_(max=probs.shape[-1] - 1)
