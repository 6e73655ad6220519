"""Autoregressive flow (arXiv v2 §3.2, Fig. 2): invertibility, exact log-determinant, causality, permutation
convention; and activation checkpointing of the transformer stacks.

Expected values come from the math only: the inverse must undo the forward, the log-det must equal
log|det dZ/dX| from torch.autograd, block t's map (in its own token order) must be lower block-triangular with
an identity first token, and the composed flow must be P_t ∘ f_t ∘ P_t per block with P_t = flip on odd t
("alternate") or on every t ("always-flip"). Checkpointing must change nothing but what is kept for backward.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from farmer_cli.model import ARPrior, AutoregressiveFlow, Farmer, TransformerStack
from farmer_cli.model import attention

pytestmark = pytest.mark.usefixtures("single_thread")

PERMS = ["alternate", "always-flip"]


def make_flow(randomise, *, dim=4, tokens=8, blocks=4, perm="alternate", num_classes=0, max_log_scale=3.0, std=0.1):
    flow = AutoregressiveFlow(dim, tokens, blocks, width=32, layers=1, heads=2, mlp_ratio=2.0,
                              max_log_scale=max_log_scale, permutation=perm, num_classes=num_classes)
    randomise(flow, std)
    return flow.eval()


def flip(t):
    return torch.flip(t, dims=[1])


def test_untrained_flow_is_identity():
    torch.manual_seed(0)
    flow = AutoregressiveFlow(4, 8, 3, width=32, layers=1, heads=2).eval()
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        z, logdet = flow(x)
    assert torch.equal(z, x)
    assert torch.equal(logdet, torch.zeros(2))


@pytest.mark.parametrize("perm", PERMS)
def test_inverse_undoes_forward(perm, randomise_out_proj):
    torch.manual_seed(1)
    flow = make_flow(randomise_out_proj, perm=perm)
    x = torch.randn(3, 8, 4)
    with torch.no_grad():
        z, logdet = flow(x)
        x_cached = flow.inverse(z)
        x_uncached = flow.inverse(z, use_cache=False)
    assert z.shape == x.shape and logdet.shape == (3,)
    assert (z - x).abs().max() > 0.05, "randomised flow should not be (close to) the identity"
    assert (x_cached - x).abs().max() <= 1e-4
    assert (x_uncached - x).abs().max() <= 1e-4
    # Cached and uncached decoding differ only by float32 rounding (different attention shapes). One block
    # agrees to 1e-5 (below); through 4 sequential inverses, each amplifying errors by up to exp(|alpha|), the
    # rounding reaches ~1-3e-5 over many seeds, so the whole flow is held to 5e-5.
    assert (x_cached - x_uncached).abs().max() <= 5e-5
    with torch.no_grad():
        for block in flow.blocks:  # one block: absolute agreement
            zb, _ = block(x)
            assert (block.inverse(zb) - block.inverse(zb, use_cache=False)).abs().max() <= 1e-5
            assert (block.inverse(zb) - x).abs().max() <= 1e-5


@pytest.mark.parametrize("perm", PERMS)
def test_logdet_equals_autograd_jacobian(perm, randomise_out_proj):
    # The flow computes in float32 (its documented output dtype), so the reference Jacobian is float32 as well.
    torch.manual_seed(2)
    # (std 0.1 keeps the dense composed Jacobian well conditioned, so its float32 slogdet is accurate.)
    flow = make_flow(randomise_out_proj, dim=4, tokens=4, perm=perm, std=0.1)
    x = torch.randn(1, 4, 4)
    with torch.no_grad():
        _, logdet = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x).reshape(16, 16).double()
    sign, ref = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0  # each block is triangular with positive diagonal exp(-alpha)
    assert abs(ref.item()) > 0.1, "test needs a non-trivial log-det"
    assert abs(logdet.item() - ref.item()) <= 1e-4


def test_block_jacobian_is_lower_block_triangular(randomise_out_proj):
    """In its own token order a block's Jacobian dz_i/dx_j is 0 for j > i, diagonal for j = i, identity for i = 1,
    and its log-det is the sum of the log of those diagonals."""
    torch.manual_seed(3)
    flow = make_flow(randomise_out_proj, dim=3, tokens=5, blocks=1, std=0.3)
    block = flow.blocks[0]
    x = torch.randn(1, 5, 3)
    with torch.no_grad():
        _, logdet = block(x)
    jac = torch.autograd.functional.jacobian(lambda v: block(v)[0], x).reshape(5, 3, 5, 3)
    for i in range(5):
        for j in range(i + 1, 5):
            assert torch.all(jac[i, :, j, :] == 0), f"z_{i} depends on later token x_{j}"
        diag_block = jac[i, :, i, :]
        assert torch.allclose(diag_block - torch.diag(torch.diagonal(diag_block)), torch.zeros(3), atol=1e-7)
    assert torch.allclose(jac[0, :, 0, :], torch.eye(3))
    assert torch.all(jac[0, :, 1:, :] == 0)
    diags = torch.stack([torch.diagonal(jac[i, :, i, :]) for i in range(5)])
    assert torch.all(diags > 0)
    assert abs(logdet.item() - diags.log().sum().item()) <= 1e-5
    assert abs(logdet.item()) > 0.05


def test_block_causality(randomise_out_proj):
    torch.manual_seed(4)
    flow = make_flow(randomise_out_proj, dim=4, tokens=8, blocks=1, std=0.3)
    block = flow.blocks[0]
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        z, _ = block(x)
        assert torch.equal(z[:, 0], x[:, 0])  # first token passes through unchanged
        for j in range(8):
            x2 = x.clone()
            x2[:, j] += torch.randn(2, 4)
            z2, _ = block(x2)
            assert torch.equal(z2[:, :j], z[:, :j]), f"changing token {j} changed an earlier output"
            assert (z2[:, j] - z[:, j]).abs().min() > 0, "z_j must depend on x_j"
            if j < 7:
                assert (z2[:, j + 1:] - z[:, j + 1:]).abs().max() > 1e-4, "later tokens should see x_j"


def test_block_is_affine_in_own_token(randomise_out_proj):
    """z_i = (x_i - mu(x_<i)) * exp(-alpha(x_<i)): for a fixed prefix z_i is affine in x_i."""
    torch.manual_seed(5)
    block = make_flow(randomise_out_proj, dim=4, tokens=6, blocks=1, std=0.3).blocks[0]
    x = torch.randn(1, 6, 4)
    d = torch.randn(1, 4)
    outs = []
    with torch.no_grad():
        for a in (0.0, 1.0, 2.0):
            x2 = x.clone()
            x2[:, 3] += a * d
            outs.append(block(x2)[0][:, 3])
    assert torch.allclose(outs[2] - outs[0], 2 * (outs[1] - outs[0]), atol=1e-5)


@pytest.mark.parametrize("perm", PERMS)
def test_blocks_compose_with_permutation(perm, randomise_out_proj):
    torch.manual_seed(6)
    flow = make_flow(randomise_out_proj, perm=perm)
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        z, logdet, inter = flow(x, return_intermediates=True)
        assert len(inter) == 5
        assert torch.equal(inter[0], x)
        assert torch.allclose(inter[-1], z)
        total = torch.zeros(2)
        h = x
        for t, block in enumerate(flow.blocks):
            flipped = perm == "always-flip" or t % 2 == 1
            p = flip if flipped else (lambda v: v)
            out, ld = block(p(h))
            h = p(out)
            total += ld
            assert torch.allclose(h, inter[t + 1], atol=1e-6), f"block {t}: Z^{t + 1} != P f_t P (Z^{t})"
        assert torch.allclose(logdet, total, atol=1e-5)
        # Partial inverses: Z^t -> Z^0 through blocks t..1.
        for t in range(1, 5):
            assert (flow.inverse(inter[t], upto=t) - x).abs().max() <= 1e-4


def test_always_flip_differs_from_alternate(randomise_out_proj):
    torch.manual_seed(7)
    a = make_flow(randomise_out_proj, perm="alternate", blocks=2)
    b = make_flow(randomise_out_proj, perm="always-flip", blocks=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 4)
    with torch.no_grad():
        za, _ = a(x)
        zb, _ = b(x)
        # Block 0 is the identity permutation in "alternate": its first token passes through.
        inter_a = a(x, return_intermediates=True)[2]
        inter_b = b(x, return_intermediates=True)[2]
    assert torch.equal(inter_a[1][:, 0], x[:, 0])
    assert torch.equal(inter_b[1][:, -1], x[:, -1])  # "always-flip": the last original token is first
    assert (za - zb).abs().max() > 1e-3


def test_log_scale_is_bounded(randomise_out_proj):
    """|alpha| <= max_log_scale per channel, so one block's |log-det| <= c·(N-1)·d, however large the weights."""
    torch.manual_seed(8)
    c = 0.5
    flow = make_flow(randomise_out_proj, dim=4, tokens=8, blocks=1, max_log_scale=c, std=20.0)
    x = 3 * torch.randn(4, 8, 4)
    with torch.no_grad():
        z, logdet = flow(x)
    assert torch.all(logdet.abs() <= c * 7 * 4 + 1e-4)
    assert logdet.abs().max() > 0.25 * c * 7 * 4  # large weights saturate the bound substantially
    assert torch.isfinite(z).all()


