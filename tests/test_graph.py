"""Compiler regression tests on the rewritten graph: no process group, only ``explain`` and the
per-rank programs it plans (``report.plan.program(rank, "g")``).

The fixed tiny network is conv3x3 -> GroupNorm -> SiLU -> conv3x3 stride 2 -> self-attention
(SDPA) -> cross-attention on a replicated context (SDPA) -> nearest upsample -> conv5x5 ->
(+ skip) -> conv3x3.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from checks import packed_flat
from models import FACTORIES, hand_unet_a, hand_unet_b
from torch import nn
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import districompile
from districompile import DistriCompileError
from districompile.collectives import halo_plan

aten = torch.ops.aten
FETCH_ROWS = torch.ops.districompile.fetch_rows.default
GATHER_ROWS = torch.ops.districompile.gather_rows.default
ALL_GATHER_STACK = torch.ops.districompile.all_gather_stack.default
ALL_REDUCE = torch.ops.districompile.all_reduce.default
EXCHANGE_OPS = (FETCH_ROWS, GATHER_ROWS, ALL_GATHER_STACK, ALL_REDUCE)

BATCH, CHANNELS, HEIGHT, WIDTH = 1, 8, 16, 12
GROUPS = 2


class TinyUNet(nn.Module):
    def __init__(self, channels=CHANNELS, context_dim=6, heads=2):
        super().__init__()
        c = channels
        self.heads = heads
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.norm = nn.GroupNorm(GROUPS, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.to_qkv = nn.Linear(c, 3 * c)
        self.to_q_cross = nn.Linear(c, c)
        self.to_kv_cross = nn.Linear(context_dim, 2 * c)
        self.smooth = nn.Conv2d(c, c, 5, padding=2)
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def split_heads(self, t):
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def merge_heads(self, t):
        b, heads, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, heads * d)

    def forward(self, x, context):
        skip = self.conv_in(x)
        h = self.down(F.silu(self.norm(skip)))
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = (self.split_heads(t) for t in self.to_qkv(tokens).chunk(3, dim=-1))
        tokens = tokens + self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        q = self.split_heads(self.to_q_cross(tokens))
        k, v = (self.split_heads(t) for t in self.to_kv_cross(context).chunk(2, dim=-1))
        tokens = tokens + self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        h = tokens.transpose(1, 2).reshape(b, c, height, width)
        h = self.smooth(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(h + skip)


def tiny_unet_inputs(height=HEIGHT, width=WIDTH):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyUNet().eval()
        args = (torch.randn(BATCH, 4, height, width), torch.randn(BATCH, 5, 6))
    return model, args


def explain_tiny(world_size, height=HEIGHT, **options):
    model, args = tiny_unet_inputs(height)
    return districompile.explain(model, *args, world_size=world_size, verbose=False, **options)


@pytest.fixture(scope="module")
def report():
    return explain_tiny(2)


@pytest.fixture(scope="module")
def report_world3():
    # 16 rows in blocks of 2 over 3 ranks: 6 + 6 + 4 rows, 3 + 3 + 2 after the stride-2 conv.
    return explain_tiny(3)


# ----------------------------------------------------------------------------- graph helpers


def named_args(node) -> dict:
    """An op node's arguments by schema name."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def nodes_of(program, target) -> list:
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == target]


def producer(node, target):
    """The nearest ``target`` node that ``node`` is computed from through reshapes, or None."""
    while node.op == "call_function" and node.target != target:
        if node.target not in (aten.reshape.default, aten.view.default):
            return None
        node = node.args[0]
    return node if node.op == "call_function" else None


def conv_by_kernel(program, kernel: int, stride: int = 1) -> list:
    """Convolutions of a program with a ``kernel`` x ``kernel`` weight and row stride ``stride``."""
    return [
        n
        for n in nodes_of(program, aten.convolution.default)
        if n.args[1].meta["val"].shape[-1] == kernel and n.args[3][0] == stride
    ]


def halo_assembly(conv):
    """The halo assembly a convolution reads: the ``cat`` tagged ``exchange_read``."""
    assembly = producer(conv.args[0], aten.cat.default)
    assert assembly is not None and assembly.meta.get("exchange_read") == "halo", f"{conv.name} reads no fetched rows"
    return assembly


