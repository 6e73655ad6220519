"""A memory and time plan for a training run, computed before any GPU hour is spent (``farmer train --dry-run``).

Nothing is allocated: the model is built on the meta device, and one forward + backward pass of one image runs
there under a saved-tensor hook (what autograd keeps for backward, per image, with and without
activation checkpointing) and PyTorch's FLOP counter (matmul and attention FLOPs of a training step).

Peak memory of one process (bytes):

    static   = P·(4 weights + 4 gradients + 8 AdamW + 4 EMA)   [+ 2P bf16 weight copies under autocast,
                                                                 + 4P DDP gradient buckets with several processes]
    peak(B)  = static + B·(saved activations per image + backward workspace per image) + runtime

The backward workspace (gradients of the activations alive at once, the recomputed layer under checkpointing) is
taken as ``WORKSPACE_FACTOR`` x the largest single saved tensor per image; ``runtime`` is what the framework itself
holds (``CPU_RUNTIME_BYTES`` for a CPU process: torch, data, allocator; on a GPU the CUDA context lives outside
``max_memory_allocated``). bench/memory_plan.py checks these predictions against measured peaks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, replace

import torch

from farmer_cli.config.schema import Config, ModelConfig
from farmer_cli.device import GiB, DeviceError, memory_per_process
from farmer_cli.model import Farmer

WORKSPACE_FACTOR = 3.0
CPU_RUNTIME_BYTES = int(1.0 * GiB)
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 matmul peaks
BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "adamw": 8, "ema": 4}


@dataclass
class Plan:
    parameters: dict[str, int]  # per part
    static_bytes: dict[str, int]  # weights, gradients, adamw, ema (+ autocast copies, DDP buckets)
    activation_bytes_per_image: int  # saved for backward, without checkpointing
    activation_bytes_per_image_ckpt: int  # with activation checkpointing
    workspace_bytes_per_image: int
    workspace_bytes_per_image_ckpt: int
    train_flops_per_image: float  # forward + backward (+ recomputation with checkpointing)
    grad_checkpoint: bool  # what the config asks for
    model_flops_per_image: float = math.nan  # forward + backward without recomputation: what MFU counts
    checkpoint_fraction: float = 1.0  # with grad_checkpoint: the share of layers recomputed

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def checkpoint_share(self) -> float:
        """The share of transformer layers the config recomputes (0: no checkpointing)."""
        return self.checkpoint_fraction if self.grad_checkpoint else 0.0

    def per_image(self, checkpoint: float | None = None) -> int:
        """Activation + workspace bytes per image when a share ``checkpoint`` (0 to 1, or a bool) of every stack's
        layers is recomputed (None: what the config asks). Saved activations fall linearly with the layers
        recomputed (the layers of a stack are alike); the workspace stays that of a plain layer while any remains."""
        share = self.checkpoint_share if checkpoint is None else float(checkpoint)
        saved = (1 - share) * self.activation_bytes_per_image + share * self.activation_bytes_per_image_ckpt
        workspace = self.workspace_bytes_per_image_ckpt if share >= 1 else self.workspace_bytes_per_image
        return int(saved + workspace)

    def peak_bytes(self, micro_batch: int, runtime: int = 0, checkpoint: float | None = None) -> int:
        return sum(self.static_bytes.values()) + micro_batch * self.per_image(checkpoint) + runtime

    def largest_micro_batch(self, memory_bytes: float, runtime: int = 0, checkpoint: float | None = None) -> int:
        free = memory_bytes - sum(self.static_bytes.values()) - runtime
        return max(0, int(free // self.per_image(checkpoint)))

    def least_checkpointing(self, memory_bytes: float, micro_batch: int, layers: int, runtime: int = 0
                            ) -> float | None:
        """The smallest share j/``layers`` of layers to recompute (least recomputation, so the most images/s) at
        which ``micro_batch`` fits ``memory_bytes``; None when even full checkpointing does not fit."""
        for j in range(layers + 1):
            if self.peak_bytes(micro_batch, runtime, j / layers) <= memory_bytes:
                return j / layers
        return None

    def epoch_hours(self, images: int, gpus: int, tflops: float, utilisation: float) -> float:
        return images * self.train_flops_per_image / (gpus * tflops * 1e12 * utilisation) / 3600

    def to_dict(self) -> dict:
        return asdict(self) | {"total_parameters": self.total_parameters}


def parameter_parts(model: Farmer) -> dict[str, int]:
    """Parameters of the AF, the AR transformer (with its embeddings) and each mixture head."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    prior = model.prior
    heads = {"informative head": count(prior.info_head)}
    if prior.red_head is not None:
        heads["redundant head"] = count(prior.red_head)
    return {"autoregressive flow": count(model.flow), "AR transformer": count(prior) - sum(heads.values()), **heads}


