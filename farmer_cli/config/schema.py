"""Typed configuration: model, data, training, sampling and distillation settings — the one validation gate.

Enumerated settings are ``Literal`` types and every section has a ``validate()`` that checks ranges, so a bad
value from a preset, a ``--set`` override, a command-line flag or a stored ``config.json`` raises one
:class:`ConfigError` naming the key and what would be valid. Loading and overriding live in
:mod:`farmer_cli.config.files`; both paths end in :meth:`Config.validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A preset, override or config file is invalid; the message says what and how to fix it."""


Permutation = Literal["alternate", "always-flip"]
TokenBasis = Literal["pixel", "dct", "whole-pixel"]
FinalPermute = Literal["none", "flip"]
MergeOrder = Literal["blocks", "interleave"]
Noise = Literal["gaussian", "uniform"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # one vocabulary for training and sampling
Guidance = Literal["resample", "simple"]
Decoder = Literal["sequential", "jacobi", "student"]
DecodeSteps = Literal["auto", "eager", "compile", "cuda-graphs"]
Gelu = Literal["exact", "tanh"]


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _at_least(section: Any, prefix: str, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= minimum, f"{prefix}.{name}", f">= {minimum:g}", value)


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value > 0, f"{prefix}.{name}", "> 0", value)


def _at_most(section: Any, prefix: str, maximum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value <= maximum, f"{prefix}.{name}", f"<= {maximum:,}", value)


# Upper bounds on model sizes, far above any real model (the largest preset: 256 px, N = 1,024, width 1,024) and
# low enough that no tensor the model builds has more elements than an int64 counts: an edited config.json or a
# --set asking for model.image_size = 2**40 is refused here, before anything is built or allocated.
MAX_SIZE = 65_536  # image side, widths, heads, channels, components, M, d_I, token merge
MAX_LAYERS = 1_024  # af_blocks, af_layers, ar_layers (each), and af_blocks x af_layers
MAX_TOKENS = 1 << 20  # N, and the channels of an AR token
MAX_CLASSES = 1 << 20
MAX_MLP_RATIO = 64.0
MAX_SAMPLING_SCALE = 1e3  # guidance weight and temperatures: far beyond any useful value, far within float32
MAX_NOISE = 2.0  # a noise sigma on pixels in [-1, 1] (or unit-scale latents): 2 already drowns every image
MAX_LR = 1.0  # AdamW moves each weight by about the learning rate per step: above 1 nothing trains
MAX_WORKERS = 256  # DataLoader processes per training process: more than any machine's cores
MAX_STEPS = 2**31 - 1  # train.steps, train.epochs, distill.steps: more than any run could take
MAX_SEED = 2**63 - 1  # data.split_seed (torch generators take 64 bits)
MAX_TRAIN_SEED = 2**32 - 1  # train.seed: every step's seed is train.seed x 1,000,003 + step, within 64 bits


