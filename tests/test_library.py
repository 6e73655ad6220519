"""The library under the CLI: no UI imports, the config gate, the inference API, the engine's stop handling."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farmer_cli.config.schema import ConfigError, SamplingConfig
from farmer_cli.config.files import apply_overrides, apply_sampling_preset, from_dict, load_preset
from farmer_cli.model import Farmer, dequantize
from cli_helpers import ENV, farmer


def test_library_imports_no_ui():
    """Every module outside the CLI layer (app.py, __main__.py, commands/) imports without typer or rich (listed
    from the files, not with walk_packages, which would import commands/ to look inside it)."""
    code = ("import importlib, pathlib, sys, farmer_cli\n"
            "ui = ('farmer_cli.app', 'farmer_cli.__main__', 'farmer_cli.commands', 'farmer_cli.presets')\n"
            "root = pathlib.Path(farmer_cli.__path__[0])\n"
            "names = [('farmer_cli.' + '.'.join(p.relative_to(root).with_suffix('').parts)).removesuffix('.__init__')"
            " for p in sorted(root.rglob('*.py'))]\n"
            "names = [n for n in names if not n.startswith(ui)]\n"
            "for name in names: importlib.import_module(name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('typer', 'rich')]\n"
            "assert not bad and len(names) > 30 and 'farmer_cli.data.sources' in names, (bad, names)")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)


# ----- the config gate -----
@pytest.mark.parametrize("override, message", [
    ("train.noise=gausian", "did you mean 'gaussian'"),
    ("train.mixed_precision=fp8", "must be one of auto, fp32, bf16, fp16"),
    ("sampling.guidance=x", "must be one of resample, simple"),
    ("model.token_basis=DCT", "did you mean 'dct'"),
    ("train.lr=nan", "finite"),
    ("sampling.cfg=inf", "finite"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("data.test_fraction=1", "data.test_fraction must be in [0, 1)"),
    ("sampling.temperature=-1", "sampling.temperature must be > 0"),
    ("distill.steps=0", "distill.steps must be >= 1"),
    ("model.af_width=0", "model.af_width must be >= 1"),
])
def test_config_gate_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_overrides(load_preset("tiny"), [override])


def test_stored_config_must_be_a_table_and_preset_names_stay_plain():
    with pytest.raises(ConfigError, match="expected a table"):
        from_dict(None)
    with pytest.raises(ConfigError, match="plain name"):
        from_dict({"preset": "../../x", "model": {}})
    with pytest.raises(ConfigError, match=r"no \[model\] section"):
        from_dict({"preset": "edited", "train": {}})


def test_sampling_presets_live_with_the_presets():
    cfg = apply_sampling_preset(load_preset("tiny"), "unguided")
    assert (cfg.sampling.cfg, cfg.sampling.var_scale, cfg.sampling.temperature) == (0.0, 0.9, 1.3)
    with pytest.raises(ConfigError, match="did you mean 'unguided'"):
        apply_sampling_preset(load_preset("tiny"), "unguidded")


def test_sample_set_takes_sampling_keys_only():
    with pytest.raises(ConfigError, match="only sampling"):
        apply_overrides(load_preset("tiny"), ["train.lr=1"], allowed=("sampling",))


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "tiny", "--mixed-precision", "fp8"], "is not one of 'auto', 'fp32', 'bf16', 'fp16'"),
    (["train", "--preset", "tiny", "--steps", "3", "--set", "train.epochs=50"], "both decide train.steps / train.epochs"),
    (["train", "--preset", "tiny", "--lr", "1e-3", "--set", "train.lr=2e-3"], "--lr and --set train.lr=2e-3"),
    (["train", "--preset", "tiny", "--set", "train.noise=foo"], "train.noise"),
    (["train", "--preset", "tiny", "--lr", "nan"], "finite"),
    (["train", "--preset", "tiny", "--steps", "5", "--epochs", "2"], "not both"),
])
def test_cli_config_errors_exit_2(args, message, tmp_path: Path):
    proc = farmer(*args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_enumerated_options_are_declared_as_the_librarys_choices():
    """Options whose choices the command spells out (so that --help needs no torch) list the library's."""
    from typing import get_args

    from farmer_cli.commands import evaluate as evaluate_command, ood as ood_command
    from farmer_cli.eval import inception, ood

    assert get_args(ood_command.ScoreChoice) == (*ood.SCORES, "all")
    assert get_args(evaluate_command.ResizeRule) == tuple(inception.RESIZE_RULES)


