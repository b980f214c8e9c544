"""CUDA graphs per phase: a compiled program captured once, then replayed, exchanges included.

The per-rank program of a phase (warm-up or steady) is one graph: its Triton kernels, its
collectives on the process group's communication stream and their joins. Its first call runs
eagerly: that warms up the compiled kernels and the communicators and allocates the exchange
buffers outside any graph, at addresses that then stay fixed. The second call captures and
replays; later calls copy the inputs that change (latents, timestep, embeddings) into the
graph's own input tensors and replay. Parameters are read where they are; their addresses are
checked on each call and a change recaptures.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)


class PhaseGraph:
    """One phase's program as a replayed CUDA graph; counts its captures and replays."""

    def __init__(self, program: Callable, static_positions: set[int], pool, name: str):
        self.program = program
        self.static_positions = sorted(static_positions)  # inputs read in place: parameters, exchange buffers
        self.copied_positions: list[int] = []  # inputs copied into the graph's own tensors
        self.pool = pool  # shared by the phases of one trajectory: they never run at once
        self.name = name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list = []
        self.outputs = None
        self.static_addresses: list[int] = []
        self.eager_calls = self.captures = self.replays = 0

    def _addresses(self, args) -> list[int]:
        return [args[i].data_ptr() for i in self.static_positions]

    def _capture(self, args):
        static = set(self.static_positions)
        self.copied_positions = [i for i, a in enumerate(args) if i not in static and isinstance(a, torch.Tensor)]
        self.inputs = list(args)
        for i in self.copied_positions:
            a = args[i]
            self.inputs[i] = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
        self.static_addresses = self._addresses(args)
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        start = time.perf_counter()
        # thread_local: the process group's watchdog thread may query events during the capture.
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.outputs = self.program(*self.inputs)
        self.captures += 1
        seconds = time.perf_counter() - start
        log.info("districompile: captured the %s phase as a CUDA graph in %.1f s (capture %d)", self.name, seconds, self.captures)

    def __call__(self, *args):
        if self.eager_calls == 0:
            self.eager_calls += 1
            return self.program(*args)
        if self.graph is None:
            self._capture(args)
        elif self._addresses(args) != self.static_addresses:
            log.info("districompile: parameters of the %s phase moved; capturing again", self.name)
            self._capture(args)
        else:
            for i in self.copied_positions:
                self.inputs[i].copy_(args[i])
        self.graph.replay()
        self.replays += 1
        # The graph's outputs are overwritten by its next replay: hand out copies.
        return type(self.outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs)


def capturable(inputs: list, names: list[str]) -> bool:
    """Whether a program on these inputs can be replayed as a CUDA graph; logs why not."""
    for name, x in zip(names, inputs):
        if isinstance(x, torch.Tensor) and not x.is_cuda:
            log.warning(
                "districompile: input %s is on %s, so its phase runs without CUDA graphs "
                "(a replay would not see its new values): pass it on the GPU", name, x.device,
            )
            return False
    return True