def probe_backward(model_cfg: ModelConfig, checkpoint: bool, fused_attention: bool = True, noise: str = "uniform",
                   sigma: float = 0.0, count_flops: bool = True) -> tuple[int, int, float]:
    """The likelihood's forward + backward pass of one image on the meta device (a training step, or the
    denoising step's score): (bytes saved for backward, largest saved tensor, FLOPs of forward + backward).
    Every saved tensor counted grows with the batch, so these are per-image figures (an upper bound: a few, like
    attention masks, do not grow). On the meta device attention runs as matmul-softmax and keeps its
    (B, H, T, T) probabilities; ``fused_attention`` leaves them out (flash / memory-efficient kernels keep O(T)
    per head). Tensors are float32 here: an upper bound under bf16 autocast, where matmul inputs are 16-bit."""
    from torch.utils.flop_counter import FlopCounterMode

    model_cfg = type(model_cfg)(**{**asdict(model_cfg), "grad_checkpoint": checkpoint, "checkpoint_fraction": 1.0})
    with torch.device("meta"):
        model = Farmer(model_cfg).train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        attention = t.dim() == 4 and t.shape[-1] == t.shape[-2] > 1
        if storage._cdata not in params and not (fused_attention and attention):
            saved[storage._cdata] = storage.nbytes()
        return t

    mc = model_cfg
    u = torch.zeros(1, mc.channels, mc.image_size, mc.image_size, dtype=torch.uint8, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    with counter, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(u, y, noise=noise, sigma=sigma)["bpd"].mean()
        loss.backward()
    flops = float(counter.get_total_flops()) if count_flops else math.nan
    return sum(saved.values()), max(saved.values(), default=0), flops


DIRECT_PROBE_LAYERS = 12  # models with at most this many transformer layers are probed whole (one probe)


def saved_bytes_by_depth(model_cfg: ModelConfig, checkpoint: bool) -> tuple[int, int]:
    """:func:`probe_backward`'s (saved bytes, largest saved tensor) for ``model_cfg``: one probe of the model for
    small ones (up to :data:`DIRECT_PROBE_LAYERS` layers), else four probes of depth-cut copies (under a second
    instead of ~12 s for the 1.9B model; the same figures, tested). Saved bytes are linear in the depths:

        S(b, l, a) = S(1, 1, 1) + (b - 1)·(c_block + c_layer) + b·(l - 1)·c_layer + (a - 1)·c_ar

    with b AF blocks of l layers and a AR layers; c_layer, c_block + c_layer and c_ar are the increments from
    one more AF layer, AF block and AR layer. The largest tensor does not grow with depth. Remembered per
    configuration for the life of the process."""
    return _saved_bytes(tuple(asdict(model_cfg).items()), checkpoint)


@functools.lru_cache(maxsize=16)
def _saved_bytes(fields: tuple, checkpoint: bool) -> tuple[int, int]:
    model_cfg = ModelConfig(**dict(fields))

    def probe(blocks: int, layers: int, ar_layers: int) -> tuple[int, int]:
        cut = replace(model_cfg, af_blocks=blocks, af_layers=layers, ar_layers=ar_layers)
        return probe_backward(cut, checkpoint, count_flops=False)[:2]

    b, l, a = model_cfg.af_blocks, model_cfg.af_layers, model_cfg.ar_layers
    if b * l + a <= DIRECT_PROBE_LAYERS:
        return probe(b, l, a)
    (base, largest), (blocks, _), (layers, _), (ar, _) = (probe(1, 1, 1), probe(2, 1, 1), probe(1, 2, 1),
                                                        probe(1, 1, 2))
    saved = base + (b - 1) * (blocks - base) + b * (l - 1) * (layers - base) + (a - 1) * (ar - base)
    return saved, largest


def make_plan(cfg: Config, processes: int = 1, precision: str = "fp32", fused_attention: bool = True) -> Plan:
    """The plan for ``cfg`` trained by ``processes`` processes at ``precision`` ("fp32", "bf16", "fp16").

    Activations are measured in float32, an upper bound under bf16/fp16 autocast (where matmul inputs are kept
    in 16 bits). ``fused_attention``: the attention kernel keeps no (T, T) matrices (GPUs; CPUs in float32 — farmer
    picks the matmul-softmax kernel on a CPU under bf16, see device.attention_backend)."""
    with torch.device("meta"):
        model = Farmer(cfg.model)
    parts = parameter_parts(model)
    P = sum(parts.values())
    static = {name: P * size for name, size in BYTES_PER_PARAM.items()}
    if precision in ("bf16", "fp16"):
        static["autocast weight copies"] = 2 * P
    if processes > 1:
        static["DDP gradient buckets"] = 4 * P
    figures = {ckpt: probe_backward(cfg.model, ckpt, fused_attention, cfg.train.noise, cfg.train.noise_start)
               for ckpt in (False, True)}
    share = cfg.model.checkpoint_share
    flops = figures[False][2] + share * (figures[True][2] - figures[False][2])  # recomputation grows with the share
    return Plan(parts, static, figures[False][0], figures[True][0], int(WORKSPACE_FACTOR * figures[False][1]),
                int(WORKSPACE_FACTOR * figures[True][1]), flops, cfg.model.grad_checkpoint, figures[False][2],
                cfg.model.checkpoint_fraction)


PLAN_ERROR = 0.25  # how far a planned peak may lie from the measured one (tests/train: --dry-run within 25%)


def _flow_layer_inputs(m: ModelConfig) -> int:
    """Values of every AF transformer layer's input for one image: kept for backward even when each layer is
    recomputed (full activation checkpointing)."""
    return m.af_blocks * m.af_layers * m.tokens * m.af_width


def require_training_memory(cfg: Config, device: torch.device, processes: int = 1, precision: str = "fp32") -> None:
    """Before any work: a DeviceError (one line, naming the largest micro-batch that fits) when one training step at
    ``cfg``'s micro-batch cannot fit ``device``. A lower bound comes first, free of cost: weights, gradients, AdamW
    and EMA, and every transformer layer's input for each image. Only where it reaches a tenth of the free memory
    is the full plan (:func:`make_plan`, seconds) made, and a run refused when even the plan less its error does
    not fit."""

    have = memory_per_process(device, processes)
    runtime = CPU_RUNTIME_BYTES if device.type == "cpu" else 0
    with torch.device("meta"):
        params = sum(p.numel() for p in Farmer(cfg.model).parameters())
    m, micro = cfg.model, cfg.train.batch_size
    layer_inputs = _flow_layer_inputs(m) + m.ar_layers * m.ar_tokens * m.ar_width
    if params * sum(BYTES_PER_PARAM.values()) + micro * layer_inputs * 4 < have / 10:
        return
    plan = make_plan(cfg, processes, precision)
    need = plan.peak_bytes(micro, runtime) / (1 + PLAN_ERROR)  # the least it can take
    if need <= have:
        return
    fits = plan.largest_micro_batch(have, runtime)
    fix = (f"the largest micro-batch that fits is {fits}: lower --batch-size and raise --grad-accum for the same "
           "global batch, or set model.grad_checkpoint=true" if fits else
           "the model and its optimiser state alone do not fit: a smaller model, or more processes (FSDP)")
    raise DeviceError(f"training at micro-batch {micro} (--batch-size) needs at least {need / GiB:,.1f} GiB of "
                      f"{device.type} memory by farmer's memory plan, but {have / GiB:,.1f} GiB is free: {fix} "
                      "(farmer train --dry-run shows the plan)")


def require_distill_memory(cfg: Config, flow_parameters: int, device: torch.device, processes: int = 1) -> None:
    """Before distilling: a DeviceError when a lower bound of one step cannot fit ``device``: the student (a copy
    of the flow, ``flow_parameters``) with gradients and AdamW, the teacher flow's weights, and every student
    layer's input for each image of ``distill.batch_size``."""

    have = memory_per_process(device, processes)
    per_image = _flow_layer_inputs(cfg.model) * 4
    static = flow_parameters * (BYTES_PER_PARAM["weights"] * 2 + BYTES_PER_PARAM["gradients"] + BYTES_PER_PARAM["adamw"])
    need = static + cfg.distill.batch_size * per_image
    if need > have:
        raise DeviceError(f"distilling at batch {cfg.distill.batch_size} (--batch-size) needs at least "
                          f"{need / GiB:,.1f} GiB of {device.type} memory, but {have / GiB:,.1f} GiB is free: "
                          + ("lower --batch-size" if static < have else "the flow alone does not fit"))


def gpu_tflops(name: str) -> float:
    """Dense bf16 peak of a GPU named like 'H100' (the first table entry the name contains); NaN if unknown."""
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k.lower() in name.lower()), math.nan)
