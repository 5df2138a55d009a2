"""The values a module or attention processor keeps that a traced forward read, as hashable snapshots.

`module_state.module_snapshot` reads these for every module at every generation's start and compares them
with `==`: two snapshots are equal exactly when the graphs traced under one are valid under the other.

Invariants:
- Host metadata only: plain Python values, identities, and the values of one-element CPU tensors; no
  device tensor's value is read, so no read syncs a device.
- Hashable and comparable without calling any object's `__eq__` but plain values' and functions': a tensor
  counts by `id` (the graphs hold it, so the id stays taken), never by `==`.
- A list is copied into the snapshot (a list kept by reference would change along with the processor's).
"""

from __future__ import annotations

import functools
import itertools
import operator
import types
from collections.abc import Iterable
from typing import NamedTuple

import torch

from .code_reads import SCALAR_TYPES

_MODULE_KEYS = frozenset(vars(torch.nn.Module()))  # every module's tables, hooks and flags
# Kept as attributes, they compare by identity (a bound method by its object and function).
_CALLABLE_TYPES = frozenset({types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial})


def _tensor_state(tensor: torch.Tensor) -> tuple:
    """A tensor kept outside the parameters and buffers, which the export lifted as a constant: by identity,
    since the graphs hold that object and read it where it lives (an in-place change is seen, a new tensor
    is not); and a one-element CPU tensor by value too, which a CUDA graph bakes in at capture."""
    if tensor.device.type == "cpu" and tensor.numel() == 1:
        return (id(tensor), tensor.item())
    return (id(tensor),)


