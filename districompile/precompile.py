"""Precompiled models: a restart that skips Dynamo's tracing too.

A restart from shipped caches (``warm``) loads each rank's programs and compiled phases, but
Dynamo still traces the model first: 15 to 25 s of SDXL's restart on an H100 host
(docs/PERFORMANCE.md). Torch's AOT compile (``torch.compile(...).aot_compile``, experimental)
saves Dynamo's graph and guards with the backend's result. districompile's result is its
runtime: it saves the graph, the graph's input layout and the options
(``DistriRuntime.serialize_compile_artifacts``), and compiles the phases on the first call, from
the plan and Inductor caches where they hold them.

    precompile(unet, args, kwargs, options)  # Dynamo traces now; unet(...) runs the distri backend
    ...                                      # calls until the steady phase
    save(unet, "rank0-of-2.forward")         # with districompile.warm.save for the caches
    load(unet, "rank0-of-2.forward")         # a fresh process: unet(...) traces nothing

The model's ``forward`` is traced, without the model's own forward hooks (a model with some is
refused), for the example inputs' shapes, dtypes and devices: a call that differs fails the saved guards,
and the error names what differs. Weights are inputs, not saved; the file holds a fingerprint of
the model (its class, its config, its parameters' and buffers' names, shapes and dtypes) that
``load`` checks. It is a pickle: load only files you trust.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
import io
import pickle
import re
import types
from pathlib import Path

import torch
import torch.fx as fx

from .errors import DistriCompileError
from .passes.annotate import SAVED_SOURCE, source_name
from .passes.capture import NAMING_META


def precompile(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, options: dict | None = None) -> torch.nn.Module:
    """Compile ``model`` with the distri backend in place, Dynamo tracing it now for these inputs
    (in the grad mode of the calls to come: ``torch.no_grad()`` for a pipeline's), so that ``save``
    can keep the trace. Returns ``model``, whose calls run the compiled graph."""
    _refuse_hooks(model)
    with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default before torch 2.13
        compiled = torch.compile(
            _traced_forward, backend=_DistriBackend(model, _input_sources(model, args, kwargs or {}), options), fullgraph=True,
            dynamic=False, options={"guard_filter_fn": _saved_guards},
        )
        _install(model, compiled.aot_compile(((model, *args), kwargs or {})))
    return model


def _call_forward(model, *args, **kwargs):
    return model.forward(*args, **kwargs)


# What Dynamo traces: the model's forward, called through a function of ours, so that a decorated
# forward's closure (diffusers' ``apply_lora_scale``) is read from the model at load, not pickled.
# Its globals hold the builtins by name: the code torch generates reads them as globals, and
# torch 2.11 looks for them there only.
_TRACED_GLOBALS = {**vars(builtins), "__name__": __name__, "__builtins__": vars(builtins)}
_traced_forward = types.FunctionType(_call_forward.__code__, _TRACED_GLOBALS, "_traced_forward")
_traced_forward.__qualname__ = "_traced_forward"  # pickled by reference, as this module's


class _DistriBackend:
    """The distri backend under torch's AOT compile, whose graph's placeholders do not say where
    Dynamo read them, and whose tracing context holds no traced code (torch 2.11 and 2.13): each
    placeholder is named here by the tensor it was given, as Dynamo would have named it
    (``L['sample']``, ``L['self']`` for the model's parameters and buffers), and the graph by the model."""

    def __init__(self, model: torch.nn.Module, sources: dict[int, str], options: dict | None):
        self.name, self.sources, self.options = f"graph of {type(model).__name__}.forward", sources, options

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **_):
        from .config import DistriConfig
        from .runtime import DistriRuntime, InputLayout

        for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            if source_name(node) is None and id(value) in self.sources:
                node.meta[SAVED_SOURCE] = self.sources[id(value)]
        config = DistriConfig.from_options(self.options)
        return DistriRuntime(gm, InputLayout.read(gm, list(example_inputs), config, self.name), config)


def _input_sources(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[int, str]:
    """``{id(tensor): source}`` for the model's state and every tensor of the call, by the parameter
    names of the function ``forward`` wraps, if it is decorated (diffusers' ``forward(self, *args, **kwargs)``)."""
    sources = {id(t): f"L['self'].{name}" for name, t in [*model.named_parameters(), *model.named_buffers()]}
    bound = inspect.signature(inspect.unwrap(type(model).forward)).bind(model, *args, **kwargs)
    for name, value in list(bound.arguments.items())[1:]:
        for path, leaf in torch.utils._pytree.tree_flatten_with_path(value)[0]:
            keys = "".join(f"[{k.key!r}]" if hasattr(k, "key") else f"[{k.idx}]" for k in path)
            sources.setdefault(id(leaf), f"L[{name!r}]{keys}")
    return sources


def save(model: torch.nn.Module, path) -> Path:
    """Write ``model``'s precompiled forward (``precompile`` or ``load``) to ``path``."""
    forward = model._compiled_call_impl
    if not isinstance(forward, PrecompiledForward):
        raise DistriCompileError(
            f"districompile.precompile.save: {type(model).__name__} is not precompiled; call "
            "districompile.precompile.precompile(model, args, kwargs, options) first"
        )
    function = type(forward.function).serialize(forward.function).serialized_data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Modules Dynamo's code reads as globals it installed in the traced function's (some it does not record).
    modules = {name: value.__name__ for name, value in _TRACED_GLOBALS.items() if isinstance(value, types.ModuleType)}
    path.write_bytes(pickle.dumps({"model": fingerprint(model), "function": function, "modules": modules}))
    return path


def load(model: torch.nn.Module, path) -> torch.nn.Module:
    """Install the forward ``save`` wrote to ``path`` on ``model`` (of the same class and config):
    its calls run the saved graph through the distri backend, with no Dynamo tracing."""
    _refuse_hooks(model)
    saved = pickle.loads(Path(path).read_bytes())
    differences = _differences(saved["model"], fingerprint(model))
    if differences:
        raise DistriCompileError(
            f"districompile.precompile.load: {path} was precompiled for another model: its {'; its '.join(differences)}; "
            "precompile this model (python -m districompile.warm) or compile it with torch.compile(model, backend='distri')"
        )
    modules = {name: importlib.import_module(module) for name, module in saved["modules"].items()}
    function = torch.compiler.load_compiled_function(io.BytesIO(saved["function"]), f_globals={**_TRACED_GLOBALS, **modules})
    _install(model, function)
    return model


class PrecompiledForward:
    """``model``'s calls through its precompiled forward, installed as ``module.compile()`` installs
    its compiled call (``_compiled_call_impl``), so that ``districompile.reset(model)`` finds it."""

    def __init__(self, model: torch.nn.Module, function):
        self.model, self.function = model, function

    def __call__(self, *args, **kwargs):
        try:
            return self.function(self.model, *args, **kwargs)
        except RuntimeError as error:
            if not str(error).startswith("GuardManager check failed"):
                raise
            failed = re.search(r"verbose_code_parts=\[(.*)\],\s*num_guards_executed", str(error), re.DOTALL)
            raise DistriCompileError(
                f"districompile.precompile: {type(self.model).__name__} was precompiled for other inputs or another state "
                f"(the saved guards fail: {failed[1].strip() if failed else error}); precompile it for these, in the grad mode "
                "of the calls (torch.no_grad() for a pipeline's), or compile it with torch.compile(model, backend='distri')"
            ) from None


def fingerprint(model: torch.nn.Module) -> dict:
    """What a saved forward must find in the model it is loaded on."""
    config = getattr(model, "config", None) or {}
    state = [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict(keep_vars=True).items()]
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": {key: repr(value) for key, value in dict(config).items() if not key.startswith("_")},
        "state": hashlib.sha256(repr(state).encode()).hexdigest(),
    }


def _differences(saved: dict, found: dict) -> list[str]:
    differences = []
    if saved["class"] != found["class"]:
        differences.append(f"class is {saved['class']} (this model: {found['class']})")
    keys = sorted(key for key in saved["config"].keys() | found["config"].keys() if saved["config"].get(key) != found["config"].get(key))
    if keys:
        shown = ", ".join(f"{key}={saved['config'].get(key)} (this model: {found['config'].get(key)})" for key in keys[:4])
        differences.append(f"config differs: {shown}{f' and {len(keys) - 4} more' if len(keys) > 4 else ''}")
    if saved["state"] != found["state"]:
        differences.append("parameters or buffers differ in names, shapes or dtypes")
    return differences


def portable_graph(gm: fx.GraphModule) -> bytes:
    """Dynamo's graph as bytes another process loads (``load_portable_graph``). Of Dynamo's
    metadata it keeps what names the nodes (modules' classes by name) and the placeholders'
    sources; the rest (fake values, guard sources) belongs to the process that traced it."""
    from torch.fx._graph_pickler import GraphPickler, Options

    metas = {node: node.meta for node in gm.graph.nodes}
    try:
        for node in gm.graph.nodes:
            node.meta = _portable_meta(node)
        return GraphPickler.dumps(gm, Options(ops_filter=None))
    finally:
        for node, meta in metas.items():
            node.meta = meta


def load_portable_graph(data: bytes) -> fx.GraphModule:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler

    gm = GraphPickler.loads(data, FakeTensorMode())
    gm.recompile()
    return gm


def _portable_meta(node: fx.Node) -> dict:
    meta = {key: node.meta[key] for key in NAMING_META if key in node.meta}
    if "nn_module_stack" in meta:
        meta["nn_module_stack"] = {
            key: (path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
            for key, (path, cls) in meta["nn_module_stack"].items()
        }
    if node.op == "placeholder" and source_name(node) is not None:
        meta[SAVED_SOURCE] = source_name(node)
    return meta


def _saved_guards(guards) -> list[bool]:
    """Every guard that can be saved: not on globals, nor on identities that hold in one process only."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaved = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (guard.is_global or guard.guard_type in unsaved or unsaved.intersection(getattr(guard, "derived_guard_types", ())))
        for guard in guards
    ]


def _install(model: torch.nn.Module, function):
    model._compiled_call_impl = PrecompiledForward(model, function)


def _refuse_hooks(model: torch.nn.Module):
    # Its submodules' hooks are traced with their calls; the model's own run around forward.
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    if hooks:
        raise DistriCompileError(
            f"districompile.precompile traces {type(model).__name__}.forward, not the model's own forward hooks "
            f"{hooks[:3]}; remove them, or compile the model with torch.compile(model, backend='distri')"
        )

