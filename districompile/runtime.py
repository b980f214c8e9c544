"""One runtime per compiled graph: its process group, per-shape programs and trajectory state."""

from __future__ import annotations

import logging
import time
import weakref

import torch
import torch.distributed as dist
import torch.fx as fx

from .backends.cudagraphs import PhaseGraph
from .backends.lowering import lower, on_cuda
from .batch_split import BatchSplit, batch_split
from .compiler import plan
from .config import DistriConfig
from .displaced import allocate_buffers
from .errors import DistriCompileError
from .passes.annotate import spatial_inputs
from .passes.displace import displace
from .passes.sequence import sequence_exchanges

log = logging.getLogger(__name__)
torch._logging._internal.register_artifact("distri_graph", "the per-rank program districompile writes", off_by_default=True)
graph_log = torch._logging.getArtifactLogger(__name__, "distri_graph")

_LIVE: "weakref.WeakSet[DistriRuntime]" = weakref.WeakSet()


def _shape_key(args, positions) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in map(args.__getitem__, positions)
    )


class Trajectory:
    """The compiled phases of one input shape, the exchange buffers they share, and where the
    current trajectory stands.

    ``programs`` are the per-rank FX programs by phase ("synchronous", or "warm-up" and
    "steady"; "unsplit" for a graph with no spatial input), ``lowered`` the callables that run them. A displaced shape owns its exchange
    buffers (``buffers``): every phase takes them as its last inputs, and the warm-up writes
    them before any steady call reads them.
    """

    def __init__(self, programs: dict, lowered: dict, buffers: list, warmup_steps: int, batch_split: BatchSplit | None):
        self.programs, self.lowered, self.buffers = programs, lowered, buffers
        self.warmup_steps = warmup_steps
        self.batch_split = batch_split  # None: the phases run the whole batch over the whole group
        self.calls = 0  # calls of the current trajectory
        self.phase_calls = dict.fromkeys(programs, 0)  # over all trajectories
        self.last_timestep: float | None = None

    @property
    def displaced(self) -> bool:
        return "steady" in self.programs

    def restart(self):
        self.calls = 0
        self.last_timestep = None

    def __call__(self, *args):
        """Run the warm-up program for the first calls of a trajectory, the steady one after."""
        if not self.displaced:
            (phase,) = self.programs  # "synchronous" or "unsplit"
        else:
            phase = "steady" if self.calls >= self.warmup_steps else "warm-up"
        self.calls += 1
        self.phase_calls[phase] += 1
        return self.lowered[phase](*args, *self.buffers)