@dataclass
class ModelConfig:
    """Sizes and modelling switches of FARMER (arXiv v2 §3.2–3.3, §4.1 Table 1; docs/design.md "Choices the paper leaves
    open" for the rest)."""

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    # Autoregressive flow (TARFlow MetaBlocks).
    af_blocks: int = 4
    af_layers: int = 2
    af_width: int = 128
    af_heads: int = 4
    af_permutation: Permutation = "alternate"  # identity, flip, ... as TARFlow; or always-flip
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
    token_basis: TokenBasis = "pixel"  # "pixel" (the paper); "dct": per-patch DCT; "whole-pixel": colours together (ours)
    token_merge: int = 1  # merge m x m neighbouring AF tokens into one AR token (2 for patch 8; the paper is silent)
    merge_order: MergeOrder = "blocks"  # merged channels: sub-token after sub-token, or interleaved so the
    #                                     informative channels cover every sub-token (patch-8 presets)
    final_permute: FinalPermute = "none"  # token order between AF and AR (paper's ablation, v2 Table 3)
    mlp_ratio: float = 4.0
    gelu: Gelu = "exact"  # MLP activation: erf GELU as TARFlow; "tanh" approximation (runs written before 2026-11-26)
    min_scale: float = 1e-3  # floor of every GMM component std
    grad_checkpoint: bool = False  # recompute transformer layers in backward (activation checkpointing)
    checkpoint_fraction: float = 1.0  # with grad_checkpoint: the share of each stack's layers recomputed (1: all)

    def unread(self) -> dict[str, str]:
        """The settings that a model of these settings never reads, each with why: the channel split's without it,
        the merge order without a merge, the checkpointed share without activation checkpointing."""
        unread = {}
        if not self.channel_split:
            unread |= dict.fromkeys(("informative_dims", "redundant_components"), "only the informative / redundant "
                                    "channel split reads it, and model.channel_split is false")
        if self.token_merge == 1:
            unread["merge_order"] = "only a token merge reads it, and model.token_merge is 1"
        if not self.grad_checkpoint:
            unread["checkpoint_fraction"] = "only activation checkpointing reads it, and model.grad_checkpoint is false"
        return unread

    @property
    def checkpoint_share(self) -> float:
        """The share of every transformer stack's layers run under activation checkpointing (0: none)."""
        return self.checkpoint_fraction if self.grad_checkpoint else 0.0

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
        _at_least(self, "model", 1, "image_size", "channels", "patch_size", "num_classes", "af_blocks", "af_layers",
                  "af_width", "af_heads", "ar_layers", "ar_width", "ar_heads", "cond_repeat", "informative_dims",
                  "informative_components", "redundant_components", "token_merge")
        _positive(self, "model", "af_max_log_scale", "mlp_ratio", "min_scale")
        _at_most(self, "model", MAX_SIZE, "image_size", "channels", "patch_size", "af_width", "af_heads", "ar_width",
                 "ar_heads", "cond_repeat", "informative_dims", "informative_components", "redundant_components",
                 "token_merge")
        _at_most(self, "model", MAX_LAYERS, "af_blocks", "af_layers", "ar_layers")
        if self.af_blocks * self.af_layers > MAX_LAYERS:  # every layer is a Python object, even on the meta device
            raise ConfigError(f"model.af_blocks={self.af_blocks} x model.af_layers={self.af_layers} is "
                              f"{self.af_blocks * self.af_layers:,} flow layers; at most {MAX_LAYERS:,}")
        _at_most(self, "model", MAX_CLASSES, "num_classes")
        _at_most(self, "model", MAX_MLP_RATIO, "mlp_ratio")
        for part in ("af", "ar"):  # the MLP's hidden width is int(width x mlp_ratio)
            width = getattr(self, f"{part}_width")
            _check(int(width * self.mlp_ratio) >= 1, "model.mlp_ratio", f"at least 1/{width} (model.{part}_width="
                   f"{width}: the MLP needs a hidden unit)", self.mlp_ratio)
        _check(0 <= self.checkpoint_fraction <= 1, "model.checkpoint_fraction", "in [0, 1]",
               self.checkpoint_fraction)
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}")
        side = self.image_size // self.patch_size
        if self.tokens > MAX_TOKENS or self.token_dim > MAX_TOKENS:
            raise ConfigError(f"model.image_size={self.image_size} with model.patch_size={self.patch_size} and "
                              f"model.channels={self.channels} gives {self.tokens:,} tokens of {self.token_dim:,} "
                              f"channels; at most {MAX_TOKENS:,} of each")
        if side % self.token_merge:
            raise ConfigError(f"model.token_merge={self.token_merge} does not divide the {side}x{side} token grid")
        if self.ar_token_dim > MAX_TOKENS:
            raise ConfigError(f"model.token_merge={self.token_merge} makes AR tokens of {self.ar_token_dim:,} "
                              f"channels; at most {MAX_TOKENS:,}")
        if self.channel_split and not 0 < self.informative_dims < self.ar_token_dim:
            raise ConfigError(
                f"model.informative_dims={self.informative_dims} must be between 1 and {self.ar_token_dim - 1} "
                f"(the AR token has {self.ar_token_dim} channels); or set model.channel_split=false"
            )
        for name in ("af_width", "ar_width"):
            heads = name.replace("width", "heads")
            if getattr(self, name) % getattr(self, heads):
                raise ConfigError(f"model.{name} must be divisible by model.{heads}")