def test_one_precision_vocabulary_and_accelerates_word_for_fp32():
    assert apply_overrides(load_preset("tiny"), ["train.mixed_precision=no"]).train.mixed_precision == "fp32"
    assert apply_overrides(load_preset("tiny"), ["train.mixed_precision=fp32"]).train.mixed_precision == "fp32"


def test_explicit_steps_beat_a_presets_epochs(tmp_path: Path):
    preset = tmp_path / "epochs.toml"
    preset.write_text(load_preset_text("tiny").replace("[train]", "[train]\nepochs = 50")
                      .replace('preset = "tiny"', 'preset = "epochs"'))
    farmer("train", "--preset", str(preset), "--steps", "3", "--out", str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["step"] == 3


def load_preset_text(name: str) -> str:
    return (Path(__file__).resolve().parent.parent / "presets" / f"{name}.toml").read_text()


# ----- inference API -----
def test_class_log_likelihoods_match_the_conditional_nll(tiny_cfg):
    torch.manual_seed(0)
    model = Farmer(tiny_cfg()).eval()
    u = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    x = dequantize(u, "uniform", generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 4, 9])
    with torch.no_grad():
        table = model.class_log_likelihoods(x, classes)
        for j, c in enumerate(classes.tolist()):
            nll = model.nll_continuous(x, torch.full((3,), c))["nll"]
            expected = -nll + tiny_cfg().dims * math.log(128.0)
            torch.testing.assert_close(table[:, j], expected, rtol=1e-5, atol=1e-3)


def test_informative_sample_hides_the_guided_batch_layout(tiny_cfg):
    model = Farmer(tiny_cfg()).eval()
    y = torch.tensor([1, 2])
    guided = model.sample_informative(y, SamplingConfig(cfg=2.0), torch.Generator().manual_seed(0))
    assert guided.tokens.shape[0] == 2 and guided.redundant.logits.shape[0] == 2
    assert guided.redundant_null.logits.shape[0] == 2
    plain = model.sample_informative(y, SamplingConfig(), torch.Generator().manual_seed(0))
    assert plain.redundant_null is None


def test_denoising_sigma_travels_with_the_model(tiny_run: Path):  # noqa: F811
    from farmer_cli.checkpoint import load_model

    model, cfg, _, _ = load_model(tiny_run, device="cpu")
    assert model.trained_noise_sigma == cfg.train.noise_end
    assert model.denoise_sigma(SamplingConfig(denoise=False)) == 0.0


def test_runs_from_before_model_gelu_keep_their_tanh_gelu(tiny_run: Path, tmp_path: Path):  # noqa: F811
    """New models use the exact (erf) GELU; a run whose config.json predates ``model.gelu`` was trained with the
    tanh approximation and must load with it (and give the same log-likelihoods as before)."""
    import shutil

    from farmer_cli.checkpoint import load_model

    new_model, new_cfg, _, _ = load_model(tiny_run, device="cpu")
    assert new_cfg.model.gelu == "exact" and new_model.flow.blocks[0].stack.layers[0].mlp[1].approximate == "none"
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    payload = json.loads((old / "config.json").read_text())
    del payload["config"]["model"]["gelu"]
    (old / "config.json").write_text(json.dumps(payload))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(old / "model.safetensors"), "pt") as fh:  # weights of then: no record of their model settings
        metadata = {k: v for k, v in fh.metadata().items() if k != "model"}
    save_file(load_file(str(old / "model.safetensors")), str(old / "model.safetensors"), metadata=metadata)
    old_model, old_cfg, _, _ = load_model(old, device="cpu")
    assert old_cfg.model.gelu == "tanh"
    assert all(m.approximate == "tanh" for m in old_model.modules() if isinstance(m, torch.nn.GELU))
    u = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1])

    def bpd(model):
        torch.manual_seed(0)  # the same dequantisation noise for both
        with torch.no_grad():
            return model(u, y, noise="uniform")["bpd"]

    assert torch.equal(bpd(new_model), bpd(new_model))
    assert not torch.equal(bpd(new_model), bpd(old_model))
    assert torch.allclose(bpd(new_model), bpd(old_model), atol=0.05)


