"""farmer's autoregressive flow against apple/ml-tarflow's ``transformer_flow.py``, side by side in one process.

Same architecture on both sides: a class-conditional TARFlow-style flow with a Gaussian base, 28x28x1 images,
patch 4 (49 tokens of 16 values), width 128, head size 64 (2 heads), MLP x4, 4 blocks x 4 layers; batch 64,
AdamW; Gaussian dequantisation noise 0.05 as in TARFlow's training. Rows (medians of interleaved repeats):

* train step (forward, backward, AdamW step) in float32 and under bfloat16 autocast;
* KV-cached sampling of 16 images (the AF inverse, unguided), farmer's decoding steps eager and compiled
  (``torch.compile`` of the fixed-shape step, model/steps.py; its one-off compile time is printed);
* farmer's whole model (flow + GMM prior, the quickstart) train step, for scale;
* MFU: model FLOPs per step (2 x multiply-adds of every matmul forward, x3 with backward) over the time, against
  this machine's measured peak (a 2048^3 matmul in each precision);
* with ``--profile``: where each train step and sampling call spends its time (torch.profiler self time, ms per
  call, grouped: matmuls, attention, LayerNorm, GELU, optimizer, the rest), which explains the ratios.

Nothing of TARFlow is part of farmer: pass the directory holding its ``transformer_flow.py`` (a checkout of
https://github.com/apple/ml-tarflow) and it is imported at run time.

    python bench/vs_tarflow.py --tarflow /path/to/ml-tarflow [--repeats 7] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from common import interleaved, report
from farmer_cli.config.files import load_preset
from farmer_cli.model import Farmer
from farmer_cli.model.flow import AutoregressiveFlow
from farmer_cli.model.patchify import patchify
from farmer_cli.model.steps import StepRunner
from farmer_cli.device import attention_backend

IMAGE, PATCH, WIDTH, BLOCKS, LAYERS, BATCH, CLASSES, SIGMA = 28, 4, 128, 4, 4, 64, 10, 0.05
TOKENS, DIM = (IMAGE // PATCH) ** 2, PATCH * PATCH


def load_tarflow(directory: Path):
    path = directory / "transformer_flow.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --tarflow pointing at a checkout of apple/ml-tarflow")
    spec = importlib.util.spec_from_file_location("tarflow_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flow_flops_per_image() -> float:
    """Forward matmul FLOPs of one image through the flow (both implementations have the same matmuls)."""
    per_layer = TOKENS * (2 * WIDTH * 3 * WIDTH + 2 * WIDTH * WIDTH + 2 * 2 * WIDTH * 4 * WIDTH)  # qkv, proj, MLP
    attention = 2 * 2 * TOKENS * TOKENS * WIDTH / 2  # QK^T and AV, causal half
    io = TOKENS * 2 * (DIM * WIDTH + WIDTH * 2 * DIM)
    return BLOCKS * (LAYERS * (per_layer + attention) + io)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def tarflow_step(tf, bf16: bool):
    torch.manual_seed(0)
    model = tf.Model(1, IMAGE, PATCH, WIDTH, BLOCKS, LAYERS, num_classes=CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.rand(BATCH, 1, IMAGE, IMAGE) * 2 - 1, torch.arange(BATCH) % CLASSES

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, _, logdets = model(x + SIGMA * torch.randn_like(x), y)
            loss = model.get_loss(z, logdets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample():
        with torch.no_grad():
            return model.reverse(torch.randn(16, TOKENS, DIM), torch.arange(16) % CLASSES)

    return step, sample, model


def farmer_flow_step(bf16: bool):
    torch.manual_seed(0)
    flow = AutoregressiveFlow(DIM, TOKENS, BLOCKS, WIDTH, LAYERS, WIDTH // 64, 4.0, 3.0, "alternate", CLASSES)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4, fused=True)
    x, y = torch.rand(BATCH, 1, IMAGE, IMAGE) * 2 - 1, torch.arange(BATCH) % CLASSES
    precision = "bf16" if bf16 else "no"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), attention_backend("cpu", precision):
            z, logdet = flow(patchify(x + SIGMA * torch.randn_like(x), PATCH), y)
            loss = 0.5 * z.pow(2).mean() - logdet.mean() / (TOKENS * DIM)  # TARFlow's loss, per dimension
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample(runner=None):
        return flow.inverse(torch.randn(16, TOKENS, DIM), torch.arange(16) % CLASSES, runner=runner)

    return step, sample, flow


def farmer_model_step(bf16: bool):
    cfg = load_preset("quickstart")
    torch.manual_seed(0)
    model = Farmer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    u, y = torch.randint(0, 256, (BATCH, 1, IMAGE, IMAGE), dtype=torch.uint8), torch.arange(BATCH) % CLASSES
    precision = "bf16" if bf16 else "no"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), attention_backend("cpu", precision):
            loss = model(u, y, noise="gaussian", sigma=SIGMA)["bpd"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


OP_GROUPS = {  # aten operator name fragments -> group (first match wins)
    "matmul": ("addmm", "aten::mm", "bmm", "aten::matmul"),
    "attention": ("attention", "softmax"),
    "LayerNorm": ("layer_norm",),
    "GELU": ("gelu",),
    "optimizer": ("adam", "_foreach", "lerp", "addcdiv"),
}


def profile_groups(fn, calls: int = 3) -> dict[str, float]:
    """ms of operator self time per call of ``fn``, by :data:`OP_GROUPS` (``other``: everything else)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, keys in OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
        groups[group] += event.self_cpu_time_total / 1e3 / calls
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarflow", type=Path, required=True, help="directory with ml-tarflow's transformer_flow.py")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", action="store_true", help="also print where each step's time goes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tf = load_tarflow(args.tarflow)
    fns, params = {}, {}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        fns[f"tarflow step {tag}"], tar_sample, tar_model = tarflow_step(tf, bf16)
        fns[f"farmer step {tag}"], farmer_sample, farmer_flow = farmer_flow_step(bf16)
        fns[f"farmer whole-model step {tag}"], whole = farmer_model_step(bf16)
    fns["tarflow sample"], fns["farmer sample"] = tar_sample, farmer_sample
    compiled = StepRunner("compile")
    start = time.perf_counter()
    farmer_sample(compiled)  # the one-off compilation (one graph for every position and block)
    compile_s = time.perf_counter() - start
    fns["farmer sample compiled"] = lambda: farmer_sample(compiled)
    params = {"tarflow": sum(p.numel() for p in tar_model.parameters()),
              "farmer": sum(p.numel() for p in farmer_flow.parameters()),
              "farmer whole model": sum(p.numel() for p in whole.parameters())}
    t = interleaved(fns, args.repeats)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    train_flops = 3 * BATCH * flow_flops_per_image()
    rows = []
    for tag in ("fp32", "bf16"):
        tar, far = t[f"tarflow step {tag}"], t[f"farmer step {tag}"]
        rows.append({"row": f"train step, {tag}", "tarflow_ms": 1e3 * tar, "farmer_ms": 1e3 * far,
                     "tarflow_over_farmer": tar / far, "farmer_MFU_pct": 100 * train_flops / far / peaks[tag],
                     "tarflow_MFU_pct": 100 * train_flops / tar / peaks[tag]})
    for name, key in (("KV-cached sampling, 16 images", "farmer sample"),
                      ("KV-cached sampling, 16 images, compiled steps", "farmer sample compiled")):
        rows.append({"row": name, "tarflow_ms": 1e3 * t["tarflow sample"], "farmer_ms": 1e3 * t[key],
                     "tarflow_over_farmer": t["tarflow sample"] / t[key], "farmer_MFU_pct": "", "tarflow_MFU_pct": ""})
    for tag in ("fp32", "bf16"):
        rows.append({"row": f"farmer whole model (quickstart) step, {tag}", "tarflow_ms": "",
                     "farmer_ms": 1e3 * t[f"farmer whole-model step {tag}"], "tarflow_over_farmer": "",
                     "farmer_MFU_pct": "", "tarflow_MFU_pct": ""})
    meta = {"repeats": args.repeats, "threads": args.threads, "params": params, "compile_s": compile_s,
            "matmul_peak_TFLOPs": {k: v / 1e12 for k, v in peaks.items()}, "train_flops_per_step": train_flops}
    if args.profile:
        meta["profile_ms_per_call"] = {name: profile_groups(fns[name]) for name in fns
                                       if "whole" not in name and "compiled" not in name}
        groups = [*OP_GROUPS, "other"]
        print("operator self time, ms per call:", "  ".join(f"{g:>9}" for g in groups))
        for name, by_group in meta["profile_ms_per_call"].items():
            print(f"  {name:<28}", "  ".join(f"{by_group[g]:9.1f}" for g in groups))
    print(f"farmer's compiled decoding step: {compile_s:.1f} s to compile (once per process), then the row above")
    report("vs_tarflow", rows, meta)


if __name__ == "__main__":
    main()