class DistriRuntime:
    """Compiles the Dynamo graph into per-rank programs for each input shape and runs them.

    With a displaced ``sync_mode`` each shape has two programs: the warm-up one (exchanges
    synchronous, their results recorded) and the steady one (stale exchanges, sent
    asynchronously for the next call). A trajectory restarts on ``reset()`` or when a
    timestep goes up (diffusion timesteps fall along a trajectory).
    """

    def __init__(self, dynamo_gm: fx.GraphModule, example_inputs: list, config: DistriConfig):
        self.dynamo_gm = dynamo_gm
        self.config = config
        self.spatial = spatial_inputs(dynamo_gm, example_inputs, config.spatial_inputs)
        # Dynamo reuses one graph for every instance of a model class (parameters are inputs),
        # so trajectories are kept per model, told apart by the parameter tensors of each call.
        self.parameter_positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        # Parameter shapes are fixed by the graph: a per-call key over the other inputs is enough
        # (and keeps the per-call cost off the thousands of parameters of a large UNet).
        self.data_positions = [i for i, x in enumerate(example_inputs) if not isinstance(x, torch.nn.Parameter)]
        self.timesteps = [
            i for i, x in enumerate(example_inputs)
            if isinstance(x, torch.Tensor) and x.numel() <= 2 and not isinstance(x, torch.nn.Parameter) and i not in self.spatial
        ]
        self.trajectories: dict[tuple, Trajectory] = {}
        self.compilations = 0
        _LIVE.add(self)

    @property
    def displaced(self) -> bool:
        return self.config.sync_mode != "full_sync" and self.config.exchanges

    def group(self):
        if not dist.is_initialized():
            raise DistriCompileError(
                "backend='distri' needs torch.distributed: call dist.init_process_group() on every rank "
                "(torchrun sets the rank and world size); districompile.explain() needs none"
            )
        return self.config.group or dist.group.WORLD

    def _lower(self, program, args, phase: str, pool, persistent: int):
        self.compilations += 1
        # An SDXL-sized phase takes a minute or more through Inductor: say what is being waited on.
        log.info("districompile: lowering the %s phase (%d nodes, %s)", phase, len(program.graph.nodes), self.config.lowering)
        start = time.perf_counter()
        lowered = lower(program, list(args), self.config, phase, pool, persistent)
        log.info("districompile: lowered the %s phase in %.1f s", phase, time.perf_counter() - start)
        return lowered

    def compile(self, args) -> Trajectory:
        if not self.spatial:  # say, the graph after a graph break that computes the time embedding
            log.info("districompile: a graph with no spatial input runs unsplit on every rank")
            lowered = self._lower(self.dynamo_gm, args, "unsplit", None, 0)
            return Trajectory({"unsplit": self.dynamo_gm}, {"unsplit": lowered}, [], 0, None)
        group, graph = self.group(), self.dynamo_gm
        split = batch_split(self.dynamo_gm, args, self.spatial, self.config, group)
        if split is not None:  # the phases run this rank's half of the batch over its half of the ranks
            group, graph, args = split.patch_group, split.program, split.slice_inputs(args)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        model_plan = plan(graph, list(args), self.spatial, world, self.config.exchanges, self.config.single_rank_exchanges)
        program = model_plan.program(rank, group.group_name)
        log.info("districompile: rows split %s over %d ranks", list(model_plan.split.bounds), world)
        if not self.displaced:
            programs, buffers, warmup_steps = {"synchronous": program}, [], 0
        else:
            phases = displace(program, self.config.sync_mode, rank)
            programs, buffers = {"warm-up": phases.warmup, "steady": phases.steady}, allocate_buffers(phases.buffers)
            warmup_steps = max(self.config.warmup_steps, 1)  # stale values need one synchronous call to exist
        for phase, phase_program in programs.items():
            sequence_exchanges(phase_program)
            graph_log.debug(
                "districompile rank %d/%d %s program:\n%s", rank, world, phase, phase_program.print_readable(print_output=False)
            )
        # The phases share one CUDA graph memory pool: they never run at once.
        pool = torch.cuda.graph_pool_handle() if on_cuda(args) and len(programs) > 1 else None
        inputs = [*args, *buffers]
        lowered = {phase: self._lower(p, inputs, phase, pool, len(buffers)) for phase, p in programs.items()}
        return Trajectory(programs, lowered, buffers, warmup_steps, split)

    def graph_counts(self) -> dict[str, int]:
        """CUDA graph captures and replays, and calls run without a graph, over all phases."""
        phases = [p for t in self.trajectories.values() for p in t.lowered.values() if isinstance(p, PhaseGraph)]
        return {
            "captures": sum(p.captures for p in phases),
            "replays": sum(p.replays for p in phases),
            "eager_calls": sum(p.eager_calls for p in phases),
        }

    def owner(self, args) -> int | None:
        return id(args[self.parameter_positions[0]]) if self.parameter_positions else None

    def owners(self) -> set:
        return {key[0] for key in self.trajectories}

    def reset(self, owners: set | None = None):
        for (owner, _), trajectory in self.trajectories.items():
            if owners is None or owner in owners:
                trajectory.restart()

    def _timestep(self, args) -> float | None:
        if not self.timesteps:
            return None
        return max(float(args[i].max()) for i in self.timesteps)

    def __call__(self, *args):
        key = (self.owner(args), _shape_key(args, self.data_positions))
        if key not in self.trajectories:
            self.trajectories[key] = self.compile(args)
        trajectory = self.trajectories[key]
        if trajectory.displaced:
            timestep = self._timestep(args)
            if timestep is not None and trajectory.last_timestep is not None and timestep > trajectory.last_timestep:
                trajectory.restart()
            trajectory.last_timestep = timestep
        split = trajectory.batch_split
        if split is None:
            return trajectory(*args)
        return split.gather_outputs(trajectory(*split.slice_inputs(args)))


def runtimes(model) -> list[DistriRuntime]:
    """The runtimes of ``model``'s compiled graphs (one per graph Dynamo captured)."""
    ids = {id(p) for p in model.parameters()}
    return [r for r in list(_LIVE) if r.owners() & ids]


def reset(model) -> int:
    """Start a new trajectory (warm-up again, no stale values reused) for every compiled graph of ``model``.

    Returns how many compiled graphs were reset.
    """
    ids = {id(p) for p in model.parameters()}
    found = runtimes(model)
    for runtime in found:
        runtime.reset(ids)
    return len(found)
