"""Training-loop pieces: schedules, deterministic sharded batch order, divergence detection, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from farmer_cli.config.files import load_preset
from farmer_cli.data.batching import batch_indices
from farmer_cli.data.dataset import load_data
from farmer_cli.model import Farmer
from farmer_cli.train.divergence import TrainingDiverged
from farmer_cli.train.engine import lr_factor
from farmer_cli.train.trainer import noise_sigma, train


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.01) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


def test_noise_sigma_cosine_anneal():
    assert noise_sigma(0, 100, 0.1, 0.005) == pytest.approx(0.1)
    assert noise_sigma(50, 100, 0.1, 0.005) == pytest.approx(0.0525)
    assert noise_sigma(100, 100, 0.1, 0.005) == pytest.approx(0.005)


def test_batches_are_sharded_disjoint_and_resumable():
    it0, it1 = batch_indices(100, 8, 2, 0, 3, 0), batch_indices(100, 8, 2, 1, 3, 0)
    first = [(next(it0), next(it1)) for _ in range(12)]  # 12 global batches of 16 > one epoch (6 batches)
    for a, b in first[:6]:
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    epoch = [i for a, b in first[:6] for i in a + b]
    assert len(set(epoch)) == 96  # no repeats within an epoch
    resumed = batch_indices(100, 8, 2, 0, 3, 7)
    assert [next(resumed) for _ in range(5)] == [a for a, _ in first[7:12]]


class _Exploding(Farmer):
    """Produces a non-finite log-det from the 4th call of forward (training step 3) on."""

    calls = 0

    def forward(self, u, y=None, noise="uniform", sigma=0.0):
        out = super().forward(u, y, noise, sigma)
        type(self).calls += 1
        if type(self).calls > 3:
            out["logdet"] = out["logdet"] * float("inf")
            out["bpd"] = out["bpd"] + out["logdet"]
        return out


def test_non_finite_loss_names_step_and_term_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch):
    from farmer_cli.train import trainer as training
    from farmer_cli.device import make_accelerator

    cfg = load_preset("tiny")
    cfg.train.steps, cfg.train.ckpt_every = 10, 2
    monkeypatch.setattr(training, "Farmer", _Exploding)
    data = load_data(cfg.data, 1, 8)
    with pytest.raises(TrainingDiverged, match=r"step 3: .*logdet"):
        train(cfg, data, tmp_path / "run", make_accelerator("fp32"))
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=False)
    assert state["step"] == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temporary files left behind
    assert math.isfinite(sum(v.sum().item() for v in weights.values()))


class _ExplodingLate(_Exploding):
    """A non-finite log-det at training step 5 only (a step that neither logs nor saves)."""

    def forward(self, u, y=None, noise="uniform", sigma=0.0):
        out = Farmer.forward(self, u, y, noise, sigma)
        type(self).calls += 1
        if type(self).calls == 6:
            out["logdet"] = out["logdet"] * float("nan")
            out["bpd"] = out["bpd"] + out["logdet"]
        return out


def test_non_finite_loss_at_a_quiet_step_is_caught_at_the_next_log(tmp_path: Path, monkeypatch):
    """The finiteness check stays on the device until a logging or checkpoint step: a blow-up at step 5 (log every
    4, checkpoint every 4) is reported at step 8 naming step 5 and its term, and the step-4 checkpoint is kept."""
    from farmer_cli.train import trainer as training
    from farmer_cli.device import make_accelerator

    cfg = load_preset("tiny")
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.log_every = 20, 4, 4
    _ExplodingLate.calls = 0
    monkeypatch.setattr(training, "Farmer", _ExplodingLate)
    events = []
    with pytest.raises(TrainingDiverged, match=r"step 5: .*logdet"):
        train(cfg, load_data(cfg.data, 1, 8), tmp_path / "run", make_accelerator("fp32"),
              on_event=lambda e: events.append((e.kind, e.step)))
    assert ("step", 7) in events and ("step", 8) not in events and ("log", 8) not in events  # found at step 8
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=False)["step"] == 4
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "run" / "model.safetensors").values())


def _syncs_per_quiet_step(run) -> list[int]:
    """Host syncs made by each step that neither logs nor checkpoints, from ``run(on_event)`` under a counter."""
    from conftest import SyncCounter

    marks = []
    with SyncCounter() as counter:
        run(lambda e: marks.append((e.kind, e.step, len(counter.syncs))))
    steps = [(step, n) for kind, step, n in marks if kind in ("start", "step")]
    loud = {step for kind, step, _ in marks if kind in ("log", "checkpoint")}
    return [n - before for (_, before), (step, n) in zip(steps, steps[1:]) if step not in loud]


def test_training_and_distillation_steps_that_do_not_log_make_no_host_sync(tmp_path: Path):
    from farmer_cli.checkpoint import load_model
    from farmer_cli.train.distill import distill
    from farmer_cli.device import make_accelerator

    cfg = load_preset("tiny")
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = 7, 3, 100
    cfg.distill.steps = 7
    data = load_data(cfg.data, 1, 8)
    quiet = _syncs_per_quiet_step(lambda on_event: train(cfg, data, tmp_path / "run", make_accelerator("fp32"),
                                                         on_event=on_event))
    assert quiet == [0] * 4, quiet  # steps 1, 2, 4, 5 of 1..7 (3 and 6 log, 7 logs and saves)
    model, cfg, _, _ = load_model(tmp_path / "run")
    quiet = _syncs_per_quiet_step(lambda on_event: distill(model, cfg, data, tmp_path / "run", make_accelerator("fp32"),
                                                           on_event=on_event))
    assert quiet == [0] * 4, quiet


def test_foreach_ema_equals_the_per_tensor_update():
    from farmer_cli.train.distributed import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    ema = EMA(model)
    reference = [e.clone() for e in ema.shadows]
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(step, 0.9)
        d = min(0.9, (1 + step) / (10 + step))
        for r, p in zip(reference, model.parameters()):  # the per-tensor loop the foreach update replaced
            r.lerp_(p.detach(), 1 - d)
    for e, r in zip(ema.shadows, reference):
        torch.testing.assert_close(e, r, rtol=0, atol=1e-7)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path):
    """Micro-batch 16 x 2 accumulation takes the same optimiser steps as batch 32 (no noise, no label dropout, so
    the only difference is how the batch is split)."""
    from farmer_cli.config.files import apply_overrides
    from farmer_cli.device import make_accelerator

    acc = make_accelerator("fp32")
    weights = []
    for batch, accum in ((32, 1), (16, 2)):
        cfg = apply_overrides(load_preset("tiny"), [f"train.batch_size={batch}", f"train.grad_accum_steps={accum}",
                                                    "train.steps=3", "train.label_dropout=0", "train.noise_start=0",
                                                    "train.noise_end=0", "train.eval_batches=1"])
        data = load_data(cfg.data, 1, 8)
        weights.append(train(cfg, data, tmp_path / f"b{batch}", acc).model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_compiled_model_keeps_parameter_names_and_likelihoods():
    """train.compile compiles the flow and the prior in place: the same state-dict keys (checkpoints stay
    loadable without it) and the same exact likelihoods and gradients, up to float rounding."""
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    plain = Farmer(cfg.model)
    compiled = Farmer(cfg.model)
    compiled.load_state_dict(plain.state_dict())
    compiled.flow.compile()
    compiled.prior.compile()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    y = torch.tensor([0, 1, 2, 3])
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a, b = plain.nll_continuous(x, y), compiled.nll_continuous(x, y)
    for key in ("nll", "logdet", "log_p_info", "log_p_red"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-3, msg=key)
    a["nll"].sum().backward()
    b["nll"].sum().backward()
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