@dataclass
class DataConfig:
    """Where images come from and how they are split (see farmer_cli/data.py)."""

    source: str = "mnist5k"  # "mnist5k", "digits", "fashion-mnist", an image folder, a saved HF dataset or a hub name
    image_column: str = ""  # HF datasets: detected when empty
    label_column: str = ""  # HF datasets: detected when empty
    test_fraction: float = 0.1  # fixed held-out split (seeded) for bits/dim; not used with test_source
    test_source: str = ""  # an official test/validation set (folder or saved dataset): every source image trains
    split_seed: int = 0
    num_workers: int = 0  # DataLoader worker processes (4-16 for image folders on GPUs)
    use_labels: bool = True  # false: one class for every image (an unconditional model, e.g. imagenet64-bpd)

    def split_source(self, split: str) -> str:
        """Where the images of ``split`` ("test" or "train") come from: the test set when one is named."""
        return (self.test_source or self.source) if split == "test" else self.source

    def validate(self) -> None:
        _check(bool(self.source.strip()), "data.source", "a data source name or path", self.source)
        _check(0 <= self.test_fraction < 1, "data.test_fraction", "in [0, 1)", self.test_fraction)
        _at_least(self, "data", 0, "num_workers", "split_seed")
        _at_most(self, "data", MAX_WORKERS, "num_workers")
        _at_most(self, "data", MAX_SEED, "split_seed")


@dataclass
class TrainConfig:
    """Optimisation settings (arXiv v2 §4.1: AdamW 0.9/0.95, weight decay 0.03; our defaults where it is silent)."""

    steps: int = 3000
    epochs: int = 0  # > 0 overrides steps (an explicit --steps on the command line sets epochs back to 0)
    batch_size: int = 64  # micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimiser step: global batch = batch_size x this x processes
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    noise: Noise = "gaussian"  # "gaussian": sigma cosine-annealed noise_start -> noise_end; "uniform": U(0, 1)/128
    noise_start: float = 0.1
    noise_end: float = 0.005
    mixed_precision: Precision = "auto"  # fp16 only on GPUs (a CPU gets bf16 instead); "no" is read as fp32
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    keep_checkpoints: int = 3  # step checkpoints kept in <run>/checkpoints/ (copies: each costs the disk of one checkpoint)
    eval_batches: int = 4  # test batches for the bits/dim printed at start and end
    sample_every: int = 0  # > 0: save a grid of EMA samples every that many steps (run/samples/step-<step>.png)
    compile: bool = False  # torch.compile the flow and the prior (bench/train_compile.py: pays on GPUs, not CPUs)

    def validate(self) -> None:
        _check(self.steps > 0 or self.epochs > 0, "train.steps", "> 0 (or train.epochs > 0)", self.steps)
        _at_least(self, "train", 0, "epochs", "warmup_steps", "weight_decay", "min_lr", "noise_end", "sample_every")
        _at_least(self, "train", 1, "batch_size", "grad_accum_steps", "log_every", "ckpt_every", "keep_checkpoints",
                  "eval_batches")
        _at_least(self, "train", 0, "seed")
        _at_most(self, "train", MAX_TRAIN_SEED, "seed")
        _at_most(self, "train", MAX_STEPS, "steps", "epochs", "batch_size", "grad_accum_steps")
        _positive(self, "train", "lr", "grad_clip")
        _at_most(self, "train", MAX_LR, "lr")
        _check(self.min_lr <= self.lr, "train.min_lr", f"<= train.lr ({self.lr:g})", self.min_lr)
        for name in ("beta1", "beta2", "ema_decay", "label_dropout"):
            _check(0 <= getattr(self, name) < 1, f"train.{name}", "in [0, 1)", getattr(self, name))
        _check(self.noise_start >= self.noise_end, "train.noise_start", f">= train.noise_end ({self.noise_end:g})",
               self.noise_start)
        _at_most(self, "train", MAX_NOISE, "noise_start")

    def unread(self) -> dict[str, str]:
        """The settings that training under these settings never reads, each with why: the Gaussian noise schedule
        under uniform noise, the step count when the length is given in epochs."""
        unread = {}
        if self.noise != "gaussian":
            unread |= dict.fromkeys(("noise_start", "noise_end"), "only Gaussian dequantisation noise reads it, and "
                                    f"train.noise is {self.noise}")
        if self.epochs > 0:
            unread["steps"] = "train.epochs > 0 sets the run's length; --steps replaces it"
        elif self.sample_every > self.steps:
            unread["sample_every"] = f"the run ends at step {self.steps}, before the first sample grid"
        return unread

    def global_batch(self, processes: int) -> int:
        """Images per optimiser step over all processes."""
        return self.batch_size * self.grad_accum_steps * processes

    def final_noise_sigma(self) -> float:
        """The Gaussian dequantisation sigma at the end of training (0 for uniform noise): what the trained model's
        density has been smoothed with, and what sampling removes with one denoising step."""
        return self.noise_end if self.noise == "gaussian" else 0.0


