"""One runtime per compiled graph: its process group, per-shape programs and call count."""

from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist
import torch.fx as fx

from .backends.lowering import lower
from .compiler import plan
from .config import DistriConfig
from .errors import DistriCompileError
from .passes.annotate import spatial_inputs

log = logging.getLogger(__name__)
torch._logging._internal.register_artifact("distri_graph", "the per-rank program districompile writes", off_by_default=True)
graph_log = torch._logging.getArtifactLogger(__name__, "distri_graph")

_LIVE: "weakref.WeakSet[DistriRuntime]" = weakref.WeakSet()


def _shape_key(args) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args
    )


class DistriRuntime:
    """Compiles the Dynamo graph into a per-rank program for each input shape and runs it."""

    def __init__(self, dynamo_gm: fx.GraphModule, example_inputs: list, config: DistriConfig):
        self.dynamo_gm = dynamo_gm
        self.config = config
        self.spatial = spatial_inputs(dynamo_gm, example_inputs, config.spatial_inputs)
        self.parameter_ids = {id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter)}
        self.programs: dict[tuple, object] = {}
        self.calls = 0
        _LIVE.add(self)

    def group(self):
        if not dist.is_initialized():
            raise DistriCompileError(
                "backend='distri' needs torch.distributed: call dist.init_process_group() on every rank "
                "(torchrun sets the rank and world size); districompile.explain() needs none"
            )
        return self.config.group or dist.group.WORLD

    def compile(self, args) -> object:
        group = self.group()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        model_plan = plan(self.dynamo_gm, list(args), self.spatial, world, self.config.exchanges)
        program = model_plan.program(rank, group.group_name)
        graph_log.debug("districompile rank %d/%d program:\n%s", rank, world, program.print_readable(print_output=False))
        log.info("districompile: rows split %s over %d ranks", list(model_plan.split.bounds), world)
        return lower(program, list(args), self.config)

    def __call__(self, *args):
        key = _shape_key(args)
        if key not in self.programs:
            self.programs[key] = self.compile(args)
        self.calls += 1
        return self.programs[key](*args)
