"""``explain``: the exchange plan of a model at a given input and world size, with no process group."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from .batch_split import plan_batch_split
from .compiler import Plan, plan
from .config import DistriConfig
from .errors import DistriCompileError
from .passes.annotate import packed_tokens_error, spatial_inputs, token_sequences
from .passes.propagate import Fallback
from .rules import Exchange


class _Captured(Exception):
    pass


@dataclass
class ExplainReport:
    world_size: int
    row_bounds: tuple[int, ...]
    exchanges: list[Exchange]
    fallbacks: list[Fallback]
    plan: Plan
    example_inputs: list  # the graph's inputs (parameters included), for running plan programs
    # The batch split applies: the plan (world_size ranks, inputs) is one half's, the other half runs the same.
    batch_split: bool = False
    # Under a batch split: each batched output's all-gather over the pairs of ranks, over all ranks.
    batch_gathers: list[Exchange] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """What all ranks receive per call: under a batch split, both halves' exchanges (``exchanges``
        are one half's) and the pairs' output gathers."""
        halves = 2 if self.batch_split else 1
        return halves * sum(e.bytes_per_call for e in self.exchanges) + sum(g.bytes_per_call for g in self.batch_gathers)

    def count(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.exchanges)

    def families(self) -> dict[tuple[str, str], dict[str, list[Exchange]]]:
        """The exchanges by family (kind, module type: halos of Conv2d, K/V of Attention, statistics of
        GroupNorm), then by where in the model (the module path with its indices as ``*``)."""
        families: dict[tuple[str, str], dict[str, list[Exchange]]] = {}
        for e in self.exchanges:
            if e.kind != "slice":
                where = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", e.module) or "(model)"
                families.setdefault((e.kind, e.module_type or "-"), {}).setdefault(where, []).append(e)
        return families

    def format(self, sites: bool = False) -> str:
        """The summary (per kind, per module family, fallbacks); with ``sites``, one row per exchange site too."""
        ranks = f"each half of the batch on {self.world_size} ranks (batch split)" if self.batch_split else f"{self.world_size} ranks"
        lines = [f"districompile plan: {ranks}, rows per rank split at {list(self.row_bounds)}"]
        kinds = sorted({e.kind for e in self.exchanges})
        lines.append("per kind: " + ", ".join(f"{k} x{self.count(k)}" for k in kinds))
        total = f"total exchanged per call (all ranks): {self.total_bytes:,} bytes ({self.total_bytes / 2**20:.2f} MiB)"
        if self.batch_split:
            gathered = sum(g.bytes_per_call for g in self.batch_gathers)
            total += f", both halves, of which the pairs' output gathers {gathered:,} bytes; the rows below are one half's"
        lines.append(total)
        rows = [("family", "where", "sites", "bytes/call")]
        for (kind, module_type), places in sorted(self.families().items()):
            for i, (where, exchanges) in enumerate(places.items()):
                family = f"{kind} in {module_type}" if i == 0 else ""
                rows.append((family, where, str(len(exchanges)), f"{sum(e.bytes_per_call for e in exchanges):,}"))
        lines.append("per module family:")
        lines += _table(rows, indent="  ")
        if self.fallbacks:
            lines.append(f"fallback gathers ({len(self.fallbacks)}): ops with no sharding rule run on whole tensors")
            lines += [f"  {f}: {f.reason}" for f in self.fallbacks]
        else:
            lines.append("fallback gathers: none")
        if sites:
            rows = [("module", "node", "kind", "detail", "bytes/call", "source")]
            rows += [
                (e.module or "(model)", e.node, e.kind, e.detail, f"{e.bytes_per_call:,}", e.source)
                for e in self.exchanges if e.kind != "slice"
            ]
            lines.append("exchange sites:")
            lines += _table(rows, indent="  ")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _batch_gathers(batch_plan, world_size: int) -> list[Exchange]:
    """The all-gather of each batched output over the pairs (``BatchSplit.gather_outputs``): every
    rank receives the other half of the output."""
    (output,) = batch_plan.aten_gm.graph.find_nodes(op="output")
    leaves = pytree.tree_leaves(output.args[0])
    gathers = []
    for i in batch_plan.layout.batched_outputs:
        value = leaves[i].meta["val"]
        detail = f"output {i} {list(value.shape)}: each rank receives the other half of the batch"
        gathers.append(Exchange(leaves[i].name, "batch_gather", detail, world_size * value.numel() * value.element_size() // 2))
    return gathers


def _table(rows: list[tuple[str, ...]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return lines


def dynamo_graph(model, args, kwargs, config: DistriConfig) -> tuple:
    """Dynamo's graph of ``model(*args, **kwargs)``, its inputs (parameters included) and its spatial
    inputs' positions, as the backend would receive them; the model itself does not run."""
    captured = {}

    def capture_backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        # Input names are Dynamo's to give, during this call only; an unknown name is raised below.
        try:
            captured["spatial"] = spatial_inputs(gm, captured["inputs"], config.spatial_inputs, config.grids)
            tokens = token_sequences(gm, captured["inputs"])
            if not captured["spatial"] and tokens:  # a transformer's packed latent (Flux)
                raise packed_tokens_error(tokens, named=False)
        except DistriCompileError as error:
            captured["error"] = error

        def stop(*_):
            raise _Captured

        return stop

    compiled = torch.compile(model, backend=capture_backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except _Captured:
        pass
    if "error" in captured:
        raise captured["error"]
    return captured["gm"], captured["inputs"], captured["spatial"]


def explain(model, *args, world_size: int, verbose: bool = True, sites: bool = False, **options) -> ExplainReport:
    """Plan ``model(*args, **kwargs)`` for ``world_size`` ranks and print the plan (``verbose``):
    exchanges per kind and per module family, and fallbacks, by the model's module paths; with
    ``sites``, also one row per exchange site (module, ATen node, kind, detail, bytes, source line).

    Keyword arguments that are backend options (``sync_mode``...) configure the plan; the rest
    are passed to the model. Nothing is computed: shapes are traced with fake tensors. Where
    the batch split applies (``report.batch_split``), the plan is one half's: half the batch on
    half the ranks.
    """
    option_names = set(DistriConfig.__dataclass_fields__)
    config = DistriConfig.from_options({k: v for k, v in options.items() if k in option_names})
    kwargs = {k: v for k, v in options.items() if k not in option_names}
    gm, inputs, spatial = dynamo_graph(model, args, kwargs, config)
    batch_plan = plan_batch_split(gm, inputs, spatial, world_size, config)
    batch_gathers = []
    if batch_plan is not None:  # plan what one half of the ranks runs
        batch_gathers = _batch_gathers(batch_plan, world_size)
        gm, inputs, world_size = batch_plan.program(0), batch_plan.layout.half_inputs(inputs, 0), world_size // 2
    model_plan = plan(gm, inputs, spatial, world_size, config.exchanges, config.single_rank_exchanges)
    prop = model_plan.propagation
    report = ExplainReport(
        world_size, model_plan.split.bounds, prop.exchanges, prop.fallbacks, model_plan, inputs, batch_plan is not None,
        batch_gathers,
    )
    if verbose:
        print(report.format(sites))
    return report