def test_class_conditional_flow(randomise_out_proj):
    torch.manual_seed(9)
    flow = make_flow(randomise_out_proj, num_classes=3, std=0.1)
    with torch.no_grad():
        for block in flow.blocks:  # make the class embedding matter
            for name, p in block.named_parameters():
                if "class" in name or "emb" in name:
                    p.normal_(std=1.0)
    x = torch.randn(2, 8, 4)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        z, logdet = flow(x, y)
        z_other, _ = flow(x, torch.tensor([1, 1]))
        back = flow.inverse(z, y)
    assert (back - x).abs().max() <= 1e-4
    assert (z - z_other).abs().max() > 1e-4, "class-conditional flow ignores its class"
    assert torch.isfinite(logdet).all()


# Activation checkpointing ---------------------------------------------------------------------------------------


def outputs_and_grads(module, inputs, upstream, forward):
    """forward(module, inputs) -> (output, grads of <output, upstream> w.r.t. inputs and every parameter)."""
    out = forward(module, inputs)
    return out, torch.autograd.grad((out * upstream).sum(), [inputs, *module.parameters()])


def assert_same_outputs_and_grads(a, b, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.allclose(out_a, out_b, rtol=0, atol=atol)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=0, atol=atol)


def stack_pair(layers=3, width=32, causal=True):
    torch.manual_seed(10)
    plain = TransformerStack(width, layers, heads=2, mlp_ratio=2.0, causal=causal).train()
    ckpt = TransformerStack(width, layers, heads=2, mlp_ratio=2.0, causal=causal, checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


@pytest.mark.parametrize("causal", [True, False])
def test_checkpointed_stack_has_same_outputs_and_gradients(causal):
    plain, ckpt = stack_pair(causal=causal)
    h = torch.randn(2, 8, 32).requires_grad_(True)
    upstream = torch.randn(2, 8, 32)
    run = lambda m, x: m(x)
    assert_same_outputs_and_grads(outputs_and_grads(plain, h, upstream, run), outputs_and_grads(ckpt, h, upstream, run))


def test_checkpointing_keeps_only_layer_inputs_for_backward():
    """What autograd saves for backward (bytes through a saved-tensors hook) shrinks to the layers' inputs."""
    saved = {}
    for stack in stack_pair(layers=4):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stack(torch.randn(2, 16, 32, requires_grad=True))
        saved[stack.checkpoint] = total
    assert saved[True] * 5 < saved[False], saved


def test_checkpointing_is_inactive_in_eval_no_grad_and_cached_decoding(monkeypatch):
    calls = []
    real = attention.activation_checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "activation_checkpoint", counting)
    _, stack = stack_pair(layers=2)
    h = torch.randn(1, 4, 32)
    stack(h)
    assert len(calls) == 2  # training, grad enabled, no cache: every layer
    calls.clear()
    stack.eval()(h)
    stack.train()
    with torch.no_grad():
        stack(h)
    cache = stack.new_cache(1, 4, "cpu")
    stack(h[:, :3], cache)
    stack(h[:, 3:], cache)
    stack.checkpoint = False  # the attribute switches it off
    stack(h)
    assert not calls


