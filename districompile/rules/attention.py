"""Attention: scaled_dot_product_attention, and attention written as matmuls and softmax.

Queries stay sharded by rows; self-attention keys and values built from sharded tokens are
gathered from all ranks (``kv_gather``); cross-attention K/V from replicated text need nothing.
Joint attention (queries, keys and values each a joint sequence: image rows with the text as a
replicated flank) is the same case: every rank computes its image rows' outputs and, identically,
the text's; only the image rows of K/V are gathered.
"""

from __future__ import annotations

import torch

from ..errors import DistriCompileError
from ..sharding import Replicate, Shard
from .registry import Decision, register, sharded_along_batch

aten = torch.ops.aten

_SDPA = [
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_attention_math.default,
]


def _argument(node, name: str, default=None):
    """The value of the schema argument ``name`` of an ATen call, positional or keyword."""
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if not argument.kwarg_only and position < len(node.args):
                return node.args[position]
            return node.kwargs.get(name, default)
    return default


def _key_mask_spec(ctx, k_spec, mask):
    """The sharding an attention mask (.., queries, keys) needs to line up with keys sharded as ``k_spec``."""
    if isinstance(k_spec, Shard) and ctx.shape(mask)[-1] > 1:
        return k_spec.with_dim(len(ctx.shape(mask)) - 1)
    return Replicate()


@register(*_SDPA, flanks=True)
def sdpa(ctx, node):
    q, k, v = node.args[:3]
    q_spec = ctx.spec(q)
    masks = [n for n in node.all_input_nodes if n not in (q, k, v)]
    if any(isinstance(ctx.spec(t), Shard) and ctx.spec(t).flanked and ctx.spec(t).dim != len(ctx.shape(t)) - 2 for t in (q, k, v)):
        return None  # flanks along the batch or head dims: no joint sequence
    if sharded_along_batch(q_spec, len(ctx.shape(q)) - 2):
        # Batch and head dims pair each query with its own keys: K, V and masks split alike (or broadcast).
        same = ctx.shape(q)[q_spec.dim]
        require = {t: q_spec if ctx.shape(t)[q_spec.dim] == same else Replicate() for t in (q, k, v, *masks)}
        return Decision(_sdpa_out(node, q_spec), require)
    if not isinstance(q_spec, (Shard, Replicate)) or (isinstance(q_spec, Shard) and q_spec.dim != len(ctx.shape(q)) - 2):
        return None
    if isinstance(q_spec, Shard) and _argument(node, "is_causal", False):
        return None  # the causal mask ties each query to its global position, not its local one
    if isinstance(q_spec, Shard) and any(len(ctx.shape(m)) > 1 and ctx.shape(m)[-2] > 1 for m in masks):
        return None  # a mask per query row would have to be split like the queries
    require = {q: q_spec}
    if ctx.exchange:
        require.update({k: Replicate(), v: Replicate()})
    else:  # naive patches attend within their own patch
        require.update({k: ctx.spec(k), v: ctx.spec(v)})
    # A mask over the keys must cover the same keys as K: all of them, or (naive) the patch's.
    require.update({m: _key_mask_spec(ctx, require[k], m) for m in masks})
    return Decision(_sdpa_out(node, q_spec), require, gather_kind="kv_gather")


def _sdpa_out(node, q_spec):
    val = node.meta["val"]
    if not isinstance(val, (list, tuple)):
        return q_spec
    # Output 0 is laid out as the queries; the log-sum-exp (N, heads, L) too. The rest are scalars.
    lse = q_spec if isinstance(q_spec, Replicate) else q_spec.with_dim(q_spec.dim)
    return (q_spec, lse) + tuple(Replicate() if isinstance(t, torch.Tensor) else None for t in val[2:])


@register(aten._softmax, aten._safe_softmax, aten._log_softmax, aten.softmax.int, flanks=True)
def softmax(ctx, node):
    spec = ctx.spec(node.args[0])
    dim = node.args[1] % len(ctx.shape(node.args[0]))
    if dim == spec.dim:
        return None
    return Decision(spec)


def _matmul(ctx, node, a, b, batch: int):
    """``a @ b`` with ``batch`` leading batch dims: (.., M, K) @ (.., K, N)."""
    sa, sb = ctx.spec(a), ctx.spec(b)
    a_rows, a_contracted, b_contracted, b_cols = batch, batch + 1, batch, batch + 1
    if any(isinstance(s, Shard) and s.flanked and s.dim != kept for s, kept in ((sa, a_rows), (sb, b_cols))):
        return None  # flanks along the contracted or batch dims: a partial sum would count them once per rank
    if isinstance(sa, Shard) and sa.dim == a_rows:
        if not ctx.exchange and ctx.world > 1 and isinstance(sb, Shard) and sb.dim == b_cols:
            # Scores of a patch's queries against its own keys: split along both dims, which a sharding cannot say.
            raise DistriCompileError(
                f"{node.name} ({node.target}): parallelism='naive_patch' cannot run attention written as "
                "matmuls over keys split by rows; write it with F.scaled_dot_product_attention, or use "
                "parallelism='patch'"
            )
        # Rows of the result follow a's rows; b must be whole (keys/values of all ranks).
        keep_b = sb if (not ctx.exchange and isinstance(sb, Shard)) else Replicate()
        return Decision(sa, {a: sa, b: keep_b}, gather_kind="kv_gather")
    if isinstance(sb, Shard) and sb.dim == b_cols and (not isinstance(sa, Shard) or sa.dim == a_contracted):
        # Columns of the result follow b's (queries as columns: guided-diffusion's "bts,bcs->bct");
        # a, contracted over all keys, must be whole (its values of all ranks).
        keep_a = sa if (not ctx.exchange and isinstance(sa, Shard)) else Replicate()
        return Decision(sb, {a: keep_a, b: sb}, gather_kind="kv_gather")
    if batch and isinstance(sa, Shard) and sa.dim < batch:
        return Decision(sa, {a: sa, b: sa.with_dim(sa.dim) if len(ctx.shape(b)) == len(ctx.shape(a)) else Replicate()})
    if isinstance(sa, Shard) and sa.dim == a_contracted and isinstance(sb, Shard) and sb.dim == b_contracted and sa.with_dim(0) == sb.with_dim(0):
        return "partial"
    return None


def _partial_sum(node):
    """Both operands sharded along the contracted rows: local products summed over ranks."""
    from .reduction import all_reduce_exchange

    def emit(em, node, args, kwargs):
        return em.all_reduce(em.call(node.target, *args, **kwargs), "sum")

    return Decision(Replicate(), emit=emit, exchanges=[all_reduce_exchange(node)])


@register(aten.mm, aten.bmm, flanks=True)
def matmul(ctx, node):
    a, b = node.args
    decision = _matmul(ctx, node, a, b, batch=0 if node.target.overloadpacket == aten.mm else 1)
    return _partial_sum(node) if decision == "partial" else decision


@register(aten.addmm, aten.baddbmm, flanks=True)
def add_matmul(ctx, node):
    bias, a, b = node.args[:3]
    decision = _matmul(ctx, node, a, b, batch=0 if node.target.overloadpacket == aten.addmm else 1)
    if decision is None or decision == "partial":
        return None
    out = decision.out
    out_ndim = len(ctx.shape(node))
    dim = out.dim - (out_ndim - len(ctx.shape(bias)))
    broadcast = dim < 0 or ctx.shape(bias)[dim] == 1
    decision.require[bias] = Replicate() if broadcast else out.with_dim(dim)
    return decision
