"""Generating many images: fixed micro-batches over a global image index, shared out across processes, with every
image's randomness drawn from its own stream seeded by (seed, image index).

Image i of a call always lands in micro-batch i // batch; micro-batch c runs on process c % world. So the same
``seed`` and ``batch`` give byte-identical images on 1 or N processes (each micro-batch is the same computation),
and image i's random draws do not depend on which other images share its batch (other batch sizes change an image
only by floating-point rounding).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from farmer_cli.config.schema import SamplingConfig
from farmer_cli.device import autocast, require_memory
from farmer_cli.model import Farmer
from farmer_cli.model.randomness import ImageStreams
from farmer_cli.memory_plan import WORKSPACE_FACTOR, saved_bytes_by_depth

CPU_DENOISE_BUDGET = 2 << 30  # bytes of denoising activations per micro-batch on a CPU; a GPU gets 1/4 of its memory


def denoise_bytes_per_image(model: Farmer, checkpoint: bool) -> int:
    """Memory of one image's denoising pass (bytes): what autograd keeps for the score's backward pass (with
    ``checkpoint``, one input per transformer layer) plus the backward workspace, counted on the meta device
    (:func:`~farmer_cli.memory_plan.saved_bytes_by_depth`, the count ``farmer train --dry-run`` makes). Counted in
    float32: an upper bound under bf16 autocast."""
    saved, largest = saved_bytes_by_depth(model.cfg, checkpoint)
    return int(saved + WORKSPACE_FACTOR * largest)


def plan_denoise(model: Farmer, images: int, budget: int | None = None) -> tuple[int, bool]:
    """(images per denoising pass, activation checkpointing) for ``images`` images within ``budget`` bytes
    (default: a quarter of the GPU's memory, or :data:`CPU_DENOISE_BUDGET` on a CPU): all at once without
    checkpointing when they fit, else checkpointed (one more forward pass) and as many per pass as fit."""
    if budget is None:
        device = model.device
        cuda = device.type == "cuda"
        budget = torch.cuda.get_device_properties(device).total_memory // 4 if cuda else CPU_DENOISE_BUDGET
    if images * denoise_bytes_per_image(model, checkpoint=False) <= budget:
        return images, False
    return max(1, min(images, budget // denoise_bytes_per_image(model, checkpoint=True))), True


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels 0, 1, ..., K-1, 0, 1, ... for n images: (n,) int64."""
    return torch.arange(n) % num_classes


def my_chunks(n: int, batch: int, rank: int = 0, world: int = 1) -> list[range]:
    """The global image-index ranges (micro-batches of ``batch``) that process ``rank`` of ``world`` generates."""
    starts = range(0, n, batch)
    return [range(s, min(s + batch, n)) for c, s in enumerate(starts) if c % world == rank]


@torch.no_grad()
def generate_chunks(model: Farmer, labels: torch.Tensor, s: SamplingConfig, seed: int, batch: int, *,
                    student=None, rank: int = 0, world: int = 1, precision: str = "fp32", denoise_batch: int = 0,
                    stats: dict | None = None, on_token: Callable[[int], None] | None = None,
                    on_block: Callable[[int], None] | None = None) -> Iterator[tuple[range, torch.Tensor]]:
    """Images for labels (n,) in micro-batches, this process's share: yields (global indices, uint8 images
    (b, C, H, W) on the CPU). Memory is bounded by ``batch`` (and ``denoise_batch``, 0: :func:`plan_denoise`),
    whatever n is; resampling guidance that cannot fit the device is a DeviceError before the first image.
    ``precision``: fp32, bf16 or fp16 (:func:`farmer_cli.device.autocast`)."""
    at_once = min(batch, len(labels))
    require_memory(model.guidance_bytes(at_once, s), model.device,
                   f"guided sampling of {at_once} images at once with {s.cond_candidates} + {s.uncond_candidates} "
                   f"candidates per token and a redundant pool of {s.redundant_pool or 'twice the tokens'}",
                   "lower --candidates (sampling.cond_candidates, uncond_candidates), sampling.redundant_pool or "
                   "--batch-size", share=world)
    if denoise_batch:  # the caller sized it: checkpointed, the smallest footprint per image
        denoise = (min(denoise_batch, batch), True)
    else:
        denoise = plan_denoise(model, batch) if model.denoise_sigma(s) > 0 else (batch, False)
    return _chunks(model, labels, s, seed, batch, student, rank, world, precision, denoise, stats, on_token, on_block)


def _chunks(model, labels, s, seed, batch, student, rank, world, precision, denoise, stats, on_token, on_block
            ) -> Iterator[tuple[range, torch.Tensor]]:
    """The generator behind :func:`generate_chunks` (which checks memory when called, not at the first image)."""
    for chunk in my_chunks(len(labels), batch, rank, world):
        rng = ImageStreams.for_images(seed, chunk, model.device)
        with autocast(model.device, precision):
            images = model.sample(labels[chunk.start:chunk.stop], s, rng, student=student, on_token=on_token,
                                  on_block=on_block, stats=stats, denoise_batch=denoise[0],
                                  denoise_checkpoint=denoise[1])
        yield chunk, images.cpu()


def generate(model: Farmer, n: int, s: SamplingConfig, seed: int, batch: int,
             student=None) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples on this process -> (uint8 (n, C, H, W), labels (n,))."""
    labels = balanced_labels(n, model.cfg.num_classes)
    images = [chunk_images for _, chunk_images in generate_chunks(model, labels, s, seed, batch, student=student)]
    return torch.cat(images), labels
