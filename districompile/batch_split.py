"""CFG batch split: the two halves of a batch (unconditional, conditional) on the two halves of the ranks.

With ``split_batch``, an even world W and an even batch, ranks [0, W/2) run the first half of
the batch and ranks [W/2, W) the second half, each half patch-parallel over its own W/2 ranks
(its patch group). Rank r and rank r + W/2 form a pair that all-gathers the batched outputs
after each call, so every rank returns the whole batch, as without the split.

Dynamo's graph has the batch size baked into its shape constants (``view(2, -1, 8, 40)``), so
the graph of a half is derived like a per-rank program: dim 0 of the batched inputs is sharded
in two, the sharding rules carry it through every op (convolutions, norms and attention compute
each sample alone), and the partitioner writes one half's graph with its shape constants made
local. Where an op would mix the halves (it has no rule, or its rule exchanges data), the batch
is not split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from . import rules  # noqa: F401  (registers the sharding rules)
from .collectives import gather_rows
from .config import DistriConfig
from .passes.annotate import has_batch, is_model_state
from .passes.capture import capture
from .passes.partition import partition
from .passes.propagate import Propagation, propagate
from .sharding import RowSplit, Shard

log = logging.getLogger(__name__)

# Kinds of propagation entries that move no data between the halves.
_LOCAL_KINDS = ("slice", "output_gather")

# Parent group name -> this rank's (half, patch group, pair group). Creating a group is a
# collective of the whole job, so each parent's groups are created once and shared.
_GROUPS: dict[str, tuple[int, dist.ProcessGroup, dist.ProcessGroup]] = {}


@dataclass(frozen=True)
class BatchLayout:
    """Where the batch lies in a graph's inputs and outputs: all a call needs to slice its inputs
    and gather its outputs (kept in the plan cache with the programs)."""

    batch: int
    sliced_inputs: tuple[int, ...]  # positions of the inputs that carry the batch along dim 0
    # Position among the flattened outputs -> (where the batch lies, whole shape), for outputs that carry it.
    batched_outputs: dict[int, tuple[Shard, list[int]]]

    def half_inputs(self, args, half: int) -> list:
        size = self.batch // 2
        return [x[half * size : (half + 1) * size] if i in self.sliced_inputs else x for i, x in enumerate(args)]


@dataclass
class BatchPlan:
    """A graph's batch split at one input shape, for either half; needs no process group (``explain``)."""

    layout: BatchLayout
    aten_gm: fx.GraphModule  # the whole batch's graph
    propagation: Propagation  # where the batch lies in every node

    def program(self, half: int) -> fx.GraphModule:
        """The graph of one half: it takes that half of each sliced input, returns that half of each batched output."""
        return partition(self.aten_gm, self.propagation, half, 2, "", whole_io=False)


def plan_batch_split(dynamo_gm: fx.GraphModule, args, spatial: list[int], world: int, config: DistriConfig) -> BatchPlan | None:
    """The batch split of a call with ``args`` on ``world`` ranks, or None (the reason logged) where none applies."""
    if not config.split_batch:
        return None
    batches = sorted({args[i].shape[0] for i in spatial if has_batch(args[i])})
    if world % 2:
        return _unsplit(f"world size {world} is odd")
    if len(batches) != 1:
        return _unsplit(f"the spatial inputs have different batch sizes {batches}")
    batch = batches[0]
    if batch % 2 or batch < 2:
        return _unsplit(f"a batch of {batch} does not halve")

    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    sliced = tuple(
        i for i, (node, x) in enumerate(zip(placeholders, args))
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch and not is_model_state(node, x)
    )
    aten_gm = capture(dynamo_gm, list(args))
    aten_placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    halves = Shard(0, RowSplit((0, batch // 2, batch)))
    propagation = propagate(aten_gm, {aten_placeholders[i]: halves for i in sliced}, world=2)
    mixing = [f"{f.node} ({f.op}, {f.reason})" for f in propagation.fallbacks]
    mixing += [f"{e.node} ({e.kind})" for e in propagation.exchanges if e.kind not in _LOCAL_KINDS]
    if mixing:
        return _unsplit(f"{mixing[0]} would mix the samples of the two halves")
    (output,) = [n for n in aten_gm.graph.nodes if n.op == "output"]
    batched_outputs = {
        i: (propagation.specs[node], list(node.meta["val"].shape))
        for i, node in enumerate(pytree.tree_leaves(output.args[0]))
        if isinstance(propagation.specs.get(node), Shard)
    }
    return BatchPlan(BatchLayout(batch, sliced, batched_outputs), aten_gm, propagation)


def _unsplit(reason: str) -> None:
    log.info("districompile: split_batch: the batch is not split: %s", reason)
    return None


@dataclass(frozen=True)
class BatchSplit:
    """This rank's part of a batch split: its half and its groups."""

    half: int  # 0: the first half of the batch, 1: the second
    patch_group: dist.ProcessGroup  # the ranks of this half
    pair_group: dist.ProcessGroup  # this rank and its counterpart in the other half
    layout: BatchLayout

    def slice_inputs(self, args) -> list:
        return self.layout.half_inputs(args, self.half)

    def gather_outputs(self, outputs):
        """Every batched output made whole again: the two halves' parts, all-gathered over the pair."""
        leaves, tree = pytree.tree_flatten(outputs)
        for i, (spec, shape) in self.layout.batched_outputs.items():
            # A parent's ranks ascend with the global ranks (new_group sorts them): in the pair, half h is rank h.
            canonical = leaves[i].reshape(spec.canonical_shape(shape, spec.split.rows(self.half)))
            leaves[i] = gather_rows(canonical, list(spec.split.bounds), self.half, self.pair_group.group_name, []).reshape(shape)
        return pytree.tree_unflatten(leaves, tree)


def batch_split(layout: BatchLayout, group: dist.ProcessGroup) -> BatchSplit:
    """This rank's part of the split of ``layout``'s batch over ``group`` (the groups are created
    once per parent: a collective of its ranks)."""
    half, patch_group, pair_group = _split_groups(group)
    return BatchSplit(half, patch_group, pair_group, layout)


def _split_groups(parent: dist.ProcessGroup) -> tuple[int, dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's half, its patch group (the ranks of its half) and its pair group (it and its counterpart)."""
    if parent.group_name not in _GROUPS:
        world = dist.get_world_size(parent)
        size = world // 2
        ranks = [dist.get_global_rank(parent, r) for r in range(world)]
        # Every rank of the parent creates every group, in the same order, and keeps its own.
        # A parent smaller than the job synchronizes only its ranks: the others are not here.
        local = world < dist.get_world_size()
        halves = [dist.new_group(ranks[h * size : (h + 1) * size], use_local_synchronization=local) for h in range(2)]
        pairs = [dist.new_group([ranks[r], ranks[r + size]], use_local_synchronization=local) for r in range(size)]
        rank = dist.get_rank(parent)
        _GROUPS[parent.group_name] = (rank // size, halves[rank // size], pairs[rank % size])
    return _GROUPS[parent.group_name]