RESAMPLING_SETTINGS = ("t_pi_eval", "t_sigma_eval", "t_resample", "cond_candidates", "uncond_candidates",
                       "redundant_pool")  # read by resampling guidance (Algorithm 1) only
GUIDED_SETTINGS = ("guidance", "t_pi", "t_sigma", *RESAMPLING_SETTINGS)  # read by guided sampling only


@dataclass
class SamplingConfig:
    """Sampling settings (arXiv v2 §3.4, Algorithm 1; supplement Table 5 for the decoupled unguided knobs)."""

    temperature: float = 1.0  # mixture temperature T: logits / T (T > 1 flattens)
    var_scale: float = 1.0  # s: every component variance x s
    cfg: float = 0.0  # guidance weight w; 0 = unguided
    guidance: Guidance = "resample"  # "resample" (Algorithm 1) or "simple" (JetFormer-style)
    t_pi: float = 1.0  # proposal: mixture logits x T_pi
    t_sigma: float = 1.0  # proposal: component std x T_sigma
    cond_candidates: int = 5  # s_c
    uncond_candidates: int = 5  # s_u
    t_pi_eval: float = 0.2  # evaluation: mixture logits x T_pi,v
    t_sigma_eval: float = 0.9  # evaluation: component std x T_sigma,v
    t_resample: float = 1.1  # T_s
    redundant_pool: int = 0  # candidates per proposal for the redundant step; 0 = 2 x AR tokens
    denoise: bool = True  # one score step x + sigma² ∇log p(x) after decoding (TARFlow; not in the FARMER paper)
    decoder: Decoder = "sequential"  # AF inverse: token by token (KV cache), parallel Jacobi iteration (exact) or
    # the distilled one-step student (Algorithm 2; `farmer distill` first)
    jacobi_tol: float = 1e-5  # Jacobi: stop when no value moves by more than this
    jacobi_max_iter: int = 0  # Jacobi: at most this many rounds per block (0: tokens - 1, where it is exact)
    decode_steps: DecodeSteps = "auto"  # how decoding steps run (model/steps.py); auto: CUDA graphs on a GPU

    def unread(self) -> dict[str, str]:
        """The settings that sampling under these settings never reads, each with why: guidance's without it, the
        unguided temperature and variance scale under it, resampling's under simple guidance, Jacobi's with
        another decoder."""
        unread = {}
        if self.cfg <= 0:
            unread |= dict.fromkeys(GUIDED_SETTINGS, "only guided sampling reads it, and sampling.cfg is 0")
        else:
            unread |= dict.fromkeys(("temperature", "var_scale"), "only unguided sampling (sampling.cfg 0) reads it; "
                                    "guidance draws at sampling.t_pi / t_sigma")
            if self.guidance != "resample":
                unread |= dict.fromkeys(RESAMPLING_SETTINGS, "only resampling guidance reads it, and "
                                        f"sampling.guidance is {self.guidance}")
        if self.decoder != "jacobi":
            unread |= dict.fromkeys(("jacobi_tol", "jacobi_max_iter"), "only the jacobi decoder reads it, and "
                                    f"sampling.decoder is {self.decoder}")
        return unread

    def validate(self) -> None:
        _at_least(self, "sampling", 0, "cfg", "var_scale", "redundant_pool", "jacobi_tol", "jacobi_max_iter")
        _positive(self, "sampling", "temperature", "t_pi", "t_sigma", "t_pi_eval", "t_sigma_eval", "t_resample")
        _at_least(self, "sampling", 1, "cond_candidates", "uncond_candidates")
        _at_most(self, "sampling", MAX_SAMPLING_SCALE, "cfg", "var_scale", "temperature", "t_pi", "t_sigma",
                 "t_pi_eval", "t_sigma_eval", "t_resample")


@dataclass
class DistillConfig:
    """One-step distillation (arXiv v2 §3.5, Algorithm 2)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    latent_noise_max: float = 0.3  # s ~ U[0, this] on the final latent

    def validate(self) -> None:
        _at_least(self, "distill", 1, "steps", "batch_size")
        _at_most(self, "distill", MAX_STEPS, "steps", "batch_size")
        _at_least(self, "distill", 0, "warmup_steps", "latent_noise_max")
        _at_most(self, "distill", MAX_NOISE, "latent_noise_max")
        _positive(self, "distill", "lr")
        _at_most(self, "distill", MAX_LR, "lr")


SECTIONS = ("model", "data", "train", "sampling", "distill")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preset: str = ""

    def validate(self) -> "Config":
        for name in SECTIONS:
            getattr(self, name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

