"""Devices: Accelerator and processes, device choice, precision, attention backend.

Reports through the ``farmer`` logger (the commands render it); imports no UI.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger("farmer")
GiB = 1024**3


class DeviceError(ValueError):
    """The requested device, accelerator or tracker is not available on this machine."""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX) and torch's kernels use them: the
    kernel's CPU flags on Linux (else torch's own probe where this torch has it), and torch's CPU capability
    (``ATEN_CPU_CAPABILITY=avx2`` rehearses an AVX2-only laptop, where bf16 is emulated and slow)."""
    import torch

    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(requested: str, device_type: str, training: bool = True) -> tuple[str, str | None]:
    """``auto|fp32|bf16|fp16`` (``train.mixed_precision``, ``sample --precision``) -> what this machine runs:
    (fp32, bf16 or fp16, a warning or None).

    ``auto``: bf16 on GPUs that support it, else fp16 for training and fp32 for sampling; on a CPU, bf16 for
    training where the CPU has AVX512-BF16/AMX, else fp32, and fp32 for sampling. fp16 on a CPU is pathological
    (one 2048² matmul takes about a minute), so it becomes bf16 with a warning."""
    import torch

    if device_type == "cuda":
        if requested == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16" if training else "fp32"), None
        return requested, None
    if requested == "auto":
        return ("bf16" if training and cpu_has_fast_bf16() else "fp32"), None
    if requested == "fp16":
        return "bf16", "fp16 on a CPU is extremely slow; using bf16 instead (pass fp32 for full precision)"
    return requested, None


def precision_name(accelerate_precision: str) -> str:
    """Accelerate's ``mixed_precision`` ("no", "bf16", "fp16") in farmer's vocabulary ("fp32", "bf16", "fp16")."""
    return "fp32" if accelerate_precision == "no" else accelerate_precision


def autocast(device, precision: str):
    """Autocast for inference: ``bf16`` / ``fp16`` run the transformers' matmuls in that type (mixture densities,
    log-dets and the flow's affine updates stay float32); ``fp32`` changes nothing."""
    import torch

    if precision in ("bf16", "fp16"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def make_accelerator(precision: str, cpu: bool = False, report_to: str = "none"):
    """An Accelerator for this process with the resolved precision; logs a warning if one was needed.

    ``report_to="tensorboard"`` adds Accelerate's TensorBoard tracker (offline; training points it at the run
    directory); it needs the ``tensorboard`` package (``pip install 'farmer[tensorboard]'``)."""
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not cpu
    resolved, warning = resolve_precision(precision, "cuda" if cuda else "cpu")
    acc = Accelerator(mixed_precision="no" if resolved == "fp32" else resolved, cpu=cpu or not cuda,
                      **tracker_options(report_to))
    if warning and acc.is_main_process:
        log.warning(warning)
    return acc


def tracker_options(report_to: str) -> dict:
    """Accelerator keyword arguments for ``--report-to``; DeviceError where it is unknown or not installed."""
    import importlib.util

    if report_to not in ("none", "tensorboard"):
        raise DeviceError(f"--report-to must be none or tensorboard, not '{report_to}'")
    if report_to == "none":
        return {}
    if importlib.util.find_spec("tensorboard") is None:
        raise DeviceError("--report-to tensorboard needs the tensorboard package: pip install 'farmer[tensorboard]'")
    return {"log_with": "tensorboard", "project_dir": "."}  # training points the logs at the run directory


def process_state():
    """Accelerate's view of this launch's processes (number, index, device; one process when not launched), with
    the process group joined when there are several (over gloo on a machine without a GPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def processes_ended():
    """Run the block, then leave the process group (if any) before the process exits: a gloo/NCCL group left to
    interpreter shutdown can abort ("terminate called without an active exception") and fail a finished
    multi-process run. After a block that finished, every process first waits for the others: one that left while
    the main process still worked alone (FID on the gathered features) aborted a finished evaluation. After an
    error each leaves at once (the others may never reach the barrier)."""
    import torch.distributed as dist

    def joined() -> bool:
        return dist.is_available() and dist.is_initialized()

    try:
        yield
    except BaseException:
        if joined():
            dist.destroy_process_group()
        raise
    if joined():
        dist.barrier()
        dist.destroy_process_group()


def _resolve_device(spec: str = "auto"):
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` -> torch.device; DeviceError when the
    device is not there."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(f"device '{spec}' asked for, but this machine has no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device '{spec}' asked for, but this machine has {count} GPU(s): cuda:0..cuda:{count - 1}")
    elif device.type != "cpu":
        raise DeviceError(f"device '{spec}' is not supported: use auto, cpu, cuda or cuda:N")
    return device


def choose_device(spec: str = "auto", processes=None):
    """The one way a command picks its device. One process: ``--device`` (:func:`_resolve_device`). Under
    ``accelerate launch`` (``processes``: the Accelerator or PartialState of the launch) each process uses the device
    Accelerate gives it, and an explicit ``--device`` naming another is a DeviceError."""
    if processes is None or processes.num_processes == 1:
        return _resolve_device(spec)
    if spec not in ("auto", str(processes.device)):
        raise DeviceError(f"--device {spec}: under accelerate launch each process uses the device Accelerate gives it "
                          f"({processes.device} here); leave --device out")
    return processes.device


def attention_backend(device, precision: str):
    """Context for forward passes: on a CPU under bf16 autocast, the plain matmul-softmax attention ("math"
    backend) trains the quickstart 1.47x faster than the fused flash kernel, whose CPU backward dominated the
    profile (bench/profile_hotspots.py); elsewhere PyTorch's default choice."""
    import torch

    if torch.device(device).type == "cpu" and precision == "bf16":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def memory_available(device) -> int:
    """Bytes a new allocation can get on ``device``: a GPU's free memory (``torch.cuda.mem_get_info``); on a CPU the
    kernel's MemAvailable, lowered to what the cgroup limit leaves (containers, SLURM jobs). Without either file
    (not Linux): the physical memory."""
    import os

    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        have = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            have = min(have, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, have)


def memory_per_process(device, processes: int = 1) -> int:
    """This process's part of :func:`memory_available`: a GPU is its own; a CPU's memory is shared by the
    ``processes`` running on it."""
    return memory_available(device) // (processes if device.type == "cpu" else 1)


def require_memory(need: int, device, what: str, fix: str, share: int = 1) -> None:
    """Before any work: a DeviceError (one line) when ``what`` needs ``need`` bytes on ``device`` and this process's
    part of what is free there (:func:`memory_per_process`, ``share`` processes) is smaller. ``fix`` says what to
    change."""
    have = memory_per_process(device, share)
    if need > have:
        raise DeviceError(f"{what} needs about {need / GiB:,.1f} GiB of {device.type} memory, but "
                          f"{have / GiB:,.1f} GiB is free for it: {fix}")


def checked_on_every_process(accelerator, check) -> None:
    """Run ``check()`` (which raises DeviceError) on every process and raise the first failure on all of them: a
    process that stopped alone would leave the others waiting in a collective that never comes."""
    message = ""
    try:
        check()
    except DeviceError as err:
        message = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        message = next((m for m in gather_object([message]) if m), "")
    if message:
        raise DeviceError(message)
