"""What a compiled model keeps between calls: its compiled shapes, their exchange buffers, and
where its denoising trajectory stands.

One ``ModelRuntime`` per model (and set of options), kept on the module itself and shared by
every graph Dynamo makes of it (a graph break splits a forward into several). A model call is a run of its graphs;
the graph that runs first in a trajectory (the leading one) counts the model's calls and decides
whether a new trajectory begins, and all of the model's graphs then restart together. A graph
whose steady phase did not run in the previous model call would read stale values of an older
step: an error, not a silent read.
"""

from __future__ import annotations

import logging
import sys
import weakref

import torch

from .batch_split import BatchSplit
from .errors import DistriCompileError

log = logging.getLogger(__name__)

_ATTRIBUTE = "_districompile_runtime"  # where a module keeps its ModelRuntime

# A sample that moved by more than this fraction of its norm since the previous call is a new
# image, not the next step of a trajectory: consecutive denoising inputs differ by a fraction
# of their norm, while fresh noise against the last step's latent differs by about sqrt(2).
NEW_SAMPLE_JUMP = 0.75


class Trajectory:
    """The compiled phases of one graph at one input shape, and the exchange buffers they share.

    ``programs`` are the per-rank FX programs by phase ("synchronous", or "warm-up" and
    "steady"; "unsplit" for a graph with no spatial input), ``lowered`` the callables that run
    them. A displaced shape owns its exchange buffers (``buffers``): every phase takes them as
    its last inputs, and the warm-up writes them before any steady call reads them.
    """

    def __init__(
        self, programs: dict, lowered: dict, buffers: list, warmup_steps: int, batch_split: BatchSplit | None, lowering: str,
    ):
        self.programs, self.lowered, self.buffers = programs, lowered, buffers
        self.lowering = lowering  # what ``lowered`` runs: "eager" until background compiles take over
        self.background: dict | None = None  # the worker processes compiling the phases meanwhile, by phase
        self.warmup_steps = warmup_steps
        self.batch_split = batch_split  # None: the phases run the whole batch over the whole group
        self.calls = 0  # calls of the current trajectory
        self.phase_calls = dict.fromkeys(programs, 0)  # over all trajectories
        self.last_sample: torch.Tensor | None = None  # this graph's first spatial input at its last leading call
        self.last_call: int | None = None  # the model call of the trajectory this graph last ran in

    @property
    def displaced(self) -> bool:
        return "steady" in self.programs

    def phase(self) -> str:
        if not self.displaced:
            (phase,) = self.programs  # "synchronous" or "unsplit"
            return phase
        return "steady" if self.calls >= self.warmup_steps else "warm-up"

    def __call__(self, *args):
        """Run the warm-up program for the first calls of a trajectory, the steady one after."""
        phase = self.phase()
        output = self.lowered[phase](*args, *self.buffers)
        self.calls += 1
        self.phase_calls[phase] += 1
        return output


