"""Run under `accelerate launch --num_processes 2 --cpu`: train the tiny preset a few steps with the library's
training loop, then every rank saves its own in-memory weights so the test can check they are identical."""

import sys
from pathlib import Path

import torch

from farmer_cli.config import load_preset
from farmer_cli.data import load_data
from farmer_cli.runtime import make_accelerator
from farmer_cli.training import train

out = Path(sys.argv[1])
cfg = load_preset("tiny")
cfg.train.steps = 6
acc = make_accelerator("no")
assert acc.num_processes == 2, acc.num_processes
bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
result = train(cfg, bundle, out / "run", acc, quiet=True)
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, out / f"rank{acc.process_index}.pt")
