"""Shared tiny configurations and helpers for the model tests (CPU, a few seconds per file)."""

import pytest
import torch
from torch import nn

from farmer_cli.config import ModelConfig


def _tiny_cfg(**overrides) -> ModelConfig:
    base = dict(image_size=8, channels=1, patch_size=2, af_blocks=2, af_layers=1, af_width=32, af_heads=2,
                ar_layers=1, ar_width=32, ar_heads=2, cond_repeat=4, informative_dims=2,
                informative_components=4, redundant_components=8, num_classes=10)
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def _randomise_out_proj(flow, std: float = 0.1) -> None:
    """The AF's output projections start at zero (identity flow); give them random weights and biases."""
    with torch.no_grad():
        for block in flow.blocks:
            nn.init.normal_(block.out_proj.weight, std=std)
            nn.init.normal_(block.out_proj.bias, std=std)


@pytest.fixture
def single_thread():
    """The model tests use tiny tensors: one intra-op thread is as fast and immune to CPU oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_cfg():
    """Factory: tiny_cfg(**overrides) -> the tiny ModelConfig of presets/tiny.toml (8x8x1, patch 2, N=16, d=4)."""
    return _tiny_cfg


@pytest.fixture
def randomise_out_proj():
    return _randomise_out_proj
