"""Fixed-shape decoding steps (model/steps.py): every mode gives the reference samples, one compiled graph serves
every position and block, no decoding step waits on the device, and CUDA-graph span buckets attend correctly."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import farmer_cli.model.steps as steps
from farmer_cli.config.schema import SamplingConfig
from farmer_cli.model import Farmer
from farmer_cli.model.randomness import ImageStreams
from farmer_cli.model.steps import StepRunner, resolve_mode

from conftest import SyncCounter, _randomise_out_proj, _tiny_cfg
from cli_helpers import farmer

GUIDED = SamplingConfig(cfg=2.0, redundant_pool=8)


@pytest.fixture(scope="module")
def model() -> Farmer:
    torch.manual_seed(0)
    m = Farmer(_tiny_cfg(af_class_conditional=True)).eval()  # class embeddings in the AF's decoding offsets too
    _randomise_out_proj(m.flow, 0.1)
    return m


def sample(model: Farmer, runner: StepRunner | None, use_cache: bool = True, s: SamplingConfig = GUIDED):
    """AR tokens and the decoded image for classes 0..3, each image from its own stream."""
    y = torch.arange(4)
    tokens = model.sample_tokens(y, s, ImageStreams.for_images(0, range(4), model.device), use_cache,
                                 runner=runner)
    return tokens, model.decode(tokens, y, use_cache, runner=runner)


def test_cached_steps_equal_recomputing_every_prefix(model):
    tokens, image = sample(model, None)
    ref_tokens, ref_image = sample(model, None, use_cache=False)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [GUIDED, SamplingConfig(redundant_pool=8)], ids=["guided", "unguided"])
def test_compiled_steps_give_the_eager_samples_with_one_graph_per_step(model, s):
    """torch.compile(fullgraph=True, dynamic=False) captures the AF step and the AR step once each: every position
    of every AF block reuses one graph, every AR token another; no recompilation over a whole sample. (Dynamo's
    eager backend: the capture and its guards are what is tested, not the code generator.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tokens, image = sample(model, StepRunner("compile", backend="eager"), s=s)
    ref_tokens, ref_image = sample(model, StepRunner("eager"), s=s)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"]
    sample(model, StepRunner("compile", backend="eager"), s=s)  # a second sample call: still no new graph
    assert counters["stats"]["unique_graphs"] == 2


def test_decoding_steps_make_no_host_syncs(model):
    """Neither decoding loop reads a value back from the device: not the steps, not the draws between them. (A
    check that the counter sees syncs: the Jacobi decoder reads its convergence test back once per round.)"""
    sample(model, None)  # warm-up outside the count
    with SyncCounter() as counter:
        sample(model, None)
    assert counter.ops > 500 and counter.syncs == []
    y, tokens = torch.arange(4), torch.randn(4, model.prior.N, model.cfg.ar_token_dim)
    with SyncCounter() as jacobi:
        model.decode(tokens, y, s=SamplingConfig(decoder="jacobi"))
    assert jacobi.syncs


def test_one_af_step_is_a_fixed_number_of_operators(model):
    """Every AF step dispatches the same operators, whatever the position (the count the closing note reports)."""
    block, (B, N, d) = model.flow.blocks[0], (4, model.cfg.tokens, model.cfg.token_dim)
    runner = StepRunner()
    z = torch.randn(B, N, d)
    x, cache = z.clone(), block.stack.new_cache(B, N, "cpu")
    offsets = block._offsets(0, N, torch.arange(B)).expand(B, -1, -1)
    counts = []
    for i in range(1, N):
        runner.attend(cache, i)
        with SyncCounter() as counter:
            block.decode_step(x, z, offsets, cache)
        counts.append(counter.ops)
    assert len(set(counts)) == 1, counts


def test_span_buckets_attend_like_the_exact_span(model, monkeypatch):
    """The CUDA-graph mode attends over the cache up to the next bucket boundary (masked); run eagerly with those
    spans, sampling gives the exact-span samples."""
    monkeypatch.setattr(steps, "SPAN_BUCKET", 3)
    bucketed = StepRunner()
    bucketed.mode = "cuda-graphs"  # spans as on a GPU, steps run eagerly (no CUDA here)
    monkeypatch.setattr(bucketed, "run", lambda key, step, *args: step(*args))
    spans = []
    attend = bucketed.attend
    monkeypatch.setattr(bucketed, "attend", lambda cache, filled: spans.append(attend(cache, filled)) or spans[-1])
    tokens, image = sample(model, bucketed)
    ref_tokens, ref_image = sample(model, StepRunner())
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-5)
    capacities = (model.cfg.tokens, model.prior.M + model.prior.N)  # AF, AR
    assert all(span % 3 == 0 or span in capacities for span in spans)
    assert any(span < min(capacities) for span in spans)  # partly filled buckets were attended under the mask


def test_mode_resolution():
    assert resolve_mode("auto", "cpu") == "eager"
    assert resolve_mode("compile", "cpu") == "compile"
    with pytest.raises(ValueError, match="need a CUDA device"):
        resolve_mode("cuda-graphs", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_mode("fast", "cpu")


def test_cuda_graphs_asked_for_on_a_cpu_is_one_line_exit_2(tiny_run, tmp_path):  # noqa: F811
    proc = farmer("sample", "--ckpt", str(tiny_run), "--decode-steps", "cuda-graphs", "--out", str(tmp_path / "s.png"),
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "need a CUDA device" in proc.stderr.strip().splitlines()[-1]
