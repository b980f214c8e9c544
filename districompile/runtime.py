"""One runtime per Dynamo graph: it compiles the per-rank programs of each input shape and runs
them for the model the call belongs to (``trajectory.ModelRuntime``)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import pickle
import re
import sys
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.aot_compile import SerializableCallable

from . import plan_cache
from .agreement import (
    AGREED,
    DeferredRows,
    check_ranks_agree,
    gather_host_rows,
    gather_rows_of_ranks,
    host_group,
    host_row,
    local_row,
)
from .backends import compile_workers
from .backends.cudagraphs import PhaseGraph
from .backends.lowering import CompileUnit, compile_units, inductor, lower, on_cuda
from .batch_split import batch_split
from .compiler import RankPrograms, rank_programs
from .config import DistriConfig
from .displaced import allocate_buffers
from .errors import DistriCompileError
from .passes.annotate import PACKED_TOKENS_FIX, input_names, spatial_inputs, timestep_inputs, token_sequences
from .passes.pieces import pieces
from .precompile import load_portable_graph, portable_graph
from .trajectory import NEW_SAMPLE_JUMP, ModelLookup, ModelRuntime, Trajectory, model_runtimes

log = logging.getLogger(__name__)
torch._logging._internal.register_artifact("distri_graph", "the per-rank program districompile writes", off_by_default=True)
graph_log = torch._logging.getArtifactLogger(__name__, "distri_graph")


def _shape_key(args, positions) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in map(args.__getitem__, positions)
    )


def _graph_name() -> str:
    """The traced function, and for the graph after a graph break, the line it resumes at."""
    context = torch._guards.TracingContext.try_get()
    if context is None or not context.traced_code:
        return "graph"
    code = context.traced_code[0]
    resumed = re.fullmatch(r"torch_dynamo_resume_in_(\w+)_at_(\d+)", code.co_name)
    if resumed:
        return f"graph of {resumed[1]} from line {resumed[2]}"
    return f"graph of {code.co_name}"


def _phase_pool(args, programs: dict):
    """The CUDA graph memory pool a shape's phases share (they never run at once); None off CUDA or
    for a single phase."""
    return torch.cuda.graph_pool_handle() if on_cuda(args) and len(programs) > 1 else None


@dataclass(frozen=True)
class InputLayout:
    """What a runtime reads of its graph's inputs, once, inside the backend call (where Dynamo's
    tracing context names them): a precompiled model keeps it (``precompile``), as it has no
    backend call when it is loaded."""

    name: str  # the graph's, for the logs: "graph of forward"
    input_names: list[str]
    spatial: list[int]  # positions of the inputs split by rows (``annotate.spatial_inputs``)
    timesteps: list[int]
    token_inputs: list[str]  # token sequences, named with their shapes, where no input is spatial
    # Dynamo reuses one graph for every instance of a model class (parameters are inputs), so each
    # call's model is told apart by the parameter tensors it passes.
    parameter_positions: list[int]
    # Parameter shapes are fixed by the graph: a per-call key over the other inputs is enough (and
    # keeps the per-call cost off the thousands of parameters of a large UNet).
    data_positions: list[int]

    @classmethod
    def read(cls, dynamo_gm: fx.GraphModule, example_inputs: list, config: DistriConfig, name: str | None = None) -> InputLayout:
        spatial = spatial_inputs(dynamo_gm, example_inputs, config.spatial_inputs, config.grids)
        placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
        return cls(
            name=name or _graph_name(),
            input_names=[answers[0] for answers in input_names(placeholders)],
            spatial=spatial,
            timesteps=timestep_inputs(dynamo_gm, example_inputs, spatial),
            token_inputs=[] if spatial else token_sequences(dynamo_gm, example_inputs),
            parameter_positions=[i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)],
            data_positions=[i for i, x in enumerate(example_inputs) if not isinstance(x, torch.nn.Parameter)],
        )


class DistriRuntime(SerializableCallable):
    """Compiles one Dynamo graph into per-rank programs for each input shape, and runs them.

    With a displaced ``sync_mode`` each shape has two programs: the warm-up one (exchanges
    synchronous, their results recorded) and the steady one (stale exchanges, sent
    asynchronously for the next call). The compiled shapes and where the trajectory stands
    belong to the model (``trajectory.ModelRuntime``), shared by all of its graphs. Each call
    first checks that the ranks agree (``agreement``); a trajectory restarts on ``reset()``, on
    new input shapes, when a timestep goes up (they fall along a trajectory) or when the sample
    jumps (``NEW_SAMPLE_JUMP``: not the previous step's continuation).
    """

    def __init__(self, dynamo_gm: fx.GraphModule, layout: InputLayout, config: DistriConfig):
        self.dynamo_gm = dynamo_gm
        self.config = config
        self.layout = layout
        self.name = layout.name
        self.spatial, self.timesteps, self.token_inputs = layout.spatial, layout.timesteps, layout.token_inputs
        self.input_names = layout.input_names
        self.parameter_positions, self.data_positions = layout.parameter_positions, layout.data_positions
        # no_sync leaves the other ranks' rows of each output stale, so the ranks' samples differ by
        # design there: the check compares their shapes only.
        self.fingerprinted = [i for i in self.data_positions if not (config.sync_mode == "no_sync" and i in self.spatial)]
        self.models = ModelLookup(self.name, config)
        self.served: weakref.WeakSet[ModelRuntime] = weakref.WeakSet()
        self.timed_groups: set[str] = set()
        self.compilations = 0
        self.workers_started = 0  # compile worker processes
        self.worker_cache_hits = 0  # units (phases or pieces) loaded from the cache a compile worker filled

    # A precompiled model (``precompile``: torch's AOT compile, which keeps Dynamo's work too) saves
    # its backend's result through these: the graph, its input layout and the options. What the
    # runtime compiles from them, it finds in the plan and Inductor caches, shipped beside it.
    @classmethod
    def serialize_compile_artifacts(cls, runtime: DistriRuntime) -> bytes:
        if runtime.config.group is not None:
            raise DistriCompileError(
                "districompile.precompile: a model compiled with group= cannot be saved (a process group lives in "
                "one process); precompile it on the default group, the one init_process_group makes"
            )
        return pickle.dumps({"graph": portable_graph(runtime.dynamo_gm), "layout": runtime.layout, "config": runtime.config})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> DistriRuntime:
        saved = pickle.loads(data)
        return cls(load_portable_graph(saved["graph"]), saved["layout"], saved["config"])

    @property
    def trajectories(self) -> dict[tuple, Trajectory]:
        """This graph's compiled shapes, over the models it ran for: ``{(owner, shapes): Trajectory}``."""
        return {key: t for model in list(self.served) for key, t in model.compiled.get(self, {}).items()}

    def graph_counts(self) -> dict[str, int]:
        """CUDA graph captures and replays, and calls run without a graph, over all phases."""
        phases = [p for t in self.trajectories.values() for p in t.lowered.values() if isinstance(p, PhaseGraph)]
        return {
            "captures": sum(p.captures for p in phases),
            "replays": sum(p.replays for p in phases),
            "eager_calls": sum(p.eager_calls for p in phases),
        }

    def group(self):
        if not dist.is_initialized():
            raise DistriCompileError(
                "backend='distri' needs torch.distributed: call dist.init_process_group() on every rank "
                "(torchrun sets the rank and world size); districompile.explain() needs none"
            )
        group = self.config.group or dist.group.WORLD
        self._bound_waits(group)
        return group

    def _bound_waits(self, *groups):
        """A rank that died or failed midway leaves the others waiting in a collective: bound the wait."""
        for group in groups:
            if self.config.timeout is not None and group.group_name not in self.timed_groups:
                dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=self.config.timeout), group)
                self.timed_groups.add(group.group_name)

    @contextlib.contextmanager
    def _stage(self, what: str):
        """Log a compile stage and its seconds; with ``progress``, rank 0 also prints them (an SDXL
        phase takes a minute or more through Inductor: say what is being waited on)."""
        shown = self.config.progress and (not dist.is_initialized() or dist.get_rank() == 0)
        log.info("districompile: %s", what)
        if shown:
            print(f"districompile: {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        log.info("districompile: %s took %.1f s", what, seconds)
        if shown:
            print(f"districompile: {what}: {seconds:.1f} s", file=sys.stderr, flush=True)

    def _lower(self, program, args, phase: str, pool, persistent: int, config: DistriConfig | None = None, compile_unit=None):
        config = config or self.config
        self.compilations += 1
        split = pieces(program)
        size = f"{sum(len(p.graph.nodes) for _, p in split)} nodes in {len(split)} pieces" if split else f"{len(program.graph.nodes)} nodes"
        with self._stage(f"{self.name}: lowering the {phase} phase ({size}, {config.lowering})"):
            return lower(program, list(args), config, phase, pool, persistent, compile_unit)

    def compile(self, args) -> Trajectory:
        if not self.spatial:  # say, the graph after a graph break that computes the time embedding
            log.info("districompile: a graph with no spatial input runs unsplit on every rank")
            if self.token_inputs:  # a transformer's packed latent (Flux): the whole model would run unsplit
                log.warning(
                    "districompile: %s has no spatial input (N, C, H, W) but token sequences %s, maybe an image's packed "
                    "tokens (Flux): it runs whole on every rank, nothing in parallel; %s", self.name, ", ".join(self.token_inputs),
                    PACKED_TOKENS_FIX,
                )
            lowered = self._lower(self.dynamo_gm, args, "unsplit", None, 0)
            return Trajectory({"unsplit": self.dynamo_gm}, {"unsplit": lowered}, [], 0, None, self.config.lowering)
        group = self.group()
        planned, loaded = self._rank_programs(args, group)
        split = batch_split(planned.layout, group) if planned.layout is not None else None
        if split is not None:  # the phases run this rank's half of the batch over its half of the ranks
            self._bound_waits(split.patch_group, split.pair_group)
            args = split.slice_inputs(args)
            log.info(
                "districompile: split_batch: a batch of %d split in two halves of %d ranks each; this rank runs half %d",
                planned.layout.batch, dist.get_world_size(split.patch_group), split.half,
            )
        log.info("districompile: rows split %s over %d ranks", list(planned.bounds), len(planned.bounds) - 1)
        buffers = allocate_buffers(planned.buffers)
        warmup_steps = max(self.config.warmup_steps, 1) if self.config.displaced else 0  # stale values need one synchronous call to exist
        pool = _phase_pool(args, planned.programs)
        inputs, programs = [*args, *buffers], planned.programs
        # Programs loaded from the plan cache are a restart's: their phases are in Inductor's caches
        # (shipped with them), and a compile worker would only be withdrawn.
        units = [unit for phase, program in programs.items() for unit in compile_units(phase, program)]
        if self.config.background_compile and not loaded and compile_workers.fx_cache_on("the phases compile before the first call"):
            workers = self._start_workers(units, inputs, first=True)
            eager = replace(self.config, lowering="eager", background_compile=False)
            lowered = {phase: self._lower(program, inputs, phase, pool, len(buffers), eager) for phase, program in programs.items()}
            trajectory = Trajectory(programs, lowered, buffers, warmup_steps, split, eager.lowering)
            trajectory.background = workers
            # A process that ends (or drops the shape) before they are loaded leaves no compile running.
            weakref.finalize(trajectory, compile_workers.cancel_all, list(workers.values()))
            return trajectory
        workers = self._start_workers(units, inputs) if not loaded and compile_workers.wanted(units, self.config) else {}
        lowered = self._lower_phases(programs, inputs, pool, len(buffers), workers)
        return Trajectory(programs, lowered, buffers, warmup_steps, split, self.config.lowering)

    def _start_workers(self, units: list[CompileUnit], inputs: list, first: bool = False) -> dict:
        workers = compile_workers.start_workers(units, inputs, first)
        self.workers_started += len(workers)
        return workers

    def _take_over(self, compiled: Trajectory, args):
        """At the start of a trajectory, the phases compiled in the background replace the eager
        ones, once every rank's workers are done: whatever the timing, this graph runs one lowering
        on every rank and from an image's first step to its last."""
        ready = all(worker.done() for worker in compiled.background.values())
        flag = torch.tensor([int(ready)], device=args[self.spatial[0]].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group())
        if not flag.item():
            return
        workers, compiled.background = compiled.background, None
        if compiled.batch_split is not None:
            args = compiled.batch_split.slice_inputs(args)
        pool = _phase_pool(args, compiled.programs)
        with self._stage(f"{self.name}: the phases compiled in the background take over from the eager ones"):
            compiled.lowered = self._lower_phases(compiled.programs, [*args, *compiled.buffers], pool, len(compiled.buffers), workers)
        compiled.lowering = self.config.lowering

    def _rank_programs(self, args, group) -> tuple[RankPrograms, bool]:
        """This rank's programs, and whether they came from the plan cache; through Inductor they
        are code-only copies (``compile_workers.portable``), as a compile worker receives them."""
        entry_key = None
        if plan_cache.enabled(self.config):
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            entry_key = plan_cache.key(self.dynamo_gm, args, self.config, rank, world, group.group_name)
        planned = None
        if entry_key is not None and plan_cache.holds(entry_key):
            with self._stage(f"{self.name}: loading the per-rank programs from the plan cache"):
                planned = plan_cache.load(entry_key, group)
        loaded = planned is not None
        if loaded:
            for warning in planned.warnings:
                log.warning("%s", warning)
        else:
            with self._stage(f"{self.name}: planning the per-rank programs (capture, batch split, propagate, partition, displace)"):
                planned = rank_programs(self.dynamo_gm, args, self.spatial, self.config, group)
                if entry_key is not None:
                    planned = plan_cache.store(entry_key, planned)
                elif self.config.lowering == "inductor":
                    planned.programs = {phase: compile_workers.portable(p) for phase, p in planned.programs.items()}
        if graph_log.isEnabledFor(logging.DEBUG):
            for phase, program in planned.programs.items():
                graph_log.debug(
                    "districompile rank %d/%d %s program:\n%s", dist.get_rank(), dist.get_world_size(), phase,
                    program.print_readable(print_output=False),
                )
        return planned, loaded

    def _lower_phases(self, programs: dict, inputs: list, pool, persistent: int, workers: dict) -> dict:
        """Each phase, lowered; its units (the phase, or each of its pieces) with a worker process
        (``compile_workers``), once the worker is done, loaded here from Inductor's cache, which it filled."""
        first = True

        def compile_unit(unit: CompileUnit, unit_inputs: list):
            nonlocal first
            worker = workers.pop(unit.name, None)
            worked = False
            if worker is not None:
                with self._stage(f"{self.name}: waiting for the worker process compiling {unit.name}"):
                    worked = worker.wait()
            hits = compile_workers.fx_cache_hits()
            compiled = inductor(unit.program, unit_inputs)
            loaded = compile_workers.fx_cache_hits() > hits
            if worked and not loaded:
                log.warning("districompile: %s: %s was not in its worker's cache entry; compiled it again", self.name, unit.name)
            self.worker_cache_hits += worked and loaded
            if first and worker is None and loaded and workers:
                # Caches that hold the first unit (a restart) hold the others: the workers are not needed.
                with self._stage(f"{self.name}: withdrawing the compile workers (the phases are cached)"):
                    for idle in workers.values():
                        idle.withdraw()
                workers.clear()
            first = False
            return compiled

        try:
            return {
                phase: self._lower(program, inputs, phase, pool, persistent, compile_unit=compile_unit)
                for phase, program in programs.items()
            }
        finally:  # a unit that failed to compile leaves no worker running
            for idle in workers.values():
                idle.cancel()

    def describe(self, args, model: ModelRuntime, calls: int, trajectory: int, row: list[float] | None = None) -> str:
        """This rank's inputs and state, for an error that compares the ranks: each input's sum, or
        where the check was deferred (the inputs may have changed since), the row's fingerprint."""
        inputs = ", ".join(
            f"{self.input_names[i]} {tuple(args[i].shape)} {str(args[i].dtype).removeprefix('torch.')}"
            + ("" if row is not None else f" sum {float(args[i].double().sum()):.6g}")
            if isinstance(args[i], torch.Tensor) else f"{self.input_names[i]}={args[i]!r}"
            for i in self.data_positions
        )
        if row is not None:
            total, squares = row[AGREED.index("inputs sum")], row[AGREED.index("inputs sum of squares")]
            inputs += f"; weighted sum {total:.6g}, of squares {squares:.6g}"
        return f"{model.name} {self.name}, trajectory {trajectory}, call {calls + 1}: {inputs}"

    def __call__(self, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise DistriCompileError(
                "districompile runs inference only (its exchanges have no autograd formula): call the model under "
                "torch.no_grad() or torch.inference_mode()"
            )
        owner = args[self.parameter_positions[0]] if self.parameter_positions else None
        model = self.models(owner)
        if model.failure is not None:
            raise DistriCompileError(model.failure)
        self.served.add(model)
        key = (id(owner), _shape_key(args, self.data_positions))
        compiled = model.trajectory(self, key)
        calls = compiled.calls if compiled is not None else 0
        # The same graph and model at other shapes, this trajectory: new shapes begin a new one.
        reshaped = any(t.last_call is not None for k, t in model.compiled.get(self, {}).items() if k[0] == key[0] and k != key)
        leading = reshaped or model.leads(compiled)
        if leading:
            settle_checks(model)  # the previous model call's, where they were deferred
        sample = args[self.spatial[0]] if self.spatial else None
        last_sample = compiled.last_sample if compiled is not None and leading else None
        group = self.group() if self.spatial and self.config.check_ranks else None
        head = host_row(args, self.data_positions, model.restarts, calls)
        row = local_row(args, head, self.fingerprinted, self.timesteps, sample, last_sample)
        where = f"call {calls + 1} of {model.name}'s trajectory ({self.name})"
        # A new shape is checked whole before it compiles (its compile and first exchanges need ranks that agree).
        deferred = self.config.host_checks == "deferred" and compiled is not None
        if deferred and group is not None:  # what the host knows is compared now, on the CPU
            # Its group is created after the first call's compile, as without deferred checks: the
            # programs name the batch split's groups, which torch numbers in order of creation, so
            # caches built with either setting serve the other.
            hosts = host_group(group)
            rows = gather_host_rows(head, hosts, where)
            check_ranks_agree(rows, lambda: self.describe(args, model, calls, model.restarts), hosts, where)
        if deferred:
            trajectory = model.restarts
            model.pending.append(PendingCheck(
                DeferredRows(row, group, where), group, where, leading, began=reshaped or model.first is None,
                describe=lambda row: self.describe(args, model, calls, trajectory, row),
            ))
        else:
            rows = gather_rows_of_ranks(row, group, where)
            if group is not None:
                check_ranks_agree(rows, lambda: self.describe(args, model, calls, model.restarts), group, where)
        if compiled is None:
            compiled = self.compile(args)
            model.add(self, key, compiled)
        if leading:
            reason = "new input shapes" if reshaped else None if deferred else restart_reason(model, rows[0])
            if reason:
                model.restart(reason)
            if not deferred:
                note_timestep(model, rows[0])
            if sample is not None and compiled.displaced:
                compiled.last_sample = sample.detach().clone()
        if compiled.background is not None and compiled.calls == 0 and any(compiled.phase_calls.values()):
            self._take_over(compiled, args)
        model.enter(compiled, self.name)
        return self._run(model, compiled, args)

    def _run(self, model: ModelRuntime, compiled: Trajectory, args):
        calls, phase = compiled.calls, compiled.phase()
        try:
            split = compiled.batch_split
            if split is None:
                return compiled(*args)
            return split.gather_outputs(compiled(*split.slice_inputs(args)))
        except Exception as error:
            rank = dist.get_rank() if dist.is_initialized() else 0
            where = f"call {calls + 1} of {model.name}'s trajectory ({phase} phase, {self.name}, rank {rank})"
            if compiled.programs.keys() != {"unsplit"}:
                # Its exchanges may be half done: the other ranks wait in them, and this rank's next
                # call would pair with the wrong ones.
                model.failure = (
                    f"districompile: {where} failed earlier ({type(error).__name__}: {error}); the ranks' exchanges are "
                    "out of step since. Restart the processes (a new process group) to go on"
                )
            raise DistriCompileError(f"districompile: {where} failed: {error}") from error


@dataclass
class PendingCheck:
    """A call's check whose rows the host reads at the model's next call (``host_checks="deferred"``)."""

    rows: DeferredRows
    group: object  # None: no comparison of the ranks (check_ranks off, or a graph with no spatial input)
    where: str
    leading: bool  # the call's graph ran first in its model call: its rows tell whether a new image began
    began: bool  # the call began a trajectory itself (reset, new shapes): nothing to detect
    describe: Callable[[list[float]], str]  # this rank's inputs, given its row


def restart_reason(model: ModelRuntime, row: list[float], sample_jump: bool = True) -> str | None:
    """Why a leading graph's call (its row) begins a new trajectory, if it does (see ``DistriRuntime``)."""
    timestep, moved, norm = row[len(AGREED) :]
    if timestep >= 0 and model.last_timestep is not None and timestep > model.last_timestep:
        return f"the timestep rose from {model.last_timestep:g} to {timestep:g}"
    if sample_jump and moved > NEW_SAMPLE_JUMP * norm:
        return f"the sample moved by {moved / max(norm, 1e-30):.2f} of its norm: a new image"
    return None


def note_timestep(model: ModelRuntime, row: list[float]):
    """The leading graph's timestep, to tell a rise at the next call."""
    timestep = row[len(AGREED)]
    if timestep >= 0:
        model.last_timestep = timestep


def settle_checks(model: ModelRuntime):
    """Read the deferred checks of ``model``'s last call: ranks that disagreed, or a new image begun
    without ``reset``, raise here, one call late (every rank reads the same rows, so all raise)."""
    pending, model.pending = model.pending, []
    rank = dist.get_rank() if dist.is_initialized() else 0
    for check in pending:
        rows = check.rows.rows()
        if check.group is not None:
            local = rows[dist.get_rank(check.group)]
            check_ranks_agree(rows, lambda: check.describe(local), check.group, check.where, ran=True)
        if not check.leading:
            continue
        # A rising timestep only: the sample's jump also fires where steps move the sample far (a
        # model with random weights), which per call costs a warm-up but here would be an error.
        new_image = None if check.began else restart_reason(model, rows[0], sample_jump=False)
        note_timestep(model, rows[0])
        if new_image:
            raise DistriCompileError(
                f"districompile: {check.where} began a new image ({new_image}) without districompile.reset(model): with "
                f"host_checks='deferred' the call ran the steady phase with the previous image's stale activations, so "
                f"its output is wrong (rank {rank}). Call districompile.reset(model) on every rank before each image "
                "(parallelize(pipe) does), or use host_checks='per_call' to detect new images before each call"
            )


def runtimes(model) -> list[DistriRuntime]:
    """The runtimes of ``model``'s compiled graphs (one per graph Dynamo captured, per set of options)."""
    return [graph for found in model_runtimes(model) for graph in found.graphs]


def settle(model):
    """Read now the checks of ``model``'s last call that ``host_checks="deferred"`` left for later:
    their errors (ranks that disagreed, a new image begun without ``reset``) raise here."""
    for model_runtime in model_runtimes(model):
        settle_checks(model_runtime)


def finish_compiles(model) -> int:
    """Wait until this rank's background compiles of ``model`` (``background_compile``) are done:
    their phases take over at the next trajectory, once every rank has waited. Returns how many
    phases were still compiling."""
    workers = [w for graph in runtimes(model) for t in graph.trajectories.values() for w in (t.background or {}).values()]
    return sum(not worker.done(block=True) for worker in workers)


def reset(model) -> int:
    """Start a new trajectory (warm-up again, no stale values reused) for every compiled graph of
    ``model``, once the checks of its last call are read (``settle``).

    Returns how many compiled graphs were reset.
    """
    settle(model)
    found = model_runtimes(model)
    for model_runtime in found:
        model_runtime.restart()
    return sum(len(m.graphs) for m in found)
