"""The plan cache: the per-rank programs on disk, beside Inductor's caches, so that a restarted
process loads them instead of planning again (capture, propagate, partition, displace: 16 to
21 s of SDXL's first call on an H100, loaded in 2.5 to 3.9 s; docs/PERFORMANCE.md).

An entry is this rank's ``RankPrograms`` for one graph at one input shape, pickled (the same
code-only copy that Inductor compiles, ``compile_workers.portable``). Its key is a hash of all
the programs are a function of:

- the Dynamo graph: its code and the values of the tensors it holds as constants (a graph that
  holds parameters, when Dynamo does not lift them to inputs, is not cached: its programs would
  hold the weights);
- every input's shape, strides, dtype, device and kind (weights are inputs: a model of the same
  architecture with other weights shares the entry, as in Inductor's caches);
- the options that change programs (``config.PROGRAM_OPTIONS``), the rank, the world size and the
  process group's name;
- torch's version and districompile's source.

An entry names the group its programs exchange over; under a batch split that is a group this
process creates, and an entry whose name differs (groups created in another order) is planned
again. Entries are recorded as torch cache artifacts, so ``torch.compiler.save_cache_artifacts``
(``districompile.warm.save``) ships them with Inductor's, and ``load_cache_artifacts`` puts them
back. Used with the Inductor lowering, off when Inductor's caches are
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``). Hits and misses are counted in
``torch._dynamo.utils.counters["districompile"]``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.compiler._cache import CacheArtifact, CacheArtifactFactory, CacheArtifactManager

from .backends.compile_workers import InputSpec
from .compiler import RankPrograms
from .config import DistriConfig

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "districompile_plan"
# A tensor constant of the Dynamo graph up to this size is hashed into the key; a larger one (or a
# parameter) is a weight the graph holds, and the graph is not cached.
MAX_CONSTANT_BYTES = 1 << 20


def enabled(config: DistriConfig) -> bool:
    from torch._inductor import config as inductor_config

    return config.lowering == "inductor" and not inductor_config.force_disable_caches


def key(dynamo_gm: fx.GraphModule, args: list, config: DistriConfig, rank: int, world: int, group_name: str) -> str | None:
    """The entry's key for ``dynamo_gm`` called with ``args`` on ``rank`` of ``world`` in the group
    named ``group_name``; None where the graph holds weights as constants."""
    digest = hashlib.sha256()
    for part in (
        torch.__version__, _source_digest(), [InputSpec.of(x) for x in args], config.program_options(), rank, world, group_name,
    ):
        digest.update(repr(part).encode())
    for module in dynamo_gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        digest.update(module.code.encode())
        for node in module.graph.find_nodes(op="get_attr"):
            value = _attribute(module, node.target)
            if isinstance(value, torch.Tensor):
                if isinstance(value, torch.nn.Parameter) or value.nbytes > MAX_CONSTANT_BYTES:
                    log.info("districompile: the plan cache is not used: the graph holds %s as a constant (a weight?)", node.target)
                    return None
                constant = value.detach().cpu().contiguous()
                digest.update(repr((node.target, constant.shape, constant.dtype)).encode())
                digest.update(constant.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def holds(entry_key: str) -> bool:
    """Whether there is an entry for ``entry_key`` (a miss is counted here)."""
    found = _path(entry_key).exists()
    if not found:
        counters["districompile"]["plan_cache_miss"] += 1
    return found


def load(entry_key: str, group: dist.ProcessGroup) -> RankPrograms | None:
    """The entry for ``entry_key``; None (a miss, counted) where it cannot be read, or its programs
    exchange over a group that is not this process's."""
    path = _path(entry_key)
    try:
        content = path.read_bytes()
        entry = pickle.loads(content)
    except Exception as error:  # an entry written by an incompatible version, or cut short
        log.warning("districompile: the plan cache entry %s is unreadable (%s: %s); planning again", path, type(error).__name__, error)
        entry = None
    if entry is not None and entry.group != _exchange_group(entry, group):
        log.info("districompile: the plan cache entry exchanges over group %s, this process's is another; planning again", entry.group)
        entry = None
    counters["districompile"]["plan_cache_hit" if entry is not None else "plan_cache_miss"] += 1
    if entry is not None:
        CacheArtifactManager.record_artifact(ARTIFACT_TYPE, entry_key, content)
    return entry


def store(entry_key: str, programs: RankPrograms) -> RankPrograms:
    """Write ``programs`` under ``entry_key``; returns the entry as a load would (code-only copies)."""
    content = pickle.dumps(programs)
    _write(entry_key, content)
    CacheArtifactManager.record_artifact(ARTIFACT_TYPE, entry_key, content)
    return pickle.loads(content)


@CacheArtifactFactory.register
class PlanCacheArtifact(CacheArtifact):
    """An entry in torch's portable cache artifacts."""

    def populate_cache(self) -> None:
        _write(self.key, self.content)

    @staticmethod
    def type() -> str:
        return ARTIFACT_TYPE


def _exchange_group(entry: RankPrograms, group: dist.ProcessGroup) -> str:
    """The name of the group this process's programs for ``entry`` exchange over."""
    if entry.layout is None:
        return group.group_name
    from .batch_split import batch_split

    return batch_split(entry.layout, group).patch_group.group_name


def directory() -> Path:
    """Where the entries are: beside Inductor's caches (``TORCHINDUCTOR_CACHE_DIR``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "districompile_plans"


def _path(entry_key: str) -> Path:
    return directory() / f"{entry_key}.pkl"


def _write(entry_key: str, content: bytes):
    """Atomically: the ranks of a machine share the directory, and a reader never sees half an entry."""
    path = _path(entry_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    os.replace(temporary, path)


def _attribute(module: torch.nn.Module, target: str):
    for name in target.split("."):
        module = getattr(module, name)
    return module


@functools.cache
def _source_digest() -> str:
    """districompile's Python source: a change to a pass or a rule makes other programs."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
