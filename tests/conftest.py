"""Shared fixtures: tiny configurations for the model tests, and the tiny run every CLI test reads (trained once per
test session, here, so every module shares it)."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cli_helpers import farmer
from farmer_cli.config.schema import ModelConfig


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


class SyncCounter(TorchDispatchMode):
    """Counts dispatched operators, and those that make the host wait for the device: a value read back
    (``.item()``, ``bool(t)``, ``float(t)``) or a shape that depends on one."""

    SYNCS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "equal",
             "allclose", "repeat_interleave")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket.__name__ in self.SYNCS:
            self.syncs.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    farmer("train", "--preset", "tiny", "--out", str(run), "--steps", "30")
    return run


@pytest.fixture(scope="session")
def digit_png(tmp_path_factory) -> Path:
    from farmer_cli.config.schema import DataConfig
    from farmer_cli.data.dataset import load_data

    u, _ = load_data(DataConfig(source="digits"), 1, 8).test[0]
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray(u[0].numpy()).save(path)
    return path
