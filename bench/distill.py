"""Distilled student vs the teacher's sequential AF inverse, in one run: AF-reverse time, whole-sample time,
fidelity (MSE against the teacher inverse on sampled latents) and the teacher's bits/dim of both sets of samples.

    farmer train && farmer distill          # a quickstart run with a student
    python bench/distill.py --ckpt runs/quickstart-...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import interleaved, report
from farmer_cli.checkpoint import load_model, load_student
from farmer_cli.model import quantize
from farmer_cli.rundir import find_checkpoint
from farmer_cli.eval.bits import score_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    run_dir = find_checkpoint(args.ckpt, "student.safetensors")
    model, cfg, _, _ = load_model(run_dir)
    student = load_student(run_dir, model)
    s = cfg.sampling
    y = torch.arange(args.batch) % cfg.model.num_classes
    tokens = model.sample_tokens(y, s, torch.Generator().manual_seed(0))
    t = interleaved({
        "teacher_reverse": lambda: model.decode(tokens, y),
        "student_reverse": lambda: model.decode(tokens, y, student=student),
        "teacher_sample": lambda: model.sample(y, s, torch.Generator().manual_seed(1)),
        "student_sample": lambda: model.sample(y, s, torch.Generator().manual_seed(1), student=student),
    }, args.repeats)
    with torch.no_grad():
        x_teacher = model.decode(tokens, y)
        x_student = model.decode(tokens, y, student=student)
        mse = ((x_student - x_teacher) ** 2).mean().item()
        g = torch.Generator().manual_seed(2)
        bpd_teacher = score_batch(model, quantize(x_teacher), y, 4, g)[1].mean().item()
        bpd_student = score_batch(model, quantize(x_student), y, 4, g)[1].mean().item()
    rows = [{
        "batch": args.batch,
        "teacher_reverse_s": t["teacher_reverse"], "student_reverse_s": t["student_reverse"],
        "reverse_speedup": t["teacher_reverse"] / t["student_reverse"],
        "teacher_sample_s": t["teacher_sample"], "student_sample_s": t["student_sample"],
        "sample_speedup": t["teacher_sample"] / t["student_sample"],
        "mse_vs_teacher_inverse": mse, "bpd_teacher_samples": bpd_teacher, "bpd_student_samples": bpd_student,
        "bpd_rel_diff": abs(bpd_student - bpd_teacher) / bpd_teacher,
    }]
    report("distill", rows, {"checkpoint": str(run_dir), "sampling": s.__dict__})


if __name__ == "__main__":
    main()
