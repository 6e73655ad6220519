"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): the training code path with the model sharded by PyTorch's
FSDP2 (`fully_shard` on every transformer layer and the root), standing in for Accelerate's FSDP plugin, which
needs GPUs. Trains 6 steps in one go and 3 + resume + 3 steps, and writes each run's gathered weights and EMA so
the test can compare them."""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from farmer_cli.train import trainer as training
from farmer_cli.config.files import load_preset
from farmer_cli.data.dataset import load_data
from farmer_cli.train.distributed import gather_module_state
from farmer_cli.model.attention import TransformerLayer
from farmer_cli.device import make_accelerator

out = Path(sys.argv[1])
cfg = load_preset("tiny")
cfg.train.steps, cfg.train.ckpt_every = 6, 3
acc = make_accelerator("no")
assert acc.num_processes == 2


def shard(model, optimizer):
    """What Accelerate's FSDP2 preparation does: shard in place, point the optimiser at the sharded parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            fully_shard(module)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, optimizer


acc.prepare = shard
bundle = load_data(cfg.data, cfg.model.channels, cfg.model.image_size)
whole = training.train(cfg, bundle, out / "whole", acc)
training.train(cfg, bundle, out / "split", acc, stop_after=3)
split = training.train(cfg, bundle, out / "split", acc, resume=True)
for name, result in (("whole", whole), ("split", split)):
    state = gather_module_state(result.model)
    if acc.is_main_process:
        torch.save(state, out / f"{name}-weights.pt")
        print(name, "bpd", result.bpd_before, result.bpd_after)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
# Leave without interpreter teardown: gloo's worker threads can still hold tensors then and abort the process
# ("terminate called without an active exception"), failing a run whose results are all written.
sys.stdout.flush()
os._exit(0)
