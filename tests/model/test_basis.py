"""The optional fixed token bases: per-patch DCT (model.token_basis = "dct") and whole pixels ("whole-pixel")."""

from __future__ import annotations

import pytest
import torch

from farmer_cli.config.files import apply_overrides, load_preset
from farmer_cli.model import Farmer
from farmer_cli.model.patchify import dct_basis, merge_tokens, patchify, whole_pixel_basis


def test_dct_basis_is_orthonormal_and_starts_with_the_mean():
    for p, c in ((2, 1), (4, 1), (4, 3)):
        Q = dct_basis(p, c)
        torch.testing.assert_close(Q @ Q.T, torch.eye(c * p * p), atol=1e-6, rtol=0)
        assert torch.allclose(Q[0, : p * p], torch.full((p * p,), 1.0 / p))  # DC of channel 0 first


def test_dct_orders_frequencies_low_to_high():
    Q = dct_basis(4, 1)
    smooth = torch.ones(16)  # a flat patch lives only in the first (DC) coefficient
    coeffs = smooth @ Q.T
    assert coeffs[0] == 4.0 and coeffs[1:].abs().max() < 1e-5
    checker = torch.tensor([(-1.0) ** (r + c) for r in range(4) for c in range(4)])  # highest frequency
    assert (checker @ Q.T).abs().argmax() >= 12


def test_whole_pixels_put_a_pixel_s_colours_together_coarse_grid_first():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # value = index of (b, c, row, col)
    tokens = patchify(x, 2) @ whole_pixel_basis(2, 3).T  # (2, 4 tokens, 12)
    first = tokens[0, 0, :3]  # the token's pixel (0, 0) in red, green and blue
    assert first.tolist() == [x[0, 0, 0, 0].item(), x[0, 1, 0, 0].item(), x[0, 2, 0, 0].item()]
    merged = merge_tokens(tokens, 2, interleave=True)  # imagenet64-bpd: 48 channels per AR token
    grid = x[0, :, ::2, ::2].permute(1, 2, 0).reshape(4, 3)  # the stride-2 pixels, colours together
    torch.testing.assert_close(merged[0, 0, :12].reshape(3, 4).T, grid)
    assert whole_pixel_basis(4, 1).argmax(1)[:4].tolist() == [0, 2, 8, 10]  # (0,0), (0,2), (2,0), (2,2)


@pytest.mark.parametrize("basis", ["dct", "whole-pixel"])
def test_a_basis_model_round_trips_and_keeps_likelihood_exact(basis: str):
    cfg = apply_overrides(load_preset("tiny"), [f"model.token_basis={basis}"])
    torch.manual_seed(0)
    model = Farmer(cfg.model).eval()
    for block in model.flow.blocks:
        torch.nn.init.normal_(block.out_proj.weight, std=0.05)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    tokens, logdet = model.encode(x)
    torch.testing.assert_close(model.decode(tokens), x, atol=1e-4, rtol=0)
    # An orthonormal basis has |det| = 1: the log-det is the flow's own on the rotated tokens.
    _, flow_logdet = model.flow(model.to_tokens(x))
    torch.testing.assert_close(logdet, flow_logdet)
