"""Capture: turn one UNet call into a normalized ATen `torch.fx.GraphModule`.

Invariants:
- `CallLayout.from_call` flattens a call's tensor inputs in the UNet's own argument order; the layout's
  `signature` is hashable and changes whenever a captured graph could not be reused (shape, dtype, device,
  memory format of any tensor, which optional inputs are present, any constant argument, and whether
  autocast is on for the inputs' device, and to which dtype: diffusers code reads dtypes that autocast
  changes, such as `hidden_states.to(query.dtype)`, so a graph traced under autocast bakes in its casts).
- `capture` exports with `strict=False` (diffusers' UNet has shape-dependent Python that `symbolic_trace`
  cannot follow) and then normalizes: the pytree calling convention becomes plain positional tensors in
  and one tensor out, export's guard call and metadata assertions are dropped, and eval-mode dropout
  becomes the identity (dropout is tagged nondeterministic, which would keep dead transformer branches
  alive through dead-code elimination).
- The returned graph's parameters are the UNet's own `Parameter` objects, and nothing it keeps holds a
  weak reference to them (`torch.utils.swap_tensors`, which `.to()` uses on tensor subclasses, needs that).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..concurrency import EXPORT_GATE
from .side_effects import changes_undone, describe_changes

logger = logging.getLogger(__name__)

aten = torch.ops.aten

# Export's own soundness checks: they only re-assert what the input signature already guarantees, and
# they are impure, so leaving them in would pin otherwise-dead nodes.
_ASSERT_TARGETS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}

# The UNet2DConditionModel.forward arguments the graphs take, in order. return_dict is handled by the
# runtime. cross_attention_kwargs is taken only as {"scale": number}, the LoRA scale, which the capture
# bakes in as a constant (see `_lora_scale`); anything else in it is Python-side state for attention
# processors that a graph could not see change, so those calls run the eager UNet.
GRAPH_ARGUMENTS = (
    "sample",
    "timestep",
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "added_cond_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


class UnsupportedCall(Exception):
    """A call the captured graphs cannot serve; the message names the argument."""


class ArgumentBinder:
    """A call's arguments by name, as `inspect.Signature.bind` gives them (defaults not filled in).

    Every step runs this on the host, so a signature of plain positional-or-keyword parameters (the
    UNet's) is bound directly, several times faster than inspect; any other call (unknown or doubled
    names, missing required ones) goes to inspect, which raises the TypeError it deserves.
    """

    def __init__(self, fn: Any) -> None:
        self.signature = inspect.signature(fn)
        parameters = self.signature.parameters
        self._names = tuple(parameters)
        self._required = frozenset(n for n, p in parameters.items() if p.default is inspect.Parameter.empty)
        self._plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters.values())

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._plain and len(args) <= len(self._names):
            arguments = dict(zip(self._names, args))
            if kwargs.keys().isdisjoint(arguments) and kwargs.keys() <= self.signature.parameters.keys():
                arguments.update(kwargs)
                if self._required <= arguments.keys():
                    return arguments
        arguments = dict(self.signature.bind(*args, **kwargs).arguments)
        arguments.update(arguments.pop("kwargs", {}))
        return arguments


def _lora_scale(kwargs: object) -> dict[str, float] | None:
    """cross_attention_kwargs as the graphs take it: None, or {"scale": s} with s != 1.

    diffusers pops "scale" and multiplies every PEFT LoRA layer's Python `scaling` by it for the call, so
    the export records it as a constant: each scale gets graphs of its own (part of the signature), and a
    scale of 1 (diffusers' no-op) shares the graphs of calls without it.
    """
    if not kwargs:
        return None
    if not isinstance(kwargs, dict):
        found = type(kwargs).__name__
    elif set(kwargs) != {"scale"}:
        found = sorted(map(str, kwargs))
    elif isinstance(kwargs["scale"], bool) or not isinstance(kwargs["scale"], (int, float)):
        found = f"a scale of type {type(kwargs['scale']).__name__}"
    else:
        return None if kwargs["scale"] == 1 else {"scale": float(kwargs["scale"])}
    raise UnsupportedCall(f"cross_attention_kwargs ({found}; the graphs take only {{'scale': number}}, the LoRA scale)")


def _layout(t: torch.Tensor) -> str | tuple[int, ...]:
    """The tensor's memory layout as far as a graph built for it cares.

    Inductor's compiled graphs assert every input's strides (a sample laid out otherwise raises deep in
    generated code), so a layout of its own gets graphs of its own: the two dense layouts by name (strides
    of size-1 dimensions do not matter to them or to inductor's check), any other by its strides.
    """
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return tuple(t.stride())


def _tensor_key(t: torch.Tensor) -> tuple:
    return ("tensor", tuple(t.shape), t.dtype, t.device, _layout(t))


def _flatten(name: str, value: Any, tensors: list[torch.Tensor]) -> tuple:
    """Append the tensors of `value` to `tensors`; return a hashable description of its structure."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _tensor_key(value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsupportedCall(f"{name} has non-string keys")
        return ("dict", tuple((k, _flatten(f"{name}[{k!r}]", value[k], tensors)) for k in sorted(value)))
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return (kind, tuple(_flatten(f"{name}[{i}]", v, tensors) for i, v in enumerate(value)))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("const", value)
    raise UnsupportedCall(f"{name} of type {type(value).__name__}")


def _unflatten(structure: tuple, tensors: list[torch.Tensor], pos: list[int]) -> Any:
    kind = structure[0]
    if kind == "tensor":
        value = tensors[pos[0]]
        pos[0] += 1
        return value
    if kind == "dict":
        return {k: _unflatten(sub, tensors, pos) for k, sub in structure[1]}
    if kind in ("list", "tuple"):
        items = [_unflatten(sub, tensors, pos) for sub in structure[1]]
        return items if kind == "list" else tuple(items)
    return structure[1]


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """The structure of one UNet call: which arguments, their nesting, tensor metadata and constants."""

    structure: tuple  # ((name, flattened structure), ...) in GRAPH_ARGUMENTS order
    autocast: torch.dtype | None = None  # the autocast dtype for the inputs' device when the call was made

    @property
    def signature(self) -> tuple:
        return (self.structure, self.autocast)

    @classmethod
    def from_call(cls, arguments: dict[str, Any]) -> tuple[CallLayout, list[torch.Tensor]]:
        """Flatten bound UNet arguments (without return_dict) into a layout and its tensors.

        Raises `UnsupportedCall` naming the argument when the graphs cannot serve the call.
        """
        extra = sorted(set(arguments) - set(GRAPH_ARGUMENTS))
        if extra:
            raise UnsupportedCall(extra[0])
        sample = arguments["sample"]
        timestep = arguments["timestep"]
        if not isinstance(timestep, torch.Tensor):
            # What UNet2DConditionModel itself does with a Python number, made explicit so it is an input.
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            arguments = {**arguments, "timestep": torch.tensor([timestep], dtype=dtype, device=sample.device)}
        elif timestep.device != sample.device:
            # The UNet moves it itself; doing it here keeps a host-to-device copy out of the graphs, where a
            # CUDA-graph capture could not hold it.
            arguments = {**arguments, "timestep": timestep.to(sample.device)}
        if arguments.get("cross_attention_kwargs") is not None:  # the common call has none: no copy per step
            arguments = {**arguments, "cross_attention_kwargs": _lora_scale(arguments["cross_attention_kwargs"])}
        tensors: list[torch.Tensor] = []
        structure = []
        for name in GRAPH_ARGUMENTS:
            value = arguments.get(name)
            if value is None:
                continue
            structure.append((name, _flatten(name, value, tensors)))
        device_type = sample.device.type
        autocast = None
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            autocast = torch.get_autocast_dtype(device_type)
        return cls(tuple(structure), autocast), tensors

    def rebuild(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        pos = [0]
        return {name: _unflatten(sub, tensors, pos) for name, sub in self.structure}

    def describe(self) -> str:
        parts = []
        for name, sub in self.structure:
            if name == "cross_attention_kwargs":
                parts.append(f"lora_scale={_unflatten(sub, [], [0])['scale']}")  # constants only
            else:
                parts.append(f"{name}={tuple(sub[1])}" if sub[0] == "tensor" else name)
        if self.autocast is not None:
            parts.append(f"autocast={str(self.autocast).replace('torch.', '')}")
        return ", ".join(parts)


class _ExportAdapter(torch.nn.Module):
    """Calls the UNet from flat positional tensors and returns the sample tensor alone."""

    def __init__(self, unet: torch.nn.Module, layout: CallLayout) -> None:
        super().__init__()
        self.unet = unet
        self.layout = layout

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        # The layout leaves out arguments given as None, which every optional one defaults to, but
        # `encoder_hidden_states` has no default: Kandinsky 2.2 and AudioLDM pass it as None (their
        # conditioning comes through added_cond_kwargs or class_labels).
        return self.unet(**{"encoder_hidden_states": None, **self.layout.rebuild(list(tensors))}, return_dict=False)[0]


@dataclasses.dataclass
class Captured:
    """A normalized ATen graph of one call layout; `module_prefix` maps UNet module paths to graph paths."""

    graph_module: fx.GraphModule
    layout: CallLayout
    module_prefix: str = "unet."


def _is_identity_dropout(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.dropout.default:
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False or p == 0.0


def normalize(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite an `ExportedProgram.module()` graph in place; returns counts of what was rewritten."""
    counts = {"guards": 0, "asserts": 0, "dropout": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            counts["guards"] += 1
        elif node.op == "call_function" and node.target in _ASSERT_TARGETS:
            graph.erase_node(node)
            counts["asserts"] += 1
        elif _is_identity_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            counts["dropout"] += 1
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # Plain calling convention: positional tensors in, one tensor out (no pytree spec to re-check per call).
    graph._codegen = fx.graph.CodeGen()
    output = graph.find_nodes(op="output")[0]
    result = output.args[0]
    while isinstance(result, (tuple, list)):
        if len(result) != 1:
            raise RuntimeError(f"expected the UNet graph to return one tensor, found {len(result)} outputs")
        result = result[0]
    output.args = (result,)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return counts


def forget_real_tensors(mode: FakeTensorMode) -> None:
    """Drop the weak references `mode` keeps to the real tensors it made fake ones of.

    A graph keeps the fake modes it was traced or compiled under alive (export's, through its nodes'
    `meta["val"]`; the compile's, through what inductor keeps), and a mode's describer keeps a weak
    reference to every parameter it saw. `.to()` moves a tensor-subclass parameter (torchao's quantized
    weights) by `torch.utils.swap_tensors`, which refuses any tensor with a weak reference: `.to()` of an
    optimized quantized UNet (`pipe.to("cpu")`, model offload) raised "Couldn't swap". The references only
    memoize which real tensor became which fake one, which nothing asks once the trace or compile is done.
    """
    converter = mode.fake_tensor_converter
    converter.tensor_memo.clear()
    converter.meta_converter.describer.lookup_tensor.clear()
    converter.meta_converter.describer.lookup_storage.clear()


def _forget_traced_tensors(gm: fx.GraphModule) -> None:
    """`forget_real_tensors` for every fake mode `gm`'s node metadata keeps alive."""
    values = [node.meta.get("val") for node in gm.graph.nodes]
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    for mode in modes.values():
        forget_real_tensors(mode)


def capture(unet: torch.nn.Module, layout: CallLayout, tensors: list[torch.Tensor]) -> Captured:
    """Export `unet` for calls of `layout` (example `tensors`) and normalize the graph.

    Raises `UnsupportedCall` for a call with side effects a graph would not repeat, or would repeat at every
    step (`side_effects.changes_undone`; the state is restored first).
    """
    adapter = _ExportAdapter(unet, layout)
    # torch.export's non-strict tracing keeps process-wide state (the proxy dispatch mode's slot, the constants
    # it lifts, the backends' flags): two exports in two threads at once, even of two different UNets, both
    # failed in each of 5 trials on CPU. So an export waits for, and holds off, every call in other threads.
    with EXPORT_GATE.export(), changes_undone(unet) as changed:
        program = torch.export.export(adapter, tuple(tensors), strict=False)
        gm = program.module()
    _forget_traced_tensors(gm)
    if changed:
        raise UnsupportedCall(describe_changes(changed))
    counts = normalize(gm)
    logger.debug("captured %s: %d nodes, normalized %s", layout.describe(), len(gm.graph.nodes), counts)
    return Captured(graph_module=gm, layout=layout)
