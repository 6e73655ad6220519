"""Run under `accelerate launch --multi_gpu --num_processes 2`: train the tiny preset a few steps with the library's
loop, then distil its AF a few steps; every rank saves its own in-memory weights of both so the test can check
that the ranks stayed identical (gradients were synchronised)."""

import os
import sys
from pathlib import Path

import torch

from farmer_cli.checkpoint import load_model
from farmer_cli.config.files import load_preset
from farmer_cli.data.dataset import load_data
from farmer_cli.train.distill import distill
from farmer_cli.device import make_accelerator
from farmer_cli.train.trainer import train

out = Path(sys.argv[1])
cfg = load_preset("tiny")
cfg.train.steps = 6
cfg.distill.steps = 4
acc = make_accelerator("fp32")
assert acc.num_processes == 2, acc.num_processes
bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
result = train(cfg, bundle, out / "run", acc)
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, out / f"rank{acc.process_index}.pt")
model, cfg, _, _ = load_model(out / "run", device=acc.device)
student = distill(model, cfg, bundle, out / "run", acc).student
torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, out / f"student{acc.process_index}.pt")
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
# Leave without interpreter teardown: gloo's worker threads can still hold tensors then and abort the process
# ("terminate called without an active exception"), failing a run whose results are all written.
sys.stdout.flush()
os._exit(0)
