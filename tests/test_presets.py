"""Presets load, validate, and the paper presets reproduce Table 1's parameter counts (arXiv v2 §4.1, Table 1)."""

from __future__ import annotations

import pytest
import torch

from farmer_cli.config.schema import ConfigError
from farmer_cli.config.files import apply_overrides, load_preset, preset_names
from farmer_cli.model import Farmer


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str) -> Farmer:
    with torch.device("meta"):
        return Farmer(load_preset(name).model)


def test_every_preset_builds():
    names = preset_names()
    assert {"tiny", "quickstart", "imagenet64-bpd", "imagenet256-patch8", "imagenet256-patch16"} <= set(names)
    for name in names:
        assert count(build(name)) > 0


@pytest.mark.parametrize("name, af, ar", [
    ("imagenet256-1.1b-patch8", 828e6, 295e6),
    ("imagenet256-1.1b-patch16", 849e6, 295e6),  # 849M by our count: v2 Table 1 gives 828M for both patch sizes (docs/deviations.md)
    ("imagenet256-patch8", 1.4e9, None),
    ("imagenet256-patch16", 1.4e9, None),
])
def test_paper_parameter_counts(name: str, af: float, ar: float | None):
    model = build(name)
    assert abs(count(model.flow) - af) / af < 0.05, count(model.flow)
    if ar is not None:
        assert abs(count(model.prior) - ar) / ar < 0.05, count(model.prior)
    else:
        # With linear GMM heads from width 1024 the 1.9B AR comes to 583M, not v2 Table 1's 498M (the head design is
        # not specified in the paper; docs/deviations.md, AR prior size), so we check our own arithmetic.
        assert abs(count(model.prior) - 582e6) / 582e6 < 0.05, count(model.prior)


def test_supplement_likelihood_model_is_about_556m():
    assert abs(count(build("imagenet64-bpd")) - 556e6) / 556e6 < 0.05


def test_patch8_regroups_to_the_papers_ar_layout():
    cfg = load_preset("imagenet256-patch8").model
    assert (cfg.tokens, cfg.token_dim) == (1024, 192)
    assert (cfg.ar_tokens, cfg.ar_token_dim, cfg.d_informative, cfg.d_redundant) == (256, 768, 128, 640)


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(load_preset("tiny"), ["train.lr=0.5", "model.channel_split=false", "data.source=x"])
    assert cfg.train.lr == 0.5 and cfg.model.channel_split is False and cfg.data.source == "x"
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(load_preset("tiny"), ["model.af_blocks=2.5"])
    with pytest.raises(ConfigError, match="informative_dims"):
        apply_overrides(load_preset("tiny"), ["model.informative_dims=4"])
