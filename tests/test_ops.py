"""Numerical multi-rank tests: one small module per op family, compiled with ``backend="distri"``.

Every rank passes the full input and must get the full output, equal (relative error below
``TOLERANCE``) to the single-process eager output. Spawning ranks costs seconds, so each world
size runs ONE spawn that loops over all its cases; a module-scoped fixture collects the results
and the tests report them per case.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from dist import run_ranks
from torch import nn

from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from districompile.metrics import relative_error
from districompile.passes.propagate import propagate
from districompile.sharding import RowSplit, Shard

TOLERANCE = 1e-4
# Batches of 2 at even worlds would be split between two halves of the ranks (split_batch):
# these tests are about the exchanges of one image across all of them.
OPTIONS = {"sync_mode": "full_sync", "lowering": "eager", "split_batch": False}

# Input shape per world size: (batch, height, width), non-square. The heights split unevenly:
# 18 rows at world 2 are 10 + 8 in blocks of 2 (for a stride-2 case), 20 rows at world 3 are
# 7 + 7 + 6 (or 8 + 6 + 6 in blocks of 2): an edge rank and an interior one, uneven.
SHAPES = {2: (2, 18, 12), 3: (1, 20, 14)}
CHANNELS = 4


# ----------------------------------------------------------------------------- case modules


class Fn(nn.Module):
    """A parameter-free function as a module: ``fn(x, *args, **kwargs)``."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)