def fetch_for(conv) -> dict:
    """The arguments of the halo exchange whose rows ``conv`` reads: the exchange is written just before
    its assembly (on a rank that receives nothing, the assembly reads nothing it returns)."""
    node = halo_assembly(conv)
    while node.target != FETCH_ROWS:
        node = node.prev
    return named_args(node)


def rows_above_and_below(fetch: dict, rank: int) -> tuple[int, int]:
    """How many rows the fetch reaches above this rank's first row and below its last."""
    bounds = fetch["bounds"]
    return bounds[rank] - fetch["need_lo"][rank], fetch["need_hi"][rank] - bounds[rank + 1]


def propagate_shapes(program):
    """``meta["val"]`` on every node of a per-rank program, as the displace pass computes it."""
    inputs = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"]
    FakeTensorProp(program, detect_fake_mode(inputs)).propagate_dont_convert_inputs(*inputs)


def readers(node) -> set:
    """The nodes that read ``node`` through slices and views (the first of each path that is neither)."""
    found = set()
    for user in node.users:
        if user.target in (aten.slice.Tensor, aten.view.default, aten.reshape.default):
            found |= readers(user)
        else:
            found.add(user)
    return found


def aten_node(report, target, shape):
    """The one node of the ATen (whole-image) graph with ``target`` and output ``shape``."""
    found = [
        n
        for n in report.plan.aten_gm.graph.nodes
        if n.op == "call_function" and n.target == target and list(n.meta["val"].shape) == shape
    ]
    assert len(found) == 1, found
    return found[0]


def local_node(program, source):
    found = [n for n in program.graph.nodes if n.meta.get("source_node") == source.name]
    assert len(found) == 1, found
    return found[0]


def exchange_sequence(program) -> list[tuple]:
    """The exchange calls of a program in order, with what every rank must agree on (not its rank, data
    or number of rows)."""
    sequence = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in EXCHANGE_OPS:
            args = {k: v for k, v in named_args(node).items() if k not in ("x", "outgoing", "rank")}
            if "shape" in args:  # a halo's canonical shape: (before, outer, this rank's rows, after)
                args["shape"] = [n for i, n in enumerate(args["shape"]) if i != 2]
            sequence.append((str(node.target), sorted(args.items())))
    return sequence


# ----------------------------------------------------------------------------- exchange plan


def test_exchange_counts_per_kind(report):
    # Halos: conv_in, down, smooth (5x5) and conv_out; the nearest upsample needs none.
    assert Counter(e.kind for e in report.exchanges) == {
        "halo": 4,
        "stats_allgather": 1,
        "kv_gather": 2,
        "output_gather": 1,
    }
    assert report.fallbacks == []
    assert report.row_bounds == (0, 8, 16)


def test_halo_depth_is_half_the_kernel(report):
    program = report.plan.program(0, "g")
    by_depth = {}
    for conv in nodes_of(program, aten.convolution.default):
        if conv.args[3][0] == 1:  # stride 1
            kernel = conv.args[1].meta["val"].shape[-1]
            by_depth.setdefault(kernel, set()).add(
                next(e.detail for e in report.exchanges if e.kind == "halo" and e.node == conv.meta["source_node"])
            )
    assert by_depth == {3: {"1 rows"}, 5: {"2 rows"}}


@pytest.mark.parametrize("kernel, depth", [(3, 1), (5, 2)])
def test_stride1_conv_fetches_depth_rows_each_side_on_every_rank(report_world3, kernel, depth):
    for rank in range(3):
        program = report_world3.plan.program(rank, "g")
        convs = conv_by_kernel(program, kernel)
        assert convs
        for conv in convs:
            assert rows_above_and_below(fetch_for(conv), rank) == (depth, depth), conv.name


def test_stride2_conv_needs_one_row_above_and_none_below(report_world3):
    for rank in range(3):
        program = report_world3.plan.program(rank, "g")
        (down,) = conv_by_kernel(program, 3, stride=2)
        fetch = fetch_for(down)
        assert list(fetch["bounds"]) == [0, 6, 12, 16]
        assert rows_above_and_below(fetch, rank) == (1, 0)


