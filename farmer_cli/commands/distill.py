"""Distil the autoregressive flow's slow sequential inverse into a one-step student (Algorithm 2).

The student (a copy of the AF with bidirectional attention) learns to invert every AF block in one parallel
pass; `farmer sample --decoder student` then replaces the token-by-token inverse with it. The AR prior is untouched.
Writes student.safetensors into the checkpoint directory.

Examples:
  farmer distill
  farmer distill --ckpt runs/quickstart-20260101-120000 --steps 2000
  farmer distill --resume
  farmer distill --overwrite          # replace the run's student
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import List, Optional

from farmer_cli.config.schema import Precision
from farmer_cli.commands import (CKPT_HELP, Option, check_data_unchanged, check_recorded_data, command, exit_with,
                                 refuse_unread, set_keys)

NAME = "distill"


# the train.* settings distillation reads (the rest are the teacher's training's), and those a resume may not change
TRAIN_SETTINGS_READ = {"mixed_precision", "beta1", "beta2", "grad_clip", "seed", "log_every", "ckpt_every",
                       "keep_checkpoints"}
RESUME_FIXED = {"beta1", "beta2", "grad_clip", "seed"}


@command
def run(
    ckpt: Optional[Path] = Option(None, "--ckpt", help=CKPT_HELP),
    data: Optional[str] = Option(None, "--data", "-d", help="Data source (default: the checkpoint's)."),
    steps: Optional[int] = Option(None, "--steps", help="Distillation steps (default: the preset's distill.steps)."),
    batch_size: Optional[int] = Option(None, "--batch-size", "-b", help="Batch size per process."),
    lr: Optional[float] = Option(None, "--lr", help="Peak learning rate of the student."),
    mixed_precision: Optional[Precision] = Option(None, "--mixed-precision", help="auto | fp32 | bf16 | fp16."),
    resume: bool = Option(False, "--resume", help="Continue an interrupted distillation of this checkpoint."),
    overwrite: bool = Option(False, "--overwrite", help="Replace the run's existing student (its weights, "
                             "distillation state, metrics and distill-step checkpoints are deleted first)."),
    overrides: List[str] = Option([], "--set", help="Override distillation, data or training-loop settings, e.g. "
                                  "--set distill.latent_noise_max=0.2 --set train.log_every=50 (repeatable)."),
) -> None:
    import dataclasses

    from farmer_cli.checkpoint import (DISTILL_METRICS_FILE, DISTILL_STATE_FILE, STUDENT_FILE, check_metrics,
                                       check_student_file, load_config, load_model, stored_distill_settings,
                                       weights_step)
    from farmer_cli.config.files import apply_options
    from farmer_cli.data.dataset import load_data
    from farmer_cli.train.distill import distill
    from farmer_cli.memory_plan import require_distill_memory
    from farmer_cli.rundir import claim_on_main, find_checkpoint, holds_distillation, remove_distillation
    from farmer_cli.device import checked_on_every_process, processes_ended, make_accelerator
    from farmer_cli.commands.ui import LoopProgress, console, escape, shell_word

    run_dir = find_checkpoint(ckpt)
    if resume and overwrite:
        exit_with("--resume continues a distillation and --overwrite replaces it: give one of them")
    if not resume and not overwrite and holds_distillation(run_dir):
        exit_with(f"{run_dir} already holds a student: continue its distillation with --resume, replace it with "
                  "--overwrite, or distil a copy of the run")
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    unread = [k for k in keys if k.startswith("train.") and k[len("train."):] not in TRAIN_SETTINGS_READ]
    if unread:
        exit_with(f"--set {', '.join(unread)}: distillation does not read {'it' if len(unread) == 1 else 'them'}; it "
                  f"reads distill.* (--steps, --lr, --batch-size) and train.{', train.'.join(sorted(TRAIN_SETTINGS_READ))}")
    split = "the split is the run's: distillation measures the student on the images the run held out"
    refuse_unread(dict.fromkeys(("use_labels", "label_column"), "distillation trains on images, not their labels")
                  | dict.fromkeys(("test_fraction", "split_seed", "test_source"), split), set_keys(overrides, "data"))
    fixed = (["--data"] if data is not None else []) + [k for k in keys if k.startswith("data.") or
                                                        k[len("train."):] in RESUME_FIXED]
    if resume and fixed:
        exit_with(f"--resume continues the distillation on its data and optimiser settings, but {', '.join(fixed)} "
                  "would change them; start a new distillation with --overwrite to change them")
    model, cfg, _, step = load_model(run_dir)
    apply_options(cfg, {"data.source": ("--data", data), "distill.steps": ("--steps", steps),
                        "distill.batch_size": ("--batch-size", batch_size), "distill.lr": ("--lr", lr),
                        "train.mixed_precision": ("--mixed-precision", mixed_precision)},
                  overrides, allowed=("distill", "data", "train"))
    begun = holds_distillation(run_dir)  # a student, its state or its metrics: starting again means --overwrite
    again = f"farmer distill --ckpt {shlex.quote(str(run_dir))}" + " --overwrite" * begun
    if resume and not (run_dir / DISTILL_STATE_FILE).exists():
        exit_with(f"--resume: {run_dir} has no distillation to continue ({DISTILL_STATE_FILE}); start "
                  f"{'it again' if begun else 'one'} with {again}")
    if resume:  # what resuming reads besides the state (checked on loading): the student and the metrics
        check_metrics(run_dir, DISTILL_METRICS_FILE)
        if not (run_dir / STUDENT_FILE).exists():
            exit_with(f"--resume: {run_dir}/{STUDENT_FILE} is missing beside its {DISTILL_STATE_FILE}: restore it (a "
                      f"copy is kept in {run_dir}/checkpoints/distill-step-*/), or start again with {again}")
        check_student_file(model, run_dir)
    stored = stored_distill_settings(run_dir) if resume else None
    if stored is not None:  # a resumed distillation keeps its schedule
        given = {k for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)) if v is not None} | \
            {k[len("distill."):] for k in keys if k.startswith("distill.")}
        asked = {k: v for k, v in dataclasses.asdict(cfg.distill).items() if k in given and stored.get(k) != v}
        if asked:
            exit_with(f"--resume keeps the distillation settings of {run_dir}, but this would change "
                      + "; ".join(f"distill.{k}: {stored.get(k)!r} -> {v!r}" for k, v in asked.items())
                      + ". Start a new distillation with --overwrite (it replaces the student) to change them")
        apply_options(cfg, {f"distill.{k}": (f"{run_dir / STUDENT_FILE} (its distill metadata)", v)
                            for k, v in stored.items()})
        options = [f"--set {k}" for k in keys] + ["--mixed-precision"] * (mixed_precision is not None)
        if options and weights_step(run_dir / STUDENT_FILE) >= cfg.distill.steps:
            exit_with(f"the distillation of {run_dir} has finished its {cfg.distill.steps} steps, so --resume runs "
                      f"none and nothing would read {', '.join(options)}; leave them out")
    own_data = data is None and "data.source" not in keys  # as when the run trained, or its held-out split is not
    if own_data:
        check_recorded_data(run_dir, cfg.data)
    bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
    if own_data:
        check_data_unchanged(run_dir, load_config(run_dir)[2].get("data"), bundle,
                             "the student would be measured on images the run trained on", "or name data with --data")
    acc = make_accelerator(cfg.train.mixed_precision)
    flow_parameters = sum(p.numel() for p in model.flow.parameters())
    checked_on_every_process(acc, lambda: require_distill_memory(cfg, flow_parameters, acc.device, acc.num_processes))
    main = acc.is_main_process
    run_dir, _lock = claim_on_main(acc, run_dir, resume=True, option="--ckpt")  # writes the student into the run: one writer at a time
    if overwrite and main:
        remove_distillation(run_dir)
    acc.wait_for_everyone()
    if main:
        console.print(f"distilling the AF of {escape(str(run_dir))} (step {step}) for {cfg.distill.steps} steps")
    with processes_ended():
        with LoopProgress("distill", cfg.distill.steps, "loss", "loss", enabled=main,
                          resume_hint=f"farmer distill --ckpt {shell_word(str(run_dir))} --resume") as bar:
            result = distill(model, cfg, bundle, run_dir, acc, resume=resume, on_event=bar)
    if main:
        console.print(f"student inverse error (MSE vs the true inverse, {result.error_images} images): "
                      f"{result.error_before:.2e} -> [bold]{result.error_after:.2e}[/]")
        losses = ("no step left to run: the distillation had finished" if math.isnan(result.first_loss) else
                  f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
        console.print(f"done in {result.seconds / 60:.1f} min: {losses}; student in "
                      f"[bold]{escape(str(run_dir))}/student.safetensors[/]")
        console.print(f"next: farmer sample --ckpt {escape(shell_word(str(run_dir)))} --decoder student --class "
                      f"{min(3, cfg.model.num_classes - 1)} --n 16")