class ToTokens(nn.Module):
    """Runs ``body`` on (B, H*W, C) tokens and returns the result as an image again."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        b, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        out = self.body(tokens)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class SdpaSelfAttention(nn.Module):
    def __init__(self, channels, heads=2):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = (
            t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.to_qkv(tokens).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(b, n, c))


class MatmulSelfAttention(nn.Module):
    """Attention written out: ``softmax(q @ k^T * scale) @ v`` over heads (4-d matmul)."""

    def __init__(self, channels, heads=2):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * channels)

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = (
            t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
            for t in self.to_qkv(tokens).chunk(3, dim=-1)
        )
        scores = (q @ k.transpose(-1, -2)) * (c // self.heads) ** -0.5
        out = scores.softmax(dim=-1) @ v
        return out.permute(0, 2, 1, 3).reshape(b, n, c)


class BmmSelfAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))

    def forward(self, tokens):
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        return torch.bmm(torch.softmax(scores, dim=-1), v)


class EinsumSelfAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.to_qkv = nn.Linear(channels, 3 * channels)

    def forward(self, tokens):
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        scores = torch.einsum("bnc,bmc->bnm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bnm,bmc->bnc", scores.softmax(dim=-1), v)


class CrossAttention(nn.Module):
    """Image tokens attend to a replicated context (B, T, context_dim), via SDPA or bmm."""

    def __init__(self, channels, context_dim=6, use_sdpa=True):
        super().__init__()
        self.use_sdpa = use_sdpa
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        q = self.to_q(x.flatten(2).transpose(1, 2))
        k, v = self.to_kv(context).chunk(2, dim=-1)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(c)
            out = torch.bmm(scores.softmax(dim=-1), v)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class JointAttention(nn.Module):
    """Joint attention with the text first (Flux's order; SD3 puts it last): one sequence of the text's
    tokens and the image's, a linear layer over all of it, then split back into the two parts."""

    def __init__(self, channels, context_dim=6, heads=2):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.add_qkv = nn.Linear(context_dim, 3 * channels)
        self.mix = nn.Linear(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        image = self.to_qkv(x.flatten(2).transpose(1, 2)).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        text = self.add_qkv(context).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (torch.cat([t, i], dim=2) for t, i in zip(text, image))
        out = self.mix(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c))
        text_out, image_out = out.split([context.shape[1], h * w], dim=1)
        return x + image_out.transpose(1, 2).reshape(b, c, h, w) * text_out.mean(dim=1)[:, :, None, None]


class KeyMaskedAttention(nn.Module):
    """SDPA with a key mask computed from the image (B, 1, 1, H*W): the mask is sharded like the keys.

    Queries are the image tokens, or (``learned_queries``) a replicated parameter pooling the image.
    """

    def __init__(self, channels, heads=2, learned_queries=False):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(channels, 3 * 4 * channels)
        self.queries = nn.Parameter(torch.randn(1, heads, 3, 2 * channels)) if learned_queries else None

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (
            t.reshape(b, h * w, self.heads, -1).transpose(1, 2)
            for t in self.to_qkv(x.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        )
        mask = (x.mean(dim=1) > -0.3).flatten(1)[:, None, None, :]
        if self.queries is not None:
            return x + F.scaled_dot_product_attention(self.queries.expand(b, -1, -1, -1), k, v, attn_mask=mask).mean()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, h * w, -1)[..., :c].transpose(1, 2).reshape(b, c, h, w)


class GroupNormAfterConv(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, 8, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as in the original Stable Diffusion code."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class LayerNormOnTokens(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class InterpolateSize(nn.Module):
    """Upsampling to an explicit ``size=`` computed from the input shape."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return F.interpolate(x, size=(2 * x.shape[2], 3 * x.shape[3]), mode=self.mode)


class SpatialMean(nn.Module):
    def __init__(self, keepdim):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x):
        mean = x.mean(dim=(2, 3), keepdim=self.keepdim)
        if not self.keepdim:
            mean = mean[:, :, None, None]
        return x - mean


class SpatialSum(nn.Module):
    def __init__(self, keepdim):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x):
        return x.sum(dim=(2, 3), keepdim=self.keepdim)


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * self.fc(self.pool(x)).sigmoid()


class RowIndexEncoding(nn.Module):
    """Adds a value that depends on the absolute row: an ``arange`` over H taken from ``x.shape``."""

    def forward(self, x):
        rows = torch.arange(x.shape[2], dtype=x.dtype, device=x.device)
        return x + torch.sin(rows / 3.0)[:, None] + 0.01 * rows[:, None]


class LearnedPosition(nn.Module):
    """Adds a learned full-size (1, C, H, W) positional map to the activations."""

    def __init__(self, channels, height, width):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, channels, height, width))

    def forward(self, x):
        return self.conv(x + self.pos)


class ChunkCat(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        c, d = x.split([3, x.shape[3] - 3], dim=3)
        return torch.cat([b * 2, a], dim=1) + torch.cat([d, c], dim=3)


class PermuteLinear(nn.Module):
    """Channels-last linear layer: permute to (B, H, W, C), project, permute back."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * channels)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TokensRoundTrip(nn.Module):
    """Flatten to tokens with ``view``, a pointwise op on tokens, then ``view`` back to an image."""

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).transpose(1, 2).contiguous()
        tokens = tokens * torch.arange(c, dtype=x.dtype) + 1
        return tokens.transpose(1, 2).contiguous().view(b, c, h, w)


# ----------------------------------------------------------------------------- cases


def _conv(*args, **kwargs):
    return lambda h, w: nn.Conv2d(CHANNELS, *args, **kwargs)


def _fn(fn, *args, **kwargs):
    return lambda h, w: Fn(fn, *args, **kwargs)


def _tokens(body):
    return lambda h, w: ToTokens(body(CHANNELS))


# Each case builds a module from the input (height, width); ``context`` cases also take text.
CASES = {
    "conv_k1": _conv(6, 1),
    "conv_k3_pad0": _conv(6, 3),
    "conv_k3_pad1": _conv(6, 3, padding=1),
    "conv_k5_pad2": _conv(6, 5, padding=2),
    "conv_k5_pad1": _conv(6, 5, padding=1),
    "conv_k3_stride2_pad1": _conv(6, 3, stride=2, padding=1),
    "conv_k1_stride2": _conv(6, 1, stride=2),
    "conv_k2_stride2": _conv(6, 2, stride=2),
    "conv_k5_stride2_pad2": _conv(6, 5, stride=2, padding=2),
    "conv_k3_dilation2_pad2": _conv(6, 3, padding=2, dilation=2),
    "conv_k3_groups2": _conv(6, 3, padding=1, groups=2),
    "conv_k3_depthwise": _conv(CHANNELS, 3, padding=1, groups=CHANNELS),
    "conv_k3_reflect": _conv(6, 3, padding=1, padding_mode="reflect"),
    "conv_k5_reflect": _conv(6, 5, padding=2, padding_mode="reflect"),
    "conv_k3_replicate": _conv(6, 3, padding=1, padding_mode="replicate"),
    "conv_k5_replicate": _conv(6, 5, padding=2, padding_mode="replicate"),
    "conv_k3_zeros_pad2": _conv(6, 3, padding=2, padding_mode="zeros"),
    "conv_transpose_k4_s2_p1": lambda h, w: nn.ConvTranspose2d(CHANNELS, 6, 4, stride=2, padding=1),
    "conv_transpose_k2_s2": lambda h, w: nn.ConvTranspose2d(CHANNELS, 6, 2, stride=2),
    "group_norm": lambda h, w: GroupNormAfterConv(nn.GroupNorm(4, 8)),
    "group_norm_float32": lambda h, w: GroupNormAfterConv(Float32GroupNorm(2, 8)),
    "layer_norm_tokens": lambda h, w: LayerNormOnTokens(CHANNELS),
    "attention_sdpa_self": _tokens(SdpaSelfAttention),
    "attention_matmul_self": _tokens(MatmulSelfAttention),
    "attention_bmm_self": _tokens(BmmSelfAttention),
    "attention_einsum_self": _tokens(EinsumSelfAttention),
    "attention_sdpa_self_key_mask": lambda h, w: KeyMaskedAttention(CHANNELS),
    "attention_sdpa_learned_queries_key_mask": lambda h, w: KeyMaskedAttention(CHANNELS, learned_queries=True),
    "attention_sdpa_cross": lambda h, w: CrossAttention(CHANNELS, use_sdpa=True),
    "attention_bmm_cross": lambda h, w: CrossAttention(CHANNELS, use_sdpa=False),
    "attention_joint_text_first": lambda h, w: JointAttention(CHANNELS),
    "interpolate_nearest_scale2": _fn(F.interpolate, scale_factor=2, mode="nearest"),
    "interpolate_nearest_size": lambda h, w: InterpolateSize("nearest"),
    "interpolate_bilinear_scale2": _fn(F.interpolate, scale_factor=2, mode="bilinear", align_corners=False),
    "interpolate_bilinear_size": lambda h, w: InterpolateSize("bilinear"),
    "avg_pool2d_k2": _fn(F.avg_pool2d, 2),
    "avg_pool2d_k3_s1_p1": _fn(F.avg_pool2d, 3, stride=1, padding=1),
    "max_pool2d_k2": _fn(F.max_pool2d, 2),
    "max_pool2d_k3_s2_p1": _fn(F.max_pool2d, 3, stride=2, padding=1),
    "mean_hw_keepdim": lambda h, w: SpatialMean(keepdim=True),
    "mean_hw_no_keepdim": lambda h, w: SpatialMean(keepdim=False),
    "sum_hw_keepdim": lambda h, w: SpatialSum(keepdim=True),
    "sum_hw_no_keepdim": lambda h, w: SpatialSum(keepdim=False),
    "adaptive_avg_pool2d_1": lambda h, w: SqueezeExcite(CHANNELS),
    "arange_over_rows": lambda h, w: RowIndexEncoding(),
    "learned_position_map": lambda h, w: LearnedPosition(CHANNELS, h, w),
    "chunk_split_cat": lambda h, w: ChunkCat(),
    "permute_linear": lambda h, w: PermuteLinear(CHANNELS),
    "view_tokens_round_trip": lambda h, w: TokensRoundTrip(),
}
CONTEXT_CASES = {"attention_sdpa_cross", "attention_bmm_cross", "attention_joint_text_first"}

# Every case at worlds 2 and 3. A world of 4 (which ran the halo, statistics, attention and
# reduction cases) has no rank that a world of 3 lacks: edge ranks and interior ones, uneven rows.
WORLD_CASES = {2: list(CASES), 3: list(CASES)}

# parallelism="naive_patch" (the seam baseline): each rank runs the module on its own rows alone,
# padding them as if they were the whole image; nothing but the output is exchanged.
NAIVE_CASES = [
    "conv_k3_pad1",
    "conv_k3_reflect",
    "conv_k5_replicate",
    "conv_k3_stride2_pad1",
    "conv_transpose_k4_s2_p1",
    "conv_transpose_k2_s2",
    "max_pool2d_k3_s2_p1",
    "attention_joint_text_first",  # each patch's rows with the whole text
]
NAIVE_WORLDS = (2, 3)


def build_case(name, batch, height, width):
    """The module and inputs of a case, seeded: every rank builds the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CASES[name](height, width).eval()
        inputs = (torch.randn(batch, CHANNELS, height, width),)
        if name in CONTEXT_CASES:
            inputs += (torch.randn(batch, 5, 6),)
    return model, inputs


def naive_patch_reference(model, x, row_bounds, *context):
    """The module run on each rank's rows alone (with the whole context), the outputs stacked along the rows."""
    patches = [x[:, :, start:stop] for start, stop in itertools.pairwise(row_bounds)]
    return torch.cat([model(patch, *context) for patch in patches], dim=2)


# ----------------------------------------------------------------------------- the spawned ranks


def _compare(name, world_size, parallelism):
    """Compile case ``name`` with ``distri``, run it once; its relative error, or what went wrong."""
    from torch._dynamo.utils import counters

    import districompile

    torch._dynamo.reset()
    model, inputs = build_case(name, *SHAPES[world_size])
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        with torch.no_grad():
            if parallelism == "patch":
                ref = model(*inputs)
            else:
                bounds = districompile.explain(model, *inputs, world_size=world_size, verbose=False, split_batch=False).row_bounds
                ref = naive_patch_reference(model, inputs[0], bounds, *inputs[1:])
                torch._dynamo.reset()
            options = {**OPTIONS, "parallelism": parallelism}
            out = torch.compile(model, backend="distri", options=options, fullgraph=True)(*inputs)
    except Exception as exc:  # reported per case; every rank fails alike on a compile error
        return f"{type(exc).__name__}: {exc}"
    # Dynamo must have handed the whole forward (fullgraph) to the backend: a silent fallback
    # to eager would match the reference trivially.
    if counters["stats"]["unique_graphs"] == graphs_before:
        return "Dynamo compiled no graph: the distri backend never ran"
    if out.shape != ref.shape:
        return f"output shape {list(out.shape)}, expected {list(ref.shape)}"
    return relative_error(out, ref)


def _run_cases(rank, world_size, names, naive_names):
    """On every rank: ``{(parallelism, case): relative error or failure message}``."""
    results = {("patch", name): _compare(name, world_size, "patch") for name in names}
    results.update({("naive_patch", name): _compare(name, world_size, "naive_patch") for name in naive_names})
    return results


@pytest.fixture(scope="module")
def results_by_world():
    """``{world: [per-rank results of _run_cases]}``, one spawn per world."""
    return {
        world: run_ranks(_run_cases, world, names, NAIVE_CASES if world in NAIVE_WORLDS else [], timeout=300.0)
        for world, names in WORLD_CASES.items()
    }


def _check(results_by_world, world, key):
    per_rank = [results[key] for results in results_by_world[world]]
    for rank, result in enumerate(per_rank):
        assert not isinstance(result, str), f"rank {rank}: {result}"
        assert result < TOLERANCE, f"rank {rank}: relative error {result:.3g} (all ranks: {per_rank})"


@pytest.mark.parametrize(
    "world, name", [pytest.param(w, n, id=f"world{w}-{n}") for w, names in WORLD_CASES.items() for n in names]
)
def test_full_sync_matches_single_process_eager(results_by_world, world, name):
    _check(results_by_world, world, ("patch", name))


@pytest.mark.parametrize("world, name", [pytest.param(w, n, id=f"world{w}-{n}") for w in NAIVE_WORLDS for n in NAIVE_CASES])
def test_naive_patch_matches_module_run_on_each_patch(results_by_world, world, name):
    _check(results_by_world, world, ("naive_patch", name))


@pytest.mark.parametrize("lead", [0, 3], ids=["tokens", "joint_sequence"])
def test_fused_rms_norm_is_local(lead):
    """CUDA captures RMSNorm (every Flux and SD3 attention's) as ``_fused_rms_norm``; a CPU capture
    decomposes it, so the rule is checked on a graph that calls it: local along split tokens,
    joint sequences (``lead`` replicated text tokens first) included, no fallback gather."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten._fused_rms_norm.default, (x, [8], None, 1e-6)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm).propagate(torch.randn(2, lead + 12, 8))
    spec = Shard(1, RowSplit((0, 7, 12)), lead=lead)  # 12 tokens, 7 and 5 per rank
    propagation = propagate(gm, {x: spec}, world=2)
    assert propagation.fallbacks == []
    (norm,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert propagation.specs[norm] == (spec, spec)
