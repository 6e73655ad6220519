"""Where the fixed-shape decoding steps run: eagerly, compiled, or replayed from CUDA graphs.

Both sequential decoders, the AF inverse (arXiv v2 §3.2: one token per step, N - 1 steps per block) and the AR prior
(§3.3: one informative token per step), are written as *steps* over static buffers: a :class:`~.attention.KVCache`
whose write position is a device tensor, and per-decoder input/output buffers indexed by that position. A step
has the same shapes and touches the same memory at every token, so a :class:`StepRunner` can run it

* ``eager``: called as it is (the reference every other mode must equal);
* ``compile``: ``torch.compile(step, fullgraph=True, dynamic=False,
                                                            backend=self.backend)``, attention over the whole cache
  (``span`` = capacity), so one graph serves every position and every block of the same shape;
* ``cuda-graphs``: per (step, span bucket) the first call runs eagerly, then the step is captured into a
  ``torch.cuda.CUDAGraph`` and every later call is one replay, instead of ~100 kernel launches per AF step and
  ~450 per AR token. Attention reads the cache up to the next multiple of :data:`SPAN_BUCKET` positions.

``auto`` is ``cuda-graphs`` on a CUDA device and ``eager`` elsewhere (on a CPU the compile time of a step does not
pay for a sampling call as users run it: see docs/benchmarks.md).

Graphs are captured inside the caller's autocast region and replay the weight casts autocast cached there, so a
runner lives for one sampling call (one autocast region); a new call captures again.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable, get_args

import torch

from farmer_cli.config.schema import DecodeSteps
from farmer_cli.model.attention import KVCache

MODES = get_args(DecodeSteps)
SPAN_BUCKET = 128  # positions: a CUDA-graph step attends over the filled cache rounded up to a multiple of this


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """``auto`` -> ``cuda-graphs`` on CUDA, else ``eager``; ``cuda-graphs`` elsewhere is refused."""
    device = torch.device(device)
    if mode not in MODES:
        raise ValueError(f"decoding steps must be one of {', '.join(MODES)}, not '{mode}'")
    if mode == "auto":
        return "cuda-graphs" if device.type == "cuda" else "eager"
    if mode == "cuda-graphs" and device.type != "cuda":
        raise ValueError(f"decoding steps 'cuda-graphs' need a CUDA device, not {device.type}")
    return mode


class StepRunner:
    """Runs decoding steps in one :data:`MODES` mode and holds what that mode keeps between steps (compiled
    functions, captured graphs and their memory pool)."""

    def __init__(self, mode: str = "eager", device: torch.device | str = "cpu", backend: str = "inductor") -> None:
        self.mode = resolve_mode(mode, device)
        self.backend = backend  # torch.compile's backend in ``compile`` mode
        self._compiled: dict[Callable, Callable] = {}
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._pool = None
        self._buffers: dict[Hashable, object] = {}

    def buffers(self, key: Hashable, make: Callable[[], object]):
        """The static buffers named ``key``, made by ``make()`` at the first request: decoders of the same shape
        (the AF blocks) share them, and captured graphs keep pointing at them."""
        if key not in self._buffers:
            self._buffers[key] = make()
        return self._buffers[key]

    def attend(self, cache: KVCache, filled: int) -> int:
        """Set how many positions of ``cache`` the next step attends over, when ``filled`` positions (with the
        ones being fed) hold keys, and return it: exactly those eagerly (and no mask for one token), a bucket of
        them for CUDA graphs, all of them compiled."""
        if self.mode == "compile":
            span = cache.capacity
        elif self.mode == "cuda-graphs":
            span = min(cache.capacity, SPAN_BUCKET * math.ceil(filled / SPAN_BUCKET))
        else:
            span = filled
        cache.span, cache.exact_span = span, self.mode == "eager"  # a replayed step must not depend on filled
        return span

    def run(self, key: Hashable, step: Callable, *args):
        """``step(*args)``. ``step`` is a plain function whose arguments are the same objects (modules, static
        buffers, caches) at every call with the same ``key``; ``key`` must also name the span."""
        if self.mode == "eager":
            return step(*args)
        if self.mode == "compile":
            if step not in self._compiled:
                self._compiled[step] = torch.compile(step, fullgraph=True, dynamic=False,
                                                            backend=self.backend)
            return self._compiled[step](*args)
        captured = self._graphs.get(key)
        if captured is not None:
            graph, output = captured
            graph.replay()
            return output
        result = step(*args)  # the real step, and the warm-up the capture needs
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = step(*args)  # recorded, not run: the next call with this key replays it
        except RuntimeError as error:  # a kernel that cannot be captured: run the rest of this call eagerly
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {error}", RuntimeWarning, stacklevel=2)
            self.mode = "eager"
            return result
        self._pool = graph.pool()
        self._graphs[key] = (graph, output)
        return result
