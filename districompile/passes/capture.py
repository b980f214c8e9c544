"""Capture: lower Dynamo's torch-level graph to a functional ATen graph with static shapes.

ATen is the level where one op family has one name: every conv is ``aten.convolution``,
``F.linear`` on tokens becomes ``view`` + ``addmm``, einsum becomes ``bmm``. Tracing runs on
fake tensors, so it costs no compute and no memory.

The graph is traced through an ``fx.Interpreter`` with the node metadata preserved, so every ATen
node keeps the module path (``nn_module_stack``) and source line (``stack_trace``) Dynamo recorded
for the torch-level node it comes from: ``explain`` and the logs name sites by them.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

# What names a node for the user; the partitioner carries it onto the nodes it emits.
NAMING_META = ("nn_module_stack", "stack_trace")


def capture(gm: fx.GraphModule, inputs: list) -> fx.GraphModule:
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    with torch.no_grad(), fake_mode, fx_traceback.preserve_node_meta():
        aten_gm = make_fx(torch.func.functionalize(run, remove="mutations"))(*fakes)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm


def module_path(node: fx.Node) -> str:
    """The innermost module ``node`` was traced in, as the model names it
    (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``); "" for the model's own forward."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # Dynamo's source syntax: L['self'].__dict__['_modules']['down_blocks'].1._modules['attn1']
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"(?:\.__dict__\['_modules'\]|\._modules)?\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m[1] or m[2]), path)
    return path.lstrip(".")


def module_type(node: fx.Node) -> str:
    """The class name of the innermost module ``node`` was traced in (``Conv2d``); "" outside any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    _, cls = list(stack.values())[-1]
    return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]


def source_line(node: fx.Node) -> str:
    """``file.py:line`` of the innermost frame of the model's source that produced ``node``; "" if unknown."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line}"
