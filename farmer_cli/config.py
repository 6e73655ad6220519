"""Typed configuration: model, data, training, sampling and distillation settings.

A config is built from a TOML preset (``presets/*.toml``, installed as ``farmer_cli.presets``) and then
``--set section.key=value`` overrides. Unknown sections or keys and values of the wrong type are rejected
with a :class:`ConfigError` that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A preset, override or config file is invalid; the message says what and how to fix it."""


@dataclass
class ModelConfig:
    """Sizes and modelling switches of FARMER (NOTES §1, §9 for the choices the paper leaves open)."""

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    # Autoregressive flow (TARFlow MetaBlocks).
    af_blocks: int = 4
    af_layers: int = 2
    af_width: int = 128
    af_heads: int = 4
    af_permutation: str = "alternate"  # "alternate" (identity, flip, ...) as TARFlow, or "always-flip"
    af_class_conditional: bool = False  # the paper's AF takes no class
    af_max_log_scale: float = 3.0  # |alpha| <= this per block: alpha = c * tanh(raw / c)
    # AR prior.
    ar_layers: int = 4
    ar_width: int = 128
    ar_heads: int = 4
    cond_repeat: int = 64  # M: class embedding repeated M times before the latent sequence
    channel_split: bool = True  # False: every channel is informative (no redundant shared GMM)
    informative_dims: int = 128  # d_I (after token merge)
    informative_components: int = 64  # K_I
    redundant_components: int = 200  # K_R
    token_basis: str = "pixel"  # "pixel" (the paper) or "dct": orthonormal per-patch DCT before the AF (ours)
    token_merge: int = 1  # merge m x m neighbouring AF tokens into one AR token (2 for patch 8, NOTES §9.1)
    final_permute: str = "none"  # "none" or "flip": token order between AF and AR (NOTES Table 2)
    mlp_ratio: float = 4.0
    min_scale: float = 1e-3  # floor of every GMM component std

    @property
    def tokens(self) -> int:
        """N: number of AF tokens, (H/p)·(W/p)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """d = C·p²: channels of one AF token."""
        return self.channels * self.patch_size**2

    @property
    def ar_tokens(self) -> int:
        """Number of tokens the AR prior sees (after the m x m merge)."""
        return self.tokens // self.token_merge**2

    @property
    def ar_token_dim(self) -> int:
        return self.token_dim * self.token_merge**2

    @property
    def d_informative(self) -> int:
        return self.informative_dims if self.channel_split else self.ar_token_dim

    @property
    def d_redundant(self) -> int:
        return self.ar_token_dim - self.d_informative

    @property
    def dims(self) -> int:
        """D = C·H·W, the number of sub-pixels (the bits/dim denominator)."""
        return self.channels * self.image_size**2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}")
        side = self.image_size // self.patch_size
        if side % self.token_merge:
            raise ConfigError(f"model.token_merge={self.token_merge} does not divide the {side}x{side} token grid")
        if self.channel_split and not 0 < self.informative_dims < self.ar_token_dim:
            raise ConfigError(
                f"model.informative_dims={self.informative_dims} must be between 1 and {self.ar_token_dim - 1} "
                f"(the AR token has {self.ar_token_dim} channels); or set model.channel_split=false"
            )
        if self.af_permutation not in ("alternate", "always-flip"):
            raise ConfigError("model.af_permutation must be 'alternate' or 'always-flip'")
        if self.token_basis not in ("pixel", "dct"):
            raise ConfigError("model.token_basis must be 'pixel' or 'dct'")
        if self.final_permute not in ("none", "flip"):
            raise ConfigError("model.final_permute must be 'none' or 'flip'")
        for name in ("af_width", "ar_width"):
            heads = getattr(self, name.replace("width", "heads"))
            if getattr(self, name) % heads:
                raise ConfigError(f"model.{name} must be divisible by model.{name.replace('width', 'heads')}")
        if self.num_classes < 1:
            raise ConfigError("model.num_classes must be at least 1 (use 1 for unlabelled data)")


@dataclass
class DataConfig:
    """Where images come from and how they are split (see farmer_cli/data.py)."""

    source: str = "mnist5k"  # "mnist5k", "digits", an image folder, a saved HF dataset or a hub name
    image_column: str = ""  # HF datasets: detected when empty
    label_column: str = ""  # HF datasets: detected when empty
    test_fraction: float = 0.1  # fixed held-out split (seeded) for bits/dim
    split_seed: int = 0
    num_workers: int = 0  # DataLoader worker processes (4-16 for image folders on GPUs)


@dataclass
class TrainConfig:
    """Optimisation settings (NOTES §6; the paper's optimiser, our defaults where it is silent)."""

    steps: int = 3000
    epochs: int = 0  # > 0 overrides steps
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    noise: str = "gaussian"  # "gaussian": sigma cosine-annealed noise_start -> noise_end; "uniform": U(0, 1)/128
    noise_start: float = 0.1
    noise_end: float = 0.005
    mixed_precision: str = "auto"  # "auto", "no", "bf16", "fp16" (fp16 only on GPUs)
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    eval_batches: int = 4  # test batches for the bits/dim printed at start and end


@dataclass
class SamplingConfig:
    """Sampling settings (NOTES §3, §5; supplement Table 5 for the decoupled unguided knobs)."""

    temperature: float = 1.0  # mixture temperature T: logits / T (T > 1 flattens)
    var_scale: float = 1.0  # s: every component variance x s
    cfg: float = 0.0  # guidance weight w; 0 = unguided
    guidance: str = "resample"  # "resample" (Algorithm 1) or "simple" (JetFormer-style)
    t_pi: float = 1.0  # proposal: mixture logits x T_pi
    t_sigma: float = 1.0  # proposal: component std x T_sigma
    cond_candidates: int = 5  # s_c
    uncond_candidates: int = 5  # s_u
    t_pi_eval: float = 0.2  # evaluation: mixture logits x T_pi,v
    t_sigma_eval: float = 0.9  # evaluation: component std x T_sigma,v
    t_resample: float = 1.1  # T_s
    redundant_pool: int = 0  # candidates per proposal for the redundant step; 0 = 2 x AR tokens
    denoise: bool = True  # one score step x + sigma² ∇log p(x) after decoding (TARFlow; not in the FARMER paper)


@dataclass
class DistillConfig:
    """One-step distillation (NOTES §4, Algorithm 2)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    latent_noise_max: float = 0.3  # s ~ U[0, this] on the final latent


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preset: str = ""

    def denoise_sigma(self) -> float:
        """Noise level removed after decoding: the final training sigma when trained with Gaussian noise and
        ``sampling.denoise`` is on; else 0 (no denoising)."""
        if not self.sampling.denoise or self.train.noise != "gaussian":
            return 0.0
        return self.train.noise_end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "config") -> "Config":
        cfg = cls()
        for section, values in raw.items():
            if section == "preset":
                cfg.preset = str(values)
                continue
            target = _section(cfg, section, origin)
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: [{section}] must be a table of key = value")
            for key, value in values.items():
                _assign(target, section, key, value, origin)
        cfg.model.validate()
        return cfg


def _section(cfg: Config, section: str, origin: str):
    names = [f.name for f in dataclasses.fields(cfg) if f.name != "preset"]
    if section not in names:
        raise ConfigError(f"{origin}: unknown section '{section}'{_suggest(section, names)}; sections: {', '.join(names)}")
    return getattr(cfg, section)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _assign(target: Any, section: str, key: str, value: Any, origin: str) -> None:
    hints = get_type_hints(type(target))
    fields = [f.name for f in dataclasses.fields(target)]
    if key not in fields:
        raise ConfigError(f"{origin}: unknown key '{section}.{key}'{_suggest(key, fields)}")
    setattr(target, key, _coerce(value, hints[key], f"{section}.{key}", origin))


def _coerce(value: Any, kind: type, name: str, origin: str) -> Any:
    """Convert ``value`` (TOML value or command-line string) to ``kind`` or raise a ConfigError."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: '{name}' expects {kind.__name__}, got {value!r}") from None


def _preset_dir():
    """Installed: the ``farmer_cli.presets`` package (mapped from ./presets by pyproject.toml). Run from a source
    checkout (``python -m farmer_cli`` or pytest at the repository root): the ./presets folder itself."""
    try:
        return resources.files("farmer_cli.presets")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str) -> Config:
    """Load a preset by name (``quickstart``) or from a TOML file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        names = preset_names()
        if name_or_path not in names:
            raise ConfigError(
                f"unknown preset '{name_or_path}'{_suggest(name_or_path, names)}; available: {', '.join(names)}"
            )
        text = (_preset_dir() / f"{name_or_path}.toml").read_text()
        origin = f"preset {name_or_path}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML ({err})") from None
    cfg = Config.from_dict(raw, origin)
    cfg.preset = cfg.preset or path.stem
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order; raises ConfigError on any bad one."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set train.lr=3e-4")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        _assign(_section(cfg, section, "--set"), section, key, value.strip(), "--set")
    cfg.model.validate()
    return cfg
