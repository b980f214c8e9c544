"""User options of the ``distri`` backend."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

SYNC_MODES = ("corrected_async_gn", "stale_gn", "separate_gn", "full_sync", "no_sync")
PARALLELISMS = ("patch", "naive_patch")
LOWERINGS = ("inductor", "eager")
HOST_CHECKS = ("per_call", "deferred")


@dataclass(frozen=True)
class DistriConfig:
    """Options, also accepted as ``torch.compile(..., options={...})``; names follow distrifuser."""

    sync_mode: str = "corrected_async_gn"
    parallelism: str = "patch"
    warmup_steps: int = 4
    split_batch: bool = True
    lowering: str = "inductor"
    cuda_graphs: bool | None = None  # None: on for CUDA inputs
    group: object = None  # a ProcessGroup; None: the default (WORLD) group
    spatial_inputs: tuple[str, ...] | None = None  # input names to split; None: 4-d float inputs
    # Packed-token inputs (..., rows * cols, C) to split by whole rows of their image grid, by name:
    # {"hidden_states": (rows, cols), "img_ids": (rows, cols)} for Flux. Given as a dict, kept as
    # sorted (name, grid) pairs: the config is hashable (a model keeps a runtime per config).
    token_grids: tuple[tuple[str, tuple[int, int]], ...] | None = None
    # Keep the exchange ops on a single rank (1-rank collectives): to test or time them on one device.
    single_rank_exchanges: bool = False
    # Compare a fingerprint of every rank's inputs and trajectory state before each call's exchanges.
    check_ranks: bool = True
    # When the host reads each call's check (agreement, timestep, sample motion): "per_call" waits for
    # it before the call runs; "deferred" reads it at the next call (no host sync in the hot path; a
    # new image must then begin with reset(model), as parallelize does).
    host_checks: str = "per_call"
    # Seconds a collective may wait for the other ranks (a dead or failed rank); None: the group's own.
    timeout: float | None = 600.0
    # Compile a shape's other units (the steady phase, the phases' other pieces) in worker processes
    # while this one compiles the first (Inductor only; ``backends/compile_workers.py``). None: where
    # a unit has 1,000 nodes or more.
    compile_workers: bool | None = None
    # Cut each phase's program into this many pieces for Inductor, compiled by as many processes at
    # once (with compile_workers) and run one after another (``passes/pieces.py``). None: one piece
    # per 2,500 nodes (SDXL: 4); 1: whole.
    compile_pieces: int | None = None
    # Run the first images with the eager lowering (ATen kernels, CUDA graphs) while worker processes
    # compile every phase through Inductor; the Inductor phases take over at the first trajectory
    # that begins once every rank's workers are done (``finish_compiles`` waits for them).
    background_compile: bool = False
    # Print each compile stage and its seconds on rank 0 (stderr): the first call of an SDXL takes minutes.
    progress: bool = True

    def __post_init__(self):
        choices = {"sync_mode": SYNC_MODES, "parallelism": PARALLELISMS, "lowering": LOWERINGS, "host_checks": HOST_CHECKS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"districompile: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"districompile: timeout must be > 0 seconds or None, got {self.timeout}")
        if self.background_compile and self.lowering != "inductor":
            raise ValueError(
                f"districompile: background_compile compiles the phases through Inductor while the eager lowering runs "
                f"them; it needs lowering='inductor', got {self.lowering!r}"
            )
        if self.compile_pieces is not None and (not isinstance(self.compile_pieces, int) or self.compile_pieces < 1):
            raise ValueError(f"districompile: compile_pieces must be an int >= 1 or None (by the program's size), got {self.compile_pieces!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"districompile: warmup_steps must be >= 0, got {self.warmup_steps}")
        if isinstance(self.spatial_inputs, str):
            object.__setattr__(self, "spatial_inputs", (self.spatial_inputs,))
        if self.token_grids is not None:
            object.__setattr__(self, "token_grids", _token_grid_pairs(self.token_grids))

    @property
    def grids(self) -> dict[str, tuple[int, int]]:
        """``token_grids`` as a dict (empty where none is given)."""
        return dict(self.token_grids or ())

    @property
    def exchanges(self) -> bool:
        """False for the seam baseline: each rank runs its patch alone."""
        return self.parallelism == "patch"

    @property
    def displaced(self) -> bool:
        """Two phases: synchronous warm-up calls, then steady ones that read the previous call's exchanges."""
        return self.sync_mode != "full_sync" and self.exchanges

    def program_options(self) -> tuple:
        """The options the per-rank programs depend on (``PROGRAM_OPTIONS``): part of the plan cache's key."""
        return tuple((name, getattr(self, name)) for name in PROGRAM_OPTIONS)

    @classmethod
    def from_options(cls, options=None, **overrides) -> DistriConfig:
        if isinstance(options, DistriConfig):
            return replace(options, **overrides)
        options = {**(options or {}), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"districompile: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


# What each option changes. A new option must be listed in one (tests/test_plan_cache.py checks),
# so that no option that changes the programs is left out of the plan cache's key.
PROGRAM_OPTIONS = (
    "sync_mode", "parallelism", "split_batch", "spatial_inputs", "token_grids", "single_rank_exchanges", "compile_pieces",
)
RUN_OPTIONS = (  # how the programs are lowered, run and checked; ``group`` enters the key by its name, rank and size
    "warmup_steps", "lowering", "cuda_graphs", "group", "check_ranks", "host_checks", "timeout", "compile_workers",
    "background_compile", "progress",
)


def _token_grid_pairs(token_grids) -> tuple[tuple[str, tuple[int, int]], ...]:
    """Sorted ``(name, (rows, cols))`` pairs, from a dict or from pairs (a config made by ``replace``)."""
    pairs = token_grids.items() if isinstance(token_grids, dict) else token_grids
    try:
        pairs = tuple(sorted((name, tuple(grid)) for name, grid in pairs))
        valid = all(isinstance(name, str) and _is_grid(grid) for name, grid in pairs)
    except (TypeError, ValueError):  # not pairs of a name and a grid
        valid = False
    if not valid:
        raise ValueError(
            f"districompile: token_grids={token_grids!r}; give each packed-token input's grid of image rows and "
            "columns by its name, e.g. token_grids={'hidden_states': (64, 64), 'img_ids': (64, 64)}"
        )
    return pairs


def _is_grid(grid: tuple) -> bool:
    return len(grid) == 2 and all(isinstance(n, int) and n > 0 for n in grid)
