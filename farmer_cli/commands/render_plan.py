"""Renders the memory and time plan of ``farmer train --dry-run`` (farmer_cli/memory_plan.py) as tables."""

from __future__ import annotations

from rich.table import Table

from farmer_cli.commands.ui import escape, stdout

GiB = 1024**3


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_plan(f: dict) -> None:
    where = (f"{f['processes']} GPU(s) of {f['memory_gib']:g} GiB" if f["device"] == "gpu"
             else f"this CPU ({f['memory_gib']:g} GiB)")
    share = f["checkpoint_fraction"] if f["grad_checkpoint"] else 0.0
    ckpt = "off" if share == 0 else ("on" if share == 1 else f"on for {share:.0%} of the layers")
    parts = Table(title=escape(f"{f['preset']}: {_count(f['total_parameters'])} parameters"))
    parts.add_column("part")
    parts.add_column("parameters", justify="right")
    for name, n in f["parameters"].items():
        parts.add_row(name, _count(n))
    stdout.print(parts)

    mem = Table(title=escape(f"memory per process: micro-batch {f['micro_batch']} x {f['grad_accum_steps']} "
                             f"accumulation x {f['processes']} process(es) = global batch {f['global_batch']}; "
                             f"{f['precision']}; activation checkpointing {ckpt}"))
    mem.add_column("what")
    mem.add_column("memory", justify="right")
    for name, n in f["static_bytes"].items():
        mem.add_row(name, _gib(n))
    mem.add_row("activations per image, saved for backward (no checkpointing)", _gib(f["activation_bytes_per_image"]))
    mem.add_row("activations per image, saved for backward (checkpointing)",
                _gib(f["activation_bytes_per_image_ckpt"]))
    mem.add_row("backward workspace per image (no checkpointing / checkpointing)",
                f"{_gib(f['workspace_bytes_per_image'])} / {_gib(f['workspace_bytes_per_image_ckpt'])}")
    fits = "fits" if f["predicted_peak_bytes"] <= f["memory_gib"] * GiB else "does NOT fit"
    mem.add_row(f"[bold]predicted peak at micro-batch {f['micro_batch']}[/] ({fits} in {where})",
                f"[bold]{_gib(f['predicted_peak_bytes'])}[/]")
    mem.add_row(f"largest micro-batch in {f['memory_gib']:g} GiB: checkpointing off / on",
                f"{f['largest_micro_batch_no_ckpt']} / {f['largest_micro_batch_ckpt']}")
    least = f["least_checkpointing_that_fits"]
    if least is None:
        least_text = "none: micro-batch too large even with every layer recomputed; lower --batch-size"
    else:
        least_text = (f"{least:.3g} of the layers (--set model.grad_checkpoint={str(least > 0).lower()}"
                      + (f" --set model.checkpoint_fraction={least:.4g}" if 0 < least < 1 else "") + ")")
    mem.add_row(f"least activation checkpointing that fits micro-batch {f['micro_batch']}", least_text)
    stdout.print(mem)
    stdout.print(f"training FLOPs per image (forward + backward{', recomputation' if share else ''}): "
                 f"{f['train_flops_per_image'] / 1e12:.2f} TFLOP; one ImageNet-1k epoch (1,281,167 images) on "
                 f"{f['processes']} H100 at 40% of the bf16 peak: {f['imagenet_epoch_hours_at_40pct']:.1f} h",
                 highlight=False)
    stdout.print("Activations are counted in float32 (an upper bound under bf16 autocast); a GPU's CUDA context "
                 "and allocator slack come on top (leave ~10%).", highlight=False)