def _state(value: object, depth: int = 2) -> object:
    """What graphs traced through a value a processor keeps depend on: numbers, strings and flags by value,
    tensors by `_tensor_state`, functions by identity, lists, tuples and dicts of them item by item (a
    snapshot: a list kept by reference would change along with the processor's, `scale[0] = 0.5`), and
    `...` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_state(value)
    if type(value) in _CALLABLE_TYPES:
        return value
    if depth and isinstance(value, (list, tuple)):
        return tuple([_state(v, depth - 1) for v in value])
    if depth and isinstance(value, dict):
        return tuple([(k, _state(v, depth - 1)) for k, v in value.items()])
    return ...


def _scalars(items: Iterable) -> bool:
    return all(map(SCALAR_TYPES.__contains__, map(type, items)))


def _scalar_values(state: dict) -> tuple:
    """The numbers, strings and flags in a module's `__dict__`, its tuples of them (a convolution's padding and
    dilation, which ScaleCrafter-style high-resolution sampling re-dilates), its functions (by identity: a
    resnet's `upsample` lambda) and its tensors that are no parameter or buffer (by `_tensor_state`), as (name,
    value) in the order it set them. Exact types and no lists, unlike `_state` (a list would need a copy, an int
    subclass may compare in ways of its own); and no None: `disable_freeu()` leaves `s1 = None` where
    `getattr(block, "s1", None)` is read, which is the same as never having set it."""
    pairs = []
    for k, v in state.items():
        if type(v) in SCALAR_TYPES or type(v) is tuple and _scalars(v):
            pairs.append((k, v))
        elif type(v) in _CALLABLE_TYPES and k != "forward":  # an instance's forward is a hook (`_hooks`)
            pairs.append((k, v))
        elif isinstance(v, torch.Tensor):
            pairs.append((k, _tensor_state(v)))
    return tuple(pairs)


class ValueReader(NamedTuple):
    """`_scalar_values` of one class's modules, read faster from the attributes its first module had.

    Modules of one class mostly keep the same attributes, of the same types: where a module has as many
    attributes as the first one, and the first one's tracked keys and its other keys (but nn.Module's own)
    hold values of the same types, one itemgetter reads them in C and the tracked values alone stand for the
    module. The other keys' types are checked too: an attribute that was None in the first module and is a
    number, tuple, tensor or function in another (`_chunk_size` set on one block) must not go unread. Any
    other module is read the slow way (20 of SD 1.5's 709 modules, ResnetBlock2Ds with and without a
    shortcut), and stands for itself by its values alone only if its tracked keys are the same.
    """

    keys: tuple[str, ...]  # the tracked attributes
    get: operator.itemgetter  # the tracked attributes, then the others
    types: tuple[type, ...]  # the types of what `get` reads
    length: int
    tuples: operator.itemgetter | None  # the tuples among the values, whose items are checked at every read
    tensors: tuple[int, ...]  # where the values are tensors, read by `_tensor_state`

    @classmethod
    def of(cls, state: dict) -> ValueReader:
        keys = tuple([k for k, _ in _scalar_values(state)])
        read = keys + tuple([k for k in state if k not in _MODULE_KEYS and k not in keys])
        # An itemgetter of one key returns the bare value, not a tuple of it ("training" may be the only one)
        get = operator.itemgetter(*read) if len(read) > 1 else lambda state: tuple([state[k] for k in read])
        positions = [i for i, k in enumerate(keys) if type(state[k]) is tuple]
        # As a tuple of tuples, even of one: chained, they are checked in one pass.
        tuples = operator.itemgetter(*positions, *positions[:1]) if positions else None
        tensors = tuple([i for i, k in enumerate(keys) if isinstance(state[k], torch.Tensor)])
        return cls(keys, get, tuple([type(state[k]) for k in read]), len(state), tuples, tensors)

    def read(self, module: torch.nn.Module) -> tuple:
        state = module.__dict__
        if len(state) == self.length:
            try:
                values = self.get(state)
            except KeyError:
                pass
            else:
                if tuple(map(type, values)) == self.types:
                    values = values[:len(self.keys)]  # the tracked ones (the whole tuple, uncopied, if all are)
                    if self.tuples is None or _scalars(itertools.chain.from_iterable(self.tuples(values))):
                        if not self.tensors:
                            return values
                        values = list(values)
                        for i in self.tensors:
                            values[i] = _tensor_state(values[i])
                        return tuple(values)
        pairs = _scalar_values(state)
        if tuple([k for k, _ in pairs]) == self.keys:
            return tuple([v for _, v in pairs])
        return pairs


def config_state(config: dict) -> tuple:
    """A diffusers module's config (`ConfigMixin._internal_dict`, a `FrozenDict`) by `_state`, three levels deep
    (`transformer_layers_per_block` may be a tuple of tuples). The forward reads some of it as Python values
    (`self.config.center_input_sample`, `addition_embed_type`), so a changed value must rebuild, and a value
    set back finds the graphs built under it.

    Its attributes, not its items: the forward reads `config.name`, an attribute, and FrozenDict's freeze
    never engages (it asks `hasattr(self, "__frozen")` of a mangled name), so `unet.config.name = value`
    sets the attribute alone. Diffusers' IP-Adapter loader does so (`encoder_hid_dim_type`), and so would a
    user; `register_to_config` makes a new dict, whose attributes mirror its items.
    """
    return _state(vars(config), 3)


def processor_state(processor: object) -> tuple:
    """The values an attention processor keeps, by `_state`: an IP-Adapter's `scale`, a custom processor's
    mask tensors (a new one set between generations was served the old graphs, silently). A processor that
    is a module is walked as one too: its parameters, hooks and flags are not read again here."""
    module = isinstance(processor, torch.nn.Module)
    found = []
    for key, value in getattr(processor, "__dict__", {}).items():
        if not (module and key in _MODULE_KEYS):
            state = _state(value)
            if state is not ...:
                found.append((key, state))
    return tuple(found)


def _scale_state(layer: torch.nn.Module, name: str, scale: object) -> tuple:
    """One LoRA scaling as the graphs depend on it: a float by value, a tensor (LoRA hotswap) by identity.

    The graphs read a scaling tensor where it lives, so compared as a value, a new tensor of equal value
    (PEFT sets one after each call scaled by cross_attention_kwargs) would pass for the old one, which the
    graphs still read; the fingerprint holds it, so its id stays taken. Except a one-element tensor on
    another device than the layer's weight (hotswap enabled before `pipe.to("cuda")` leaves the scalings on
    the CPU): CUDA kernels take such a scalar's value at launch, so a CUDA graph keeps the value it was
    captured with, and the value counts too (read on the host: it lives there).
    """
    if not isinstance(scale, torch.Tensor):
        return (name, scale)
    base = layer._modules.get("base_layer")
    weight = base._parameters.get("weight") if base is not None else None
    if weight is not None and scale.device != weight.device and scale.device.type == "cpu" and scale.numel() == 1:
        return (name, id(scale), scale, scale.item())
    return (name, id(scale), scale)


def adapter_state(layer: torch.nn.Module) -> tuple:
    """What a PEFT adapter layer's forward reads as Python values (peft is not imported: duck-typed)."""
    scaling = layer.__dict__.get("scaling")
    scales = tuple(sorted(_scale_state(layer, k, v) for k, v in scaling.items())) if isinstance(scaling, dict) else None
    return scales, tuple(layer.active_adapters), bool(layer.disable_adapters), tuple(layer.merged_adapters)