def test_halo_bytes_count_the_rows_received(report):
    # conv_in reads 4 channels x 12 columns of fp32; each of the 2 ranks receives 1 row.
    (conv_in_halo,) = [e for e in report.exchanges if e.kind == "halo" and e.node == "convolution"]
    assert conv_in_halo.bytes_per_call == 2 * 1 * BATCH * 4 * WIDTH * 4


@pytest.mark.parametrize("world", [2, 3])
def test_halo_exchange_sends_and_returns_only_the_rows_exchanged(report, report_world3, world):
    """Every halo exchange op (full_sync's) is given the rows it sends, packed flat by ATen ops in the
    graph, not the whole tensor, and returns the rows it receives, flat, and only those; the program
    assembles them with its own rows and the edge padding (a ``cat``), where Inductor can fuse the
    producer of the rows into it. What the ops receive is what explain counts."""
    report = {2: report, 3: report_world3}[world]
    received_bytes = 0
    for rank in range(world):
        program = report.plan.program(rank, "g")
        propagate_shapes(program)
        fetches = nodes_of(program, FETCH_ROWS)
        assert len(fetches) == 4
        for fetch in fetches:
            args = named_args(fetch)
            outgoing, shape = args["outgoing"], args["shape"]
            plan = halo_plan(tuple(args["bounds"]), tuple(args["need_lo"]), tuple(args["need_hi"]), rank, args["pad_mode"])
            row = shape[0] * shape[1] * shape[3]  # the elements of one row of the canonical view
            label = f"rank {rank}: {fetch.name}"
            assert packed_flat(outgoing), label
            assert list(outgoing.meta["val"].shape) == [sum(plan.send_rows()) * row], label
            assert list(fetch.meta["val"].shape) == [sum(plan.receive_rows()) * row], label
            received_bytes += fetch.meta["val"].nbytes
            assembly = fetch.next
            while assembly.meta.get("exchange_read") != "halo":
                assembly = assembly.next
            assert assembly.target is aten.cat.default, label
            rows = args["need_hi"][rank] - args["need_lo"][rank]
            assert list(assembly.meta["val"].shape) == [shape[0], shape[1], rows, shape[3]], label
            # The received rows go to the assembly alone, as views: no copy of them but the cat.
            assert readers(fetch) == ({assembly} if plan.receives else set()), label
    assert received_bytes == sum(e.bytes_per_call for e in report.exchanges if e.kind == "halo")


def test_stats_allgather_bytes_count_the_other_ranks_statistics():
    world = 3
    report = explain_tiny(world)
    (stats,) = [e for e in report.exchanges if e.kind == "stats_allgather"]
    one_rank = BATCH * GROUPS * 3 * 4  # (count, mean, M2) per sample and group, fp32
    assert stats.bytes_per_call == world * (world - 1) * one_rank


# ----------------------------------------------------------------------------- attention


def test_self_attention_gathers_k_and_v_but_not_q(report):
    program = report.plan.program(0, "g")
    self_attention, _cross_attention = nodes_of(program, aten._scaled_dot_product_flash_attention_for_cpu.default)
    q, k, v = self_attention.args[:3]
    assert producer(q, GATHER_ROWS) is None
    assert producer(k, GATHER_ROWS) is not None
    assert producer(v, GATHER_ROWS) is not None
    assert [e.kind for e in report.exchanges].count("kv_gather") == 2


def test_cross_attention_on_replicated_context_gathers_nothing(report):
    program = report.plan.program(0, "g")
    self_attention, cross_attention = nodes_of(program, aten._scaled_dot_product_flash_attention_for_cpu.default)
    for arg in cross_attention.args[:3]:
        assert producer(arg, GATHER_ROWS) is None
    # explain agrees: both K/V gathers feed the self-attention.
    kv_consumers = [e.detail.rsplit(" for ", 1)[1] for e in report.exchanges if e.kind == "kv_gather"]
    assert kv_consumers == [self_attention.meta["source_node"]] * 2


