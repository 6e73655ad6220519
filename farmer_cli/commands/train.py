"""Train a FARMER model (autoregressive flow + GMM prior, end to end on exact NLL).

With no options: the CPU quickstart (5,000 real 28x28 MNIST digits shipped in a wheel): about 5 minutes on 2
AVX-512 cores (bf16), 12-16 minutes on 2 AVX2-only laptop cores (float32). Multi-GPU / mixed precision: `accelerate launch -m farmer_cli train --preset imagenet256-patch8
--data /path/to/imagenet/train`.

Examples:
  farmer train
  farmer train --preset tiny --steps 50 --out runs/smoke
  farmer train --preset quickstart --data ./my_images --set model.af_blocks=6
  farmer train --out runs/smoke --resume
  farmer train --preset imagenet256-patch8 --dry-run
  farmer train --preset imagenet64-bpd --data imagenet64/train --test-data imagenet64/val
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

from farmer_cli.config.schema import Precision
from farmer_cli.commands import (SET_HELP, Option, check_recorded_data, check_seed, command, exit_with, refuse_unread,
                                 refuse_unused, set_keys)

NAME = "train"


@command
def run(
    preset: Optional[str] = Option(None, "--preset", "-p", help="Preset name (tiny, quickstart, imagenet64-bpd, "
                                   "imagenet256-patch16, imagenet256-patch8, imagenet256-1.1b-patch16, "
                                   "imagenet256-1.1b-patch8) or a path to a .toml file. Default: quickstart."),
    data: Optional[str] = Option(None, "--data", "-d", help="Data source: mnist5k, digits, fashion-mnist, an image "
                                 "folder with one sub-folder per class, or a saved Hugging Face dataset path / cached "
                                 "hub name. Default: the preset's."),
    test_data: Optional[str] = Option(None, "--test-data", help="An official test or validation set (an image "
                                      "folder or saved dataset, same classes) for test bits/dim, here and in farmer "
                                      "evaluate. Every --data image then trains (data.test_fraction is not used). "
                                      "Default: a seeded 10% of --data is held out."),
    out: Optional[Path] = Option(None, "--out", "-o", help="Run directory. Default: runs/<preset>-<timestamp>. An "
                                 "existing run is only continued (--resume) or replaced (--overwrite)."),
    steps: Optional[int] = Option(None, "--steps", help="Optimiser steps (default: the preset's). Given here, it "
                                  "wins over a preset's train.epochs; refused beside --set train.epochs or "
                                  "--set train.steps."),
    epochs: Optional[int] = Option(None, "--epochs", help="Train this many epochs instead of --steps."),
    batch_size: Optional[int] = Option(None, "--batch-size", "-b", help="Micro-batch per process (images per "
                                       "forward pass)."),
    grad_accum: Optional[int] = Option(None, "--grad-accum", help="Micro-batches accumulated per optimiser step "
                                       "(train.grad_accum_steps); global batch = micro-batch x this x processes."),
    lr: Optional[float] = Option(None, "--lr", help="Peak learning rate (AdamW, warm-up then cosine)."),
    mixed_precision: Optional[Precision] = Option(None, "--mixed-precision", help="auto | fp32 | bf16 | fp16. auto: bf16 "
                                            "where the hardware runs it fast, else fp32. fp16 on CPU becomes bf16."),
    seed: Optional[int] = Option(None, "--seed", help="Random seed (weights, batch order, noise)."),
    resume: bool = Option(False, "--resume", help="Continue the run in --out (or the newest run) from its last "
                          "checkpoint. Its model, data and schedule settings are kept: options that would change "
                          "them are refused (logging, checkpoint cadence, workers and precision may change)."),
    overwrite: bool = Option(False, "--overwrite", help="Replace the run already in --out (its weights, state, "
                             "metrics and student are deleted first)."),
    stop_after: int = Option(0, "--stop-after", help="End this invocation after N steps (checkpoint saved, "
                             "schedules unchanged); continue later with --resume. For time-limited jobs."),
    workers: Optional[int] = Option(None, "--workers", help="DataLoader worker processes (default: the preset's "
                                    "data.num_workers; 4-16 for image folders on GPUs)."),
    overrides: List[str] = Option([], "--set", help=SET_HELP),
    dry_run: bool = Option(False, "--dry-run", help="Print the memory and time plan (parameters per part, "
                           "weight/gradient/optimiser/EMA memory, activations per image with and without "
                           "checkpointing, the largest micro-batch that fits, FLOPs, hours per epoch) and exit. "
                           "Nothing is allocated and no data is read."),
    gpu_memory: Optional[float] = Option(None, "--gpu-memory", help="With --dry-run: memory per GPU in GiB "
                                         "(default 80)."),
    gpus: Optional[int] = Option(None, "--gpus", help="With --dry-run: GPUs for the time estimate and the DDP "
                                 "buckets (default 8)."),
    plan_device: Optional[Literal["gpu", "cpu"]] = Option(None, "--plan-device", help="With --dry-run: gpu (the "
                              "default: fused attention, memory as max_memory_allocated) or cpu (this machine: matmul "
                              "attention under bf16, process RSS)."),
    as_json: bool = Option(False, "--json", help="With --dry-run: print the plan as one JSON object."),
    report_to: Literal["none", "tensorboard"] = Option("none", "--report-to", help="none | tensorboard: also log every record of "
                            "metrics.jsonl to TensorBoard files in the run directory (needs the tensorboard "
                            "package; view with: tensorboard --logdir RUN)."),
) -> None:
    if dry_run:
        refuse_unused((("--data", data), ("--test-data", test_data), ("--steps", steps), ("--epochs", epochs),
                       ("--lr", lr), ("--seed", seed), ("--overwrite", overwrite or None),
                       ("--stop-after", stop_after or None), ("--workers", workers),
                       ("--report-to", None if report_to == "none" else report_to),
                       *[(name, True) for name, key in set_keys(overrides)
                         if not key.startswith("model.") and key not in PLANNED_SETTINGS]),
                      "with --dry-run", "it plans memory and time from the model and batch settings and reads no data")
        refuse_unused([("--preset", preset if resume else None)], "with --dry-run --resume",
                      "it plans the run's own settings")
        refuse_unused([("--out", None if resume else out)], "with --dry-run alone",
                      "it plans the preset's settings; add --resume to plan the run in --out")
        return _dry_run(preset, resume, out, batch_size, grad_accum, mixed_precision, overrides,
                        80.0 if gpu_memory is None else gpu_memory, 8 if gpus is None else gpus, plan_device or "gpu",
                        as_json)
    refuse_unused((("--gpu-memory", gpu_memory), ("--gpus", gpus), ("--plan-device", plan_device),
                   ("--json", as_json or None)), "without --dry-run",
                  "they describe its plan; a run measures its own machine, on several GPUs under accelerate launch")
    import copy

    from farmer_cli.checkpoint import (METRICS_FILE, TRAIN_STATE_FILE, check_trained_with, check_metrics, check_model_file,
                                       load_config)
    from farmer_cli.config.schema import MAX_STEPS, MAX_TRAIN_SEED
    from farmer_cli.config.files import apply_options, load_preset
    from farmer_cli.data.dataset import layout_change, load_data
    from farmer_cli.data.sources import canonical_source, data_folders, has_own_test_split, unread_data_settings
    from farmer_cli.rundir import claim_on_main, resume_conflicts
    from farmer_cli.device import (checked_on_every_process, processes_ended, make_accelerator, precision_name,
                                   tracker_options)
    from farmer_cli.rundir import RUNS_DIR, find_checkpoint, never_saved, new_run_dir, settings_digest
    from farmer_cli.storage import within
    from farmer_cli.memory_plan import require_training_memory
    from farmer_cli.train.trainer import total_steps, train
    from farmer_cli.commands.ui import LoopProgress, console, escape, shell_word

    tracker_options(report_to)  # an unknown or uninstalled tracker fails before any work
    check_seed(seed, MAX_TRAIN_SEED.bit_length())
    if stop_after < 0:
        exit_with("--stop-after must be 0 (off) or a positive number of steps")
    if steps is not None and epochs is not None:
        exit_with("give --steps or --epochs, not both")
    if epochs is not None and epochs < 1:
        exit_with(f"--epochs {epochs}: give at least 1 (or --steps)")
    if resume and overwrite:
        exit_with("--resume continues a run and --overwrite replaces it: give one of them")
    restart = resume and out is not None and never_saved(out)  # a requeued job's --resume starts it again
    if restart:
        console.print(f"{escape(str(out))}: the run stopped before its first checkpoint, so there is nothing to "
                      "resume: starting it from step 0 with its settings")
        resume = False
    if resume or restart:
        out = find_checkpoint(out, TRAIN_STATE_FILE, "--out") if resume else out
        stored, _, payload = load_config(out)
        if resume:
            check_metrics(out, METRICS_FILE)
        named = None if preset is None else load_preset(preset).preset  # a file is known by the name it gives
        if named is not None and named != stored.preset:
            exit_with(f"--resume continues {out}, trained with preset '{stored.preset}', not '{named}'"
                      f"{'' if named == preset else f' (named by {preset})'}; "
                      "start a new run (another --out) for a different preset")
        cfg, payload = copy.deepcopy(stored), payload if resume else {}
    else:
        cfg, payload = load_preset("quickstart" if preset is None else preset), {}
    data, test_data = canonical_source(data), canonical_source(test_data)  # a resume from another directory reads the same data
    length = {"train.steps": ("--steps", steps), "train.epochs": ("--steps", 0)} if steps is not None else \
        {"train.epochs": ("--epochs", epochs)}
    apply_options(cfg, {"data.source": ("--data", data), "data.test_source": ("--test-data", test_data), **length, "train.batch_size": ("--batch-size", batch_size),
                        "train.grad_accum_steps": ("--grad-accum", grad_accum), "train.lr": ("--lr", lr),
                        "train.mixed_precision": ("--mixed-precision", mixed_precision), "train.seed": ("--seed", seed),
                        "data.num_workers": ("--workers", workers)}, overrides)
    if resume:
        conflicts = resume_conflicts(stored, cfg)
        if conflicts:
            exit_with(f"--resume keeps the settings of {out}, but this would change {'; '.join(conflicts)}. "
                      "Start a new run (another --out) to change them")
        metadata = check_model_file(cfg, out)
        check_trained_with(metadata, stored, payload.get("class_names", []), out)
        recorded = metadata.get("settings")
        if recorded is not None and recorded != settings_digest(stored):
            exit_with(f"--resume: {out}/config.json and model.safetensors disagree (the model, data or training "
                      "settings in config.json are not those the weights were trained with): one of them was edited "
                      "or replaced since the last checkpoint; restore the run's own files, or start a new run to "
                      "change settings")
    refuse_unread(unread_data_settings(cfg.data), set_keys(overrides, "data"))
    # sampling.* is not checked: the run stores it as the defaults of sample and evaluate, which may change the
    # guidance or decoder that reads it
    unread = {f"{section}.{key}": why for section in ("model", "train")
              for key, why in getattr(cfg, section).unread().items()}
    refuse_unread(unread, set_keys(overrides))
    if not resume and not restart:  # a preset's settings that its own other settings leave unread: not refused,
        from farmer_cli.config.files import preset_settings  # but not passed over silently

        own = load_preset(preset or "quickstart")
        left = {f"{section}.{key}": why for section in ("model", "train")
                for key, why in getattr(own, section).unread().items()}
        left |= {f"data.{key}": why for key, why in unread_data_settings(own.data).items()}
        for key in sorted(set(preset_settings(preset or "quickstart")) & set(left)):
            console.print(f"[yellow]warning:[/] preset {escape(preset or 'quickstart')} sets {key}, which has no "
                          f"effect ({escape(left[key])})", highlight=False)
    if not resume and not restart and cfg.train.label_dropout == 0:
        console.print("[yellow]warning:[/] train.label_dropout = 0: the null class (the unconditional model that "
                      "guidance and unconditional scores read) is never trained; farmer sample --cfg > 0, score "
                      "without --class and ood will mean little for this run", highlight=False)
    if not resume and cfg.data.test_source and has_own_test_split(cfg.data.source):
        console.print(f"note: the test images {escape(cfg.data.test_source)} replace the test split that "
                      f"{escape(cfg.data.source)} brings", highlight=False)
    if not resume:  # a data folder from a preset or --set is recorded as its absolute path too
        cfg.data.source = canonical_source(cfg.data.source)
        cfg.data.test_source = canonical_source(cfg.data.test_source)
    for option, source in (("--data", cfg.data.source), ("--test-data", cfg.data.test_source)):
        inside = next((f for f in data_folders(source) if within(out or RUNS_DIR, f)), None)
        if inside is not None:
            exit_with(f"--out {out or RUNS_DIR} is inside {option} {source} ({inside}): the run's sample grids would "
                      "be read as images of the data set; put the run outside it")
    if resume:
        check_recorded_data(out, cfg.data)
    bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    accumulated = cfg.train.batch_size * cfg.train.grad_accum_steps
    if accumulated > max(cfg.train.batch_size, len(bundle.train)):
        exit_with(f"--grad-accum {cfg.train.grad_accum_steps}: one step would take {accumulated:,} images, more than "
                  f"the {len(bundle.train):,} training images; lower it (or --batch-size)")
    changed = layout_change(payload.get("data"), bundle.layout) if resume else ""
    if changed:
        exit_with(f"--resume: the data of {out} changed since the run started ({changed}): resuming would change "
                  "the schedule and mix test images into training; restore the data or start a new run")
    if cfg.model.num_classes != len(bundle.class_names):
        if resume:
            exit_with(f"the data has {len(bundle.class_names)} classes but the checkpoint was trained with "
                      f"{cfg.model.num_classes}")
        if any(key == "model.num_classes" for _, key in set_keys(overrides)):
            exit_with(f"--set model.num_classes={cfg.model.num_classes}, but the data has "
                      f"{len(bundle.class_names)} classes (the model takes its number from the data); leave it out")
        console.print(f"the data has {len(bundle.class_names)} classes: setting model.num_classes = "
                      f"{len(bundle.class_names)} (the settings had {cfg.model.num_classes})")
        apply_options(cfg, {"model.num_classes": ("the data", len(bundle.class_names))})
    acc = make_accelerator(cfg.train.mixed_precision, report_to=report_to)
    checked_on_every_process(acc, lambda: require_training_memory(cfg, acc.device, acc.num_processes,
                                                                  precision_name(acc.mixed_precision)))
    main = acc.is_main_process
    total = total_steps(cfg, len(bundle.train), acc.num_processes)
    if total > MAX_STEPS:  # epochs x steps per epoch: the bound train.steps has
        exit_with(f"train.epochs {cfg.train.epochs} makes {total:,} steps ({total // cfg.train.epochs:,} per epoch), "
                  f"more than the {MAX_STEPS:,} a run may take; give fewer epochs")
    given = [name for name, _ in set_keys(overrides)] + [name for name, value in (
        ("--mixed-precision", mixed_precision), ("--workers", workers), ("--stop-after", stop_after or None),
        ("--report-to", None if report_to == "none" else report_to)) if value is not None]
    if resume and given and isinstance(payload.get("step"), int) and payload["step"] >= total:
        exit_with(f"{out} has finished its {total} steps, so --resume runs none and nothing would read "
                  f"{', '.join(given)}; leave them out (sampling settings go to farmer sample --set sampling.*), or "
                  "start a new run (another --out)")
    run_dir = out or (new_run_dir(cfg.preset) if main else None)
    run_dir, _lock = claim_on_main(acc, run_dir, resume=resume, overwrite=overwrite)
    if main:
        n_params = _count_params(cfg)
        console.print(f"run [bold]{escape(str(run_dir))}[/]: preset {escape(cfg.preset)}, {n_params / 1e6:.2f}M "
                      f"parameters, {len(bundle.train)} train / {len(bundle.test)} test images, "
                      f"{len(bundle.class_names)} classes, {acc.num_processes} process(es) on {acc.device}, "
                      f"precision {precision_name(acc.mixed_precision)}, global batch {cfg.train.global_batch(acc.num_processes)} "
                      f"({cfg.train.batch_size} x {cfg.train.grad_accum_steps} accumulation x {acc.num_processes}), "
                      f"{total} steps")
    with processes_ended():
        with LoopProgress("train", total, "bpd", "bits/dim", enabled=main,
                          resume_hint=f"farmer train --out {shell_word(str(run_dir))} --resume") as bar:
            result = train(cfg, bundle, run_dir, acc, resume=resume, stop_after=stop_after, on_event=bar)
    if main:
        if result.skipped:
            console.print(f"[yellow]skipped {result.skipped} reads of unreadable images in total[/]")
        before = "" if resume else f"{result.bpd_before:.3f} -> "
        finished = result.steps >= total
        state = "done" if finished else f"stopped at step {result.steps} of {total} (--stop-after)"
        held_out = len(bundle.test)
        scored = min(held_out, cfg.train.batch_size * cfg.train.eval_batches)  # test_bpd's train.eval_batches
        share = f"all {held_out}" if scored == held_out else f"first {scored} of {held_out}"
        tested = (f"test bits/dim {before}[bold]{result.bpd_after:.3f}[/] ({share} test images)" if held_out else
                  "no test bits/dim (the data set is too small to hold out test images)")
        console.print(f"{state}: {result.seconds / 60:.1f} min; {tested}; checkpoint in [bold]{escape(str(run_dir))}[/]")
        if finished and cfg.sampling.decoder == "student":  # sampling reads the run's decoder: distil it first
            console.print(f"next: farmer distill --ckpt {escape(shell_word(str(run_dir)))} (sampling.decoder is "
                          "student), then farmer sample")
        elif finished:
            console.print(f"next: farmer sample --ckpt {escape(shell_word(str(run_dir)))} --class "
                          f"{min(3, cfg.model.num_classes - 1)} --n 16")
        else:
            console.print(f"continue: farmer train --out {escape(shell_word(str(run_dir)))} --resume")


def _count_params(cfg) -> int:
    import torch

    from farmer_cli.model import Farmer

    with torch.device("meta"):
        return sum(p.numel() for p in Farmer(cfg.model).parameters())


PLANNED_SETTINGS = ("train.batch_size", "train.grad_accum_steps", "train.mixed_precision")  # and model.*


def _dry_run(preset, resume, out, batch_size, grad_accum, mixed_precision, overrides, gpu_memory, gpus, plan_device,
             as_json):
    import json

    from farmer_cli.checkpoint import load_config
    from farmer_cli.config.files import apply_options, load_preset
    from farmer_cli.memory_plan import CPU_RUNTIME_BYTES, GiB, gpu_tflops, make_plan
    from farmer_cli.rundir import find_checkpoint
    from farmer_cli.commands.render_plan import print_plan

    if not 0 < gpu_memory < 1e6 or not 1 <= gpus <= 1e6:  # not NaN, not inf
        exit_with("--gpu-memory must be a number of GiB between 0 and 1,000,000 and --gpus between 1 and 1,000,000")
    cfg = load_config(find_checkpoint(out, None))[0] if resume else load_preset("quickstart" if preset is None else preset)
    apply_options(cfg, {"train.batch_size": ("--batch-size", batch_size), "train.grad_accum_steps": ("--grad-accum", grad_accum),
                        "train.mixed_precision": ("--mixed-precision", mixed_precision)}, overrides)
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16"
    processes = gpus if plan_device == "gpu" else 1
    fused = not (plan_device == "cpu" and precision == "bf16")
    plan = make_plan(cfg, processes, precision, fused_attention=fused)
    runtime = CPU_RUNTIME_BYTES if plan_device == "cpu" else 0
    memory = gpu_memory * GiB
    figures = {"preset": cfg.preset, "device": plan_device, "precision": precision, "processes": processes,
               "micro_batch": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
               "global_batch": cfg.train.global_batch(processes), "memory_gib": gpu_memory,
               "predicted_peak_bytes": plan.peak_bytes(cfg.train.batch_size, runtime),
               "largest_micro_batch": plan.largest_micro_batch(memory, runtime),
               "largest_micro_batch_no_ckpt": plan.largest_micro_batch(memory, runtime, checkpoint=False),
               "largest_micro_batch_ckpt": plan.largest_micro_batch(memory, runtime, checkpoint=True),
               "least_checkpointing_that_fits": plan.least_checkpointing(memory, cfg.train.batch_size,
                                                                         cfg.model.af_layers, runtime),
               "imagenet_epoch_hours_at_40pct": plan.epoch_hours(1_281_167, processes, gpu_tflops("H100"), 0.4),
               **plan.to_dict()}
    if as_json:
        print(json.dumps(figures))
    else:
        print_plan(figures)