def test_checkpointing_under_a_forward_only_attention_backend():
    """Training selects an attention kernel with ``sdpa_kernel`` around the forward pass only (CPU bf16: the math
    kernel); the recomputation in backward must use the same kernel, or checkpoint's consistency check fails."""
    plain, ckpt = stack_pair(layers=2)
    h = torch.randn(2, 8, 32).requires_grad_(True)
    upstream = torch.randn(2, 8, 32)

    def run(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            return m(x).float()

    assert_same_outputs_and_grads(outputs_and_grads(plain, h, upstream, run), outputs_and_grads(ckpt, h, upstream, run))


def test_selective_checkpointing_recomputes_a_share_of_layers_with_the_same_gradients(monkeypatch, tiny_cfg):
    """checkpoint = 0.5 recomputes the first half of a stack's layers; model.checkpoint_fraction reaches every
    stack; outputs and gradients equal those of no checkpointing and of full checkpointing."""
    calls = []
    real = attention.activation_checkpoint
    monkeypatch.setattr(attention, "activation_checkpoint", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    h, upstream = torch.randn(2, 8, 32).requires_grad_(True), torch.randn(2, 8, 32)
    results = []
    for share in (0.0, 0.5, 1.0):
        torch.manual_seed(5)
        stack = TransformerStack(32, 4, 2, checkpoint=share).train()
        calls.clear()
        results.append(outputs_and_grads(stack, h, upstream, lambda m, v: m(v)))
        assert calls == list(range(round(share * 4)))  # layers 0 .. k-1 recomputed
    assert_same_outputs_and_grads(results[0], results[1])
    assert_same_outputs_and_grads(results[0], results[2])
    cfg = tiny_cfg(grad_checkpoint=True, checkpoint_fraction=0.5, af_layers=2, ar_layers=2)
    model = Farmer(cfg)
    assert {stack.checkpoint for stack in model.modules() if isinstance(stack, TransformerStack)} == {0.5}
    assert Farmer(tiny_cfg(checkpoint_fraction=0.5)).prior.stack.checkpoint == 0.0  # grad_checkpoint off


def test_checkpoint_switch_reaches_every_stack(randomise_out_proj, tiny_cfg):
    """AutoregressiveFlow(checkpoint=True) and ARPrior(cfg with grad_checkpoint) checkpoint every stack, and a
    training pass gives the same outputs and gradients as without."""
    x = torch.randn(2, 8, 4).requires_grad_(True)
    flows = []
    for checkpoint in (False, True):
        torch.manual_seed(11)
        flow = AutoregressiveFlow(4, 8, 3, width=32, layers=2, heads=2, checkpoint=checkpoint).train()
        randomise_out_proj(flow)
        flows.append(flow)
    assert all(block.stack.checkpoint for block in flows[1].blocks)

    def fwd(m, v):  # z (B, N, d) and the log-det (B,) as one (B, N·d + 1) tensor
        z, logdet = m(v)
        return torch.cat([z.flatten(1), logdet[:, None]], dim=1)

    upstream = torch.randn(2, 8 * 4 + 1)
    assert_same_outputs_and_grads(*(outputs_and_grads(f, x, upstream, fwd) for f in flows))

    priors = []
    for checkpoint in (False, True):
        torch.manual_seed(12)
        priors.append(ARPrior(tiny_cfg(grad_checkpoint=checkpoint)).train())
    assert priors[1].stack.checkpoint and not priors[0].stack.checkpoint
    cfg = tiny_cfg()
    z = torch.randn(2, cfg.ar_tokens, cfg.ar_token_dim).requires_grad_(True)
    y = torch.tensor([1, 7])
    fwd = lambda m, v: torch.stack(m(v, y))  # (log p(Z^I), log p(Z^R)), (2, B)
    upstream = torch.randn(2, 2)
    assert_same_outputs_and_grads(*(outputs_and_grads(p, z, upstream, fwd) for p in priors))


def test_jacobi_inverse_equals_the_sequential_inverse(tiny_cfg):
    """Parallel Jacobi iteration reaches the exact inverse (float32, 1e-4) within N - 1 rounds per block."""
    from conftest import _randomise_out_proj

    torch.manual_seed(0)
    flow = AutoregressiveFlow(4, 16, 3, 32, 1, 2)
    _randomise_out_proj(flow, 0.2)
    z = torch.randn(3, 16, 4)
    exact = flow.inverse(z)
    parallel, rounds = flow.jacobi_inverse(z, tol=1e-6)
    torch.testing.assert_close(parallel, exact, atol=1e-4, rtol=0)
    assert len(rounds) == 3 and all(1 <= r <= 16 for r in rounds)
    capped, rounds = flow.jacobi_inverse(z, max_iter=2)
    assert rounds == [2, 2, 2] and (capped - exact).abs().max() > 1e-4  # two rounds are not enough here


@pytest.mark.parametrize("exact_span", [True, False])
def test_kv_cache_is_written_in_place_and_matches_the_full_pass(exact_span):
    """Token-by-token decoding through the cache equals one causal pass, whether attention reads exactly the filled
    positions or the whole (partly unfilled, masked) buffer; the buffers are allocated once and written in place
    at a position kept on the device."""
    torch.manual_seed(0)
    stack = TransformerStack(32, 2, 4).eval()
    h = torch.randn(2, 12, 32)
    cache = stack.new_cache(2, 12, "cpu")
    with torch.no_grad():
        full = stack(h)
        cache.span = 3 if exact_span else 12
        steps, buffers = [stack(h[:, :3], cache)], set()
        for i in range(3, 12):
            cache.span = i + 1 if exact_span else 12
            steps.append(stack(h[:, i : i + 1], cache))
            buffers.add(cache.keys[0].data_ptr())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.position) == 12
    assert len(buffers) == 1 and cache.keys[0].shape[2] == 12