# ----------------------------------------------------------------------------- per-rank programs


def test_program_exchange_node_counts(report):
    program = report.plan.program(0, "g")
    counts = {str(op): len(nodes_of(program, op)) for op in EXCHANGE_OPS}
    assert counts == {
        str(FETCH_ROWS): 4,  # the four halos
        str(GATHER_ROWS): 3,  # K, V and the output
        str(ALL_GATHER_STACK): 1,  # GroupNorm statistics
        str(ALL_REDUCE): 0,
    }


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_calls_the_same_exchanges_in_the_same_order(report, report_world3, world):
    plan = {2: report, 3: report_world3}[world].plan
    sequences = [exchange_sequence(plan.program(rank, "g")) for rank in range(world)]
    assert len(sequences[0]) == 8
    for rank in range(1, world):
        assert sequences[rank] == sequences[0], f"rank {rank} differs from rank 0"


def test_shape_constants_are_local(report_world3):
    report = report_world3
    half_h, half_w = HEIGHT // 2, WIDTH // 2
    token_view = aten_node(report, aten.view.default, [BATCH, CHANNELS, half_h * half_w])  # flatten(2)
    image_view = aten_node(report, aten.view.default, [BATCH, CHANNELS, half_h, half_w])  # tokens -> image
    upsample = aten_node(report, aten.upsample_nearest2d.default, [BATCH, CHANNELS, HEIGHT, WIDTH])
    for rank, local_rows in enumerate([3, 3, 2]):
        program = report.plan.program(rank, "g")
        assert local_node(program, token_view).args[1] == [BATCH, CHANNELS, local_rows * half_w]
        assert local_node(program, image_view).args[1] == [BATCH, CHANNELS, local_rows, half_w]
        assert local_node(program, upsample).args[1] == [2 * local_rows, WIDTH]


def test_program_input_is_sliced_to_the_rank_rows(report_world3):
    for rank, (start, stop) in enumerate([(0, 6), (6, 12), (12, 16)]):
        program = report_world3.plan.program(rank, "g")
        (rows,) = [
            n for n in nodes_of(program, torch.ops.aten.slice.Tensor) if n.args[0].args[0].op == "placeholder"
        ]  # the input, viewed as (N, C, H, W), sliced along H
        assert rows.args[1:] == (2, start, stop)


# ----------------------------------------------------------------------------- whole models and modes


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_test_models_have_no_fallbacks(factory):
    model, args, kwargs = factory()
    report = districompile.explain(model, *args, world_size=2, verbose=False, **kwargs)
    assert report.fallbacks == []
    assert report.count("gather") == 0 and report.count("resplit") == 0
    assert report.count("output_gather") == 1


def test_naive_patch_exchanges_only_the_output(report):
    naive = explain_tiny(2, parallelism="naive_patch")
    assert Counter(e.kind for e in naive.exchanges) == {"output_gather": 1}
    assert naive.fallbacks == []
    program = naive.plan.program(0, "g")
    assert [len(nodes_of(program, op)) for op in EXCHANGE_OPS] == [0, 1, 0, 0]
    # The patch plan of the same model does exchange: the option is what removed them.
    assert report.count("halo") > 0


def test_naive_patch_handwritten_model_needs_no_gathers():
    # Reflect/replicate padding and transposed convolutions run on each patch alone.
    model, args, kwargs = hand_unet_b()
    naive = districompile.explain(model, *args, world_size=2, verbose=False, parallelism="naive_patch", **kwargs)
    assert naive.fallbacks == []
    kinds = Counter(e.kind for e in naive.exchanges)
    assert kinds.keys() <= {"output_gather", "slice"}, kinds
    assert kinds["output_gather"] == 1


def test_naive_patch_refuses_matmul_attention_by_name():
    # Scores of a patch's queries against its own keys would be split along two dims (hand_unet_a: einsum attention).
    model, args, kwargs = hand_unet_a()
    with pytest.raises(DistriCompileError, match=r"bmm.*naive_patch.*scaled_dot_product_attention"):
        districompile.explain(model, *args, world_size=2, verbose=False, parallelism="naive_patch", **kwargs)
