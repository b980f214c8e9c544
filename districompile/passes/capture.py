"""Capture: lower Dynamo's torch-level graph to a functional ATen graph with static shapes.

ATen is the level where one op family has one name: every conv is ``aten.convolution``,
``F.linear`` on tokens becomes ``view`` + ``addmm``, einsum becomes ``bmm``. Tracing runs on
fake tensors, so it costs no compute and no memory.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def capture(gm: fx.GraphModule, inputs: list) -> fx.GraphModule:
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad(), fake_mode:
        aten_gm = make_fx(torch.func.functionalize(gm, remove="mutations"))(*fakes)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    return aten_gm
