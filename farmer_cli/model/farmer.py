"""FARMER: autoregressive flow + GMM autoregressive prior, trained end to end on exact NLL (arXiv v2 Eqs. 6, 13, 14).

    u (B, C, H, W) uint8 --dequantize--> x = (u + noise)/128 - 1 --patchify (+ optional DCT)--> (B, N, d)
      --AF--> Z (B, N, d), log|det| --merge m x m, final permute--> AR tokens (B, N/m², m²·d)
      --prior--> log p(Z^I | c) + log p(Z^R | Z^I, c)

    -log p(x) = -[log p(Z^I|c) + log p(Z^R|Z^I,c) + log|det dZ/dx|]             (continuous, x in [-1,1]^D)
    NLL(u)   = -log p(x) + D·ln 128   (the density of u + noise on [0,256)^D; with noise ~ U(0,1) a bound on the
                                       discrete likelihood)
    bits/dim = NLL(u) / (D·ln 2)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from farmer_cli.config.schema import ModelConfig, SamplingConfig
from farmer_cli.model.attention import checkpointing, decoding_attention
from farmer_cli.model.flow import AutoregressiveFlow
from farmer_cli.model.gmm import GMM
from farmer_cli.model.guidance import draw, draw_tokens, resampling_bytes
from farmer_cli.model.patchify import merge_tokens, patchify, split_tokens, token_basis, unpatchify
from farmer_cli.model.prior import ARPrior
from farmer_cli.model.steps import StepRunner
from farmer_cli.model.randomness import RandomSource, as_randomness


def dequantize(u: torch.Tensor, noise: str = "uniform", sigma: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in about [-1, 1].

    ``uniform``: x = (u + U(0,1))/128 - 1 (likelihood evaluation, supplement's ImageNet-64 training);
    ``gaussian``: x = (u + 0.5)/128 - 1 + sigma·N(0,1) (training, sigma annealed; arXiv v2 §3.2);
    ``none``: x = (u + 0.5)/128 - 1 (bin centres).
    """
    u = u.float()
    if noise == "uniform":
        return (u + torch.rand(u.shape, generator=generator, device=u.device)) / 128.0 - 1.0
    x = (u + 0.5) / 128.0 - 1.0
    if noise == "gaussian" and sigma > 0:
        x = x + sigma * torch.randn(u.shape, generator=generator, device=u.device)
    return x


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [-1, 1] -> uint8, inverse of the bin-centre map of :func:`dequantize`."""
    return ((x + 1.0) * 128.0 - 0.5).round().clamp(0, 255).to(torch.uint8)


class NonFiniteError(ValueError):
    """A model output that should be a number is NaN or infinite: weights that diverged or were damaged."""


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` itself, or a NonFiniteError naming ``what`` (a host sync: for results on their way to the host)."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} are not finite (NaN or inf): the model's weights have diverged or were "
                             "damaged; use an earlier checkpoint (checkpoints/step-*) or train again")
    return t


class InformativeSample(NamedTuple):
    """What the AR prior's token-by-token pass produces: informative tokens (B, n, d_I) and the shared redundant
    mixtures, conditional (B,) and, when guided, unconditional (B,); both None without a channel split."""

    tokens: torch.Tensor
    redundant: GMM | None
    redundant_null: GMM | None


class Farmer(nn.Module):
    """The whole model. ``nll`` for training and scoring, ``encode``/``decode`` for the latent, ``sample``.

    ``trained_noise_sigma``: the Gaussian dequantisation sigma at the end of training (0 for uniform noise); the
    density the model learned is smoothed by it, and :meth:`sample` removes it with one denoising step."""

    def __init__(self, cfg: ModelConfig, trained_noise_sigma: float = 0.0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.trained_noise_sigma = trained_noise_sigma
        self.flow = AutoregressiveFlow(
            cfg.token_dim, cfg.tokens, cfg.af_blocks, cfg.af_width, cfg.af_layers, cfg.af_heads, cfg.mlp_ratio,
            cfg.af_max_log_scale, cfg.af_permutation, cfg.num_classes if cfg.af_class_conditional else 0,
            checkpoint=cfg.checkpoint_share, gelu=cfg.gelu,
        )
        self.prior = ARPrior(cfg)
        self.register_buffer("basis", token_basis(cfg.token_basis, cfg.patch_size, cfg.channels), persistent=False)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> AF input tokens (B, N, d): patchify, then the optional fixed basis (DCT or whole
        pixels, :func:`~farmer_cli.model.patchify.token_basis`)."""
        t = patchify(x, self.cfg.patch_size)
        return t if self.basis is None else t @ self.basis.T

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_tokens`."""
        t = t if self.basis is None else t @ self.basis
        return unpatchify(t, self.cfg.patch_size, self.cfg.channels, self.cfg.image_size)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (inputs are moved here; random generators must live here)."""
        return self.basis.device if self.basis is not None else next(self.parameters()).device

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _flow_class(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.cfg.af_class_conditional else None

    def _labels(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Class indices (B,); None means the null class (unconditional likelihood / sampling)."""
        if y is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return y.to(device=device, dtype=torch.long)

    # ----- latent <-> AR tokens -----
    def to_ar_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """AF latent (B, N, d) -> AR tokens (B, N/m², m²·d) (merge, then final permute)."""
        z = merge_tokens(z, self.cfg.token_merge, self.cfg.merge_order == "interleave")
        return z.flip(1) if self.cfg.final_permute == "flip" else z

    def from_ar_tokens(self, t: torch.Tensor) -> torch.Tensor:
        t = t.flip(1) if self.cfg.final_permute == "flip" else t
        return split_tokens(t, self.cfg.token_merge, self.cfg.merge_order == "interleave")

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised image x (B, C, H, W) -> AR tokens (B, n, D_ar), AF log-det (B,)."""
        y = self._labels(y, x.shape[0], x.device)
        z, logdet = self.flow(self.to_tokens(x), self._flow_class(y))  # the DCT basis has |det| = 1
        return self.to_ar_tokens(z), logdet

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, y: torch.Tensor | None = None, use_cache: bool = True,
               student: nn.Module | None = None, on_block: Callable[[int], None] | None = None,
               s: SamplingConfig | None = None, stats: dict | None = None,
               runner: StepRunner | None = None) -> torch.Tensor:
        """AR tokens (B, n, D_ar) -> image x (B, C, H, W): one student pass when ``student`` is given, else the AF's
        exact inverse, token by token (KV cache; steps run by ``runner``, eager by default) or, with
        ``s.decoder == "jacobi"``, by parallel Jacobi iteration (its rounds per block go to
        ``stats["jacobi_rounds"]``). ``s.decoder == "student"`` requires ``student``."""
        if student is None and s is not None and s.decoder == "student":
            raise ValueError("sampling.decoder = student needs the distilled student: pass student= "
                             "(farmer_cli.checkpoint.load_student)")
        y = self._labels(y, tokens.shape[0], tokens.device)
        z = self.from_ar_tokens(tokens.float())
        if student is not None:
            x = student.one_pass_inverse(z, self._flow_class(y))
        elif s is not None and s.decoder == "jacobi":
            x, rounds = self.flow.jacobi_inverse(z, self._flow_class(y), s.jacobi_tol, s.jacobi_max_iter, on_block)
            if stats is not None:
                stats.setdefault("jacobi_rounds", []).append(rounds)
        else:
            x = self.flow.inverse(z, self._flow_class(y), use_cache=use_cache, on_block=on_block, runner=runner)
        return self.from_tokens(x)

    # ----- likelihood -----
    def nll(self, u: torch.Tensor, y: torch.Tensor | None = None, noise: str = "uniform", sigma: float = 0.0,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """uint8 images (B, C, H, W), classes (B,) or None -> per-sample terms, each (B,) float32:

        ``nll`` (nats, of u on [0,256)^D), ``bpd``, and the log-likelihood terms ``log_p_info``,
        ``log_p_red`` and ``logdet`` (their sum is log p(x))."""
        x = dequantize(u, noise, sigma, generator)
        return self.nll_continuous(x, y)

    def forward(self, u: torch.Tensor, y: torch.Tensor | None = None, noise: str = "uniform", sigma: float = 0.0):
        """Same as :meth:`nll` (so DDP / Accelerate wrappers see a forward call)."""
        return self.nll(u, y, noise, sigma)

    def nll_continuous(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """As :meth:`nll` for an already dequantised x (B, C, H, W) in [-1, 1]."""
        y = self._labels(y, x.shape[0], x.device)
        tokens, logdet = self.encode(x, y)
        log_info, log_red = self.prior(tokens, y)
        D = self.cfg.dims
        nll = -(log_info + log_red + logdet) + D * math.log(128.0)
        return {"nll": nll, "bpd": nll / (D * math.log(2.0)), "log_p_info": log_info, "log_p_red": log_red,
                "logdet": logdet}

    def patch_bits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Where the bits go: the exact NLL of dequantised x (B, C, H, W) split over its patches.

        Each AF token (patch) gets its log-det from every block (each block's token order undone), and each AR
        token's informative term and its share of the redundant term (AR tokens are merged patches: split equally
        over the m² patches, the final permute undone), plus the dequantisation constant d·ln 128 of its d values.
        Returns float32 (B, N) per-patch terms in nats ("logdet", "log_p_info", "log_p_red") and "bits" (their
        NLL in bits); "bits" sums over patches to the image's NLL in bits exactly up to float rounding."""
        y = self._labels(y, x.shape[0], x.device)
        tokens = self.to_tokens(x)
        z, logdet = self.flow(tokens, self._flow_class(y), per_token=True)
        info, red = self.prior(self.to_ar_tokens(z), y, per_token=True)
        m2 = self.cfg.token_merge**2

        def to_patches(v: torch.Tensor) -> torch.Tensor:  # (B, n) per AR token -> (B, N) per patch
            v = v.flip(1) if self.cfg.final_permute == "flip" else v
            return split_tokens((v / m2)[..., None].expand(-1, -1, m2), self.cfg.token_merge)[..., 0]

        info, red = to_patches(info), to_patches(red)
        nats = -(logdet + info + red) + self.cfg.token_dim * math.log(128.0)
        return {"logdet": logdet, "log_p_info": info, "log_p_red": red, "bits": nats / math.log(2.0)}

    def class_log_likelihoods(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """log p(x | c) in nats for every image and every class: x (B, C, H, W) dequantised, classes (K,) -> (B, K).

        An unconditional AF encodes each image once and only the AR prior runs once per class."""
        B, K = x.shape[0], classes.shape[0]
        labels = classes.to(x.device).repeat_interleave(B)  # class-major: rows k*B .. k*B+B-1 are class k
        if self.cfg.af_class_conditional:
            log_px = -self.nll_continuous(x.repeat(K, 1, 1, 1), labels)["nll"] + self.cfg.dims * math.log(128.0)
        else:
            tokens, logdet = self.encode(x)
            info, red = self.prior(tokens.repeat(K, 1, 1), labels)
            log_px = info + red + logdet.repeat(K)
        return log_px.view(K, B).T

    # ----- sampling -----
    @torch.no_grad()
    def sample_informative(self, y: torch.Tensor, s: SamplingConfig, rng: RandomSource = None,
                           use_cache: bool = True, on_token: Callable[[int], None] | None = None,
                           runner: StepRunner | None = None, stats: dict | None = None) -> InformativeSample:
        """Classes y (B,) -> the informative tokens, drawn one by one, and the shared redundant mixture(s). With
        the KV cache each step feeds one token (:meth:`ARPrior.token_step`, run by ``runner``: eager by
        default); without, each recomputes the prefix. With guidance (s.cfg > 0) the conditional and null-class
        passes run as one batch of 2B. ``rng``: a generator on the model's device, per-image streams, or None.
        ``stats["ess_informative"]`` collects the resampling weights' effective sample size per token, (B,) each."""
        prior, B, device = self.prior, y.shape[0], y.device
        ess = None if stats is None else stats.setdefault("ess_informative", [])
        rng = as_randomness(rng, device)
        runner = runner or StepRunner()
        guided = s.cfg > 0
        labels = torch.cat([y, torch.full_like(y, self.null_class)]) if guided else y
        z_info = torch.zeros(labels.shape[0], prior.N, prior.d_I, device=device)  # both halves hold the tokens
        capacity = prior.M + prior.N
        if use_cache:
            cache = runner.buffers(("ar cache", labels.shape[0], device),
                                   lambda: prior.stack.new_cache(labels.shape[0], capacity, device))
            cache.restart()
            runner.attend(cache, prior.M)
        with decoding_attention(device):
            hidden = prior.prefill(labels, cache) if use_cache else prior.next_hidden(labels, z_info[:, :0])
            for i in range(prior.N):
                token = draw_tokens(prior.info_head(hidden), 1, 0, s, rng, ess)  # (B, 1, d_I)
                z_info[:, i : i + 1] = torch.cat([token, token]) if guided else token
                if i < prior.N - 1 or prior.red_head is not None:  # after the last token: the redundant mixture
                    if use_cache:
                        span = runner.attend(cache, prior.M + i + 1)
                        hidden = runner.run(("ar", span), ARPrior.token_step, prior, z_info, cache)
                    else:
                        hidden = prior.next_hidden(labels, z_info[:, : i + 1])
                if on_token is not None:
                    on_token(i)
            red = None if prior.red_head is None else prior.red_head(hidden)
        tokens = z_info[:B]
        if red is None or not guided:
            return InformativeSample(tokens, red, None)
        return InformativeSample(tokens, red.index(slice(0, B)), red.index(slice(B, 2 * B)))

    @torch.no_grad()
    def sample_tokens(self, y: torch.Tensor, s: SamplingConfig, rng: RandomSource = None,
                      use_cache: bool = True, on_token: Callable[[int], None] | None = None,
                      runner: StepRunner | None = None, stats: dict | None = None) -> torch.Tensor:
        """Classes y (B,) -> AR tokens (B, n, D_ar): informative tokens one by one, then all N redundant vectors
        from the one shared mixture (through the resampling pool when guided; ``stats["ess_redundant"]`` collects
        the pool weights' effective sample size)."""
        rng = as_randomness(rng, y.device)
        z_info, red, red_null = self.sample_informative(y, s, rng, use_cache, on_token, runner, stats)
        if red is None:
            return z_info
        ess = None if stats is None else stats.setdefault("ess_redundant", [])
        z_red = draw(red, red_null, self.prior.N, s.redundant_pool or 2 * self.prior.N, s, rng, ess)
        return torch.cat([z_info, z_red], dim=-1)

    def guidance_bytes(self, batch: int, s: SamplingConfig) -> int:
        """Working memory of the largest resampling step (Algorithm 1) when ``batch`` images are sampled under
        ``s``: an informative token's s_c + s_u candidates, or the redundant step's pool of 2 x ``redundant_pool``;
        0 without resampling guidance."""
        if s.cfg <= 0 or s.guidance != "resample":
            return 0
        prior, cfg = self.prior, self.cfg
        steps = [resampling_bytes(batch, s.cond_candidates + s.uncond_candidates, prior.d_I,
                                  cfg.informative_components)]
        if prior.red_head is not None:
            pool = s.redundant_pool or 2 * prior.N
            steps.append(resampling_bytes(batch, 2 * pool, prior.d_R, cfg.redundant_components))
        return max(steps)

    def denoise_sigma(self, s: SamplingConfig) -> float:
        """The noise level one denoising step removes after decoding: 0 when ``s.denoise`` is off."""
        return self.trained_noise_sigma if s.denoise else 0.0

    def denoise(self, x: torch.Tensor, y: torch.Tensor | None, sigma: float, batch: int = 0,
                checkpoint: bool = False) -> torch.Tensor:
        """One score-based denoising step (Tweedie): E[x_clean | x] = x + sigma² ∇_x log p(x).

        A model trained on data plus N(0, sigma²) noise models the noisy density, so its exact log-likelihood
        gives the score in one backward pass (as TARFlow does; the FARMER paper describes no denoising).
        x (B, C, H, W) -> (B, C, H, W). The backward pass keeps every layer's activations (with ``checkpoint``,
        only each layer's input, at the cost of one more forward pass), so it runs ``batch`` images at a time
        (0: all at once); images are independent, so the result depends on neither."""
        if sigma <= 0:
            return x
        chunks = x.split(batch) if batch > 0 else (x,)
        labels = y.split(batch) if batch > 0 and y is not None else (y,) * len(chunks)
        out = []
        for xc, yc in zip(chunks, labels):
            with torch.enable_grad(), checkpointing(self, checkpoint):
                xc = xc.detach().float().requires_grad_(True)
                log_p = -self.nll_continuous(xc, yc)["nll"].sum()
                (score,) = torch.autograd.grad(log_p, xc)
            out.append((xc + sigma**2 * score).detach())
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, s: SamplingConfig, rng: RandomSource = None,
               use_cache: bool = True, student: nn.Module | None = None,
               on_token: Callable[[int], None] | None = None,
               on_block: Callable[[int], None] | None = None, stats: dict | None = None,
               denoise_batch: int = 0, denoise_checkpoint: bool = False) -> torch.Tensor:
        """Classes y (B,) -> uint8 images (B, C, H, W), denoised by :meth:`denoise_sigma` when ``s.denoise``
        (``denoise_batch`` images at a time, 0: all; with activation checkpointing when ``denoise_checkpoint``).

        ``on_token`` / ``on_block`` are called after each sampled token / inverted AF block (progress bars).
        ``rng``: a ``torch.Generator`` on the model's device (:attr:`device`), per-image streams
        (:class:`~farmer_cli.model.randomness.ImageStreams`) or None (torch's global generator).
        Both decoding loops run their steps as ``s.decode_steps`` says (:mod:`~farmer_cli.model.steps`)."""
        y = y.to(self.device)
        runner = StepRunner(s.decode_steps, self.device)
        tokens = self.sample_tokens(y, s, rng, use_cache, on_token, runner, stats)
        x = self.decode(tokens, y, use_cache, student, on_block, s, stats, runner)
        del runner  # its KV caches and graphs are not needed for denoising
        x = self.denoise(x, y, self.denoise_sigma(s), denoise_batch, denoise_checkpoint)
        return quantize(check_finite(x, "the sampled images"))