class ModelRuntime:
    """Everything one compiled model keeps between calls.

    ``compiled`` maps each of its graph runtimes (weakly: a graph Dynamo drops takes its
    programs and buffers with it) to that graph's trajectories by ``(owner, input shapes)``.
    ``restarts`` counts the trajectories begun (every rank must agree on it, like on the call
    count). A model call is counted when the trajectory's first graph runs.
    """

    def __init__(self, name: str):
        self.name = name
        self.compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.restarts = 0
        self.calls = 0  # model calls of the current trajectory, counted by its first graph
        self.first: Trajectory | None = None  # the graph that ran first in the current trajectory
        self.last_timestep: float | None = None
        self.failure: str | None = None  # a call that failed midway: the ranks are out of step
        self.pending: list = []  # the last call's deferred checks (runtime.PendingCheck), read at the next

    @property
    def graphs(self) -> list:
        """The graph runtimes of this model, in the order they were first called."""
        return list(self.compiled.keys())

    def trajectory(self, graph, key: tuple) -> Trajectory | None:
        return self.compiled.get(graph, {}).get(key)

    def add(self, graph, key: tuple, trajectory: Trajectory):
        self.compiled.setdefault(graph, {})[key] = trajectory

    def restart(self, reason: str = "reset()"):
        """Begin a new trajectory; a no-op before the first call of one (so ranks count alike)."""
        if self.first is None:
            return
        log.info("districompile: %s starts a new trajectory (%s)", self.name, reason)
        for trajectories in list(self.compiled.values()):
            for trajectory in trajectories.values():
                trajectory.calls, trajectory.last_call = 0, None
        self.calls, self.first, self.last_timestep = 0, None, None
        self.restarts += 1

    def leads(self, trajectory: Trajectory | None) -> bool:
        """Whether a call of this graph begins a model call: it is the graph that ran first in
        the trajectory, or the trajectory has not begun."""
        return self.first is None or (trajectory is not None and trajectory is self.first)

    def enter(self, trajectory: Trajectory, graph_name: str):
        """Count the call. A graph in its steady phase must have run in the previous model call:
        its stale values are then one step old. A graph that joins later warms up on its own."""
        if self.leads(trajectory):
            self.first = trajectory
            self.calls += 1
        stale = trajectory.last_call is not None and trajectory.last_call != self.calls - 1
        if stale and trajectory.phase() == "steady":
            raise DistriCompileError(
                f"districompile: the graphs of {self.name} are out of step: {graph_name} last ran in call {trajectory.last_call} "
                f"of the trajectory and now runs in call {self.calls}, so its stale values are not the previous step's. A graph "
                "that does not run in every call of the model (a data-dependent branch around a graph break) cannot reuse "
                "them; keep the forward's graph breaks unconditional, and call districompile.reset(model) before each image"
            )
        trajectory.last_call = self.calls


def model_runtimes(model) -> list[ModelRuntime]:
    """The ModelRuntimes kept on ``model``, one per set of options it was compiled with (its
    compiled wrapper answers for it too)."""
    return list(getattr(model, "_orig_mod", model).__dict__.get(_ATTRIBUTE, {}).values())


def model_runtime(model: torch.nn.Module, config) -> ModelRuntime:
    """``model``'s ModelRuntime for ``config``, created on first use."""
    by_config = model.__dict__.setdefault(_ATTRIBUTE, {})  # not a submodule or parameter: Dynamo's guards ignore it
    if config not in by_config:
        by_config[config] = ModelRuntime(type(model).__name__)
    return by_config[config]


def calling_model() -> torch.nn.Module | None:
    """The compiled module whose call is running: the innermost ``torch.compile(module)`` wrapper,
    or a module compiled in place (``module.compile()``), on the Python stack. None for a
    compiled function."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_locals.get("self")
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            return module._orig_mod
        if isinstance(module, torch.nn.Module) and getattr(module, "_compiled_call_impl", None) is not None:
            return module
        frame = frame.f_back
    return None


class ModelLookup:
    """Which ModelRuntime a graph's call belongs to, found once per owner (the first parameter
    the graph reads; Dynamo shares a graph between instances of a class)."""

    def __init__(self, graph_name: str, config):
        self.graph_name, self.config = graph_name, config
        self.by_owner: dict[int, tuple[weakref.ref, ModelRuntime]] = {}
        self.detached: ModelRuntime | None = None  # a compiled function's: no module to keep it on

    def __call__(self, owner: torch.Tensor | None) -> ModelRuntime:
        if owner is not None:
            cached = self.by_owner.get(id(owner))
            if cached is not None and cached[0]() is owner:
                return cached[1]
        model = calling_model()
        if model is not None:
            found = model_runtime(model, self.config)
        else:
            if self.detached is None:
                log.warning(
                    "districompile: %s runs outside a compiled module (torch.compile of a function): its trajectory "
                    "is its own, and districompile.reset(model) cannot reach it; compile the module itself",
                    self.graph_name,
                )
                self.detached = ModelRuntime(self.graph_name)
            found = self.detached
        if owner is not None:
            self.by_owner[id(owner)] = (weakref.ref(owner), found)
        return found