def test_step_checkpoints_are_kept_k_deep_and_resume_falls_back_to_them(tmp_path: Path):
    run = tmp_path / "r"
    farmer("train", "--preset", "tiny", "--out", str(run), "--steps", "12", "--set", "train.ckpt_every=3",
           "--set", "train.keep_checkpoints=2", "--stop-after", "9")
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000006", "step-00000009"]
    for name in ("training_state.pt", "model.safetensors", "config.json"):
        assert (run / "checkpoints" / "step-00000009" / name).exists()
    assert torch.load(run / "checkpoints" / "step-00000006" / "training_state.pt", weights_only=True)["step"] == 6
    (run / "training_state.pt").write_bytes(b"truncated by a crash")
    farmer("train", "--out", str(run), "--resume")
    assert torch.load(run / "training_state.pt", weights_only=True)["step"] == 12
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12


@pytest.mark.parametrize("command", ["sample", "score", "evaluate", "inspect-channels"])
def test_missing_device_is_one_line_exit_2(command, tiny_run: Path, tmp_path: Path):  # noqa: F811
    args = [command, "--ckpt", str(tiny_run), "--device", "cuda:3"]
    if command == "score":
        args.insert(1, str(Path(__file__).resolve().parent.parent / "docs" / "quickstart-threes.png"))
    proc = farmer(*args, cwd=tmp_path, check=False)
    if not torch.cuda.is_available():
        assert proc.returncode == 2 and "cuda" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sample_with_the_jacobi_decoder(tiny_run: Path, tmp_path: Path):  # noqa: F811
    proc = farmer("sample", "--ckpt", str(tiny_run), "--class", "3", "--n", "4", "--decoder", "jacobi",
                  "--out", str(tmp_path / "j.png"))
    assert "jacobi (" in proc.stderr and "rounds per block" in proc.stderr and (tmp_path / "j.png").exists()
    bad = farmer("sample", "--ckpt", str(tiny_run), "--decoder", "parallel", "--out", str(tmp_path / "x.png"),
                 check=False)
    assert bad.returncode == 2 and "Invalid value for '--decoder'" in bad.stderr


def test_distill_resume_keeps_its_schedule(tmp_path: Path):
    run = tmp_path / "r"
    farmer("train", "--preset", "tiny", "--out", str(run), "--steps", "4")
    farmer("distill", "--ckpt", str(run), "--steps", "6")
    farmer("distill", "--ckpt", str(run), "--resume")  # the preset says 20 steps; the run was started with 6
    steps = [json.loads(line)["step"] for line in (run / "distill_metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    refused = farmer("distill", "--ckpt", str(run), "--resume", "--steps", "10", check=False)
    assert refused.returncode == 2 and "distill.steps: 6 -> 10" in refused.stderr
    fresh = tmp_path / "f"
    farmer("train", "--preset", "tiny", "--out", str(fresh), "--steps", "2")
    nothing = farmer("distill", "--ckpt", str(fresh), "--resume", check=False)
    assert nothing.returncode == 2 and "no distillation to continue" in nothing.stderr
    # a second distillation never silently replaces the first: --overwrite starts afresh
    student = (run / "student.safetensors").read_bytes()
    again = farmer("distill", "--ckpt", str(run), "--steps", "3", check=False)
    assert again.returncode == 2 and "already holds a student" in again.stderr
    assert (run / "student.safetensors").read_bytes() == student
    farmer("distill", "--ckpt", str(run), "--steps", "3", "--overwrite")
    steps = [json.loads(line)["step"] for line in (run / "distill_metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and max(steps) == 3  # the old run's metrics are gone
