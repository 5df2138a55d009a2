"""What a traced UNet call may not change, and putting back what it changed.

`torch.export` runs the UNet's Python once, at capture. A side effect of that call happens then, with the
export's fake tensors wherever the inputs flow, and a graph replay never repeats it, or, for an in-place
write to a tensor the export lifted as a constant, repeats it at every run. Two kinds are seen in diffusers
use, and `changes_undone` finds both:
- Tensor attributes of the UNet's modules that are neither parameters nor buffers, written in place or
  replaced: PEFT's LoRA scalings once `enable_lora_hotswap` has made them tensors. A LoRA scale in
  cross_attention_kwargs multiplies each in place before the forward and sets a new tensor, divided by it,
  after; the export kept the in-place multiply, so every run of the graph halved the LoRA again.
- The state of attention processors (plain objects, outside the module tree): SAG's store processor sets
  `attention_probs` at every call for its pipeline to read after it. After a capture it held the export's
  fake tensor, and no replay would ever set it.

Invariants:
- Everything found changed is put back on every exit (a failing export too), so a refused capture leaves
  the UNet as it was: no halved scaling, no fake tensor left in a processor.
- Tensors are compared by identity (replaced) and version counter (written in place, without reading a
  value; inference tensors keep no counter, so for them the bits). A processor's attributes are compared
  by identity, and the lists, dicts and sets it holds by the identities of their items (attention maps
  appended or stored under a key). State further away (an object a processor holds that records into
  containers of its own) is beyond this check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

# nn.Module's own tables: parameters and buffers are fakified by the export, never written for real.
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})
_MISSING = object()  # an attribute the processor lacked before, or after


class Change(NamedTuple):
    kind: str  # "tensor" (a module's tensor attribute) or "processor" (an attention processor's state)
    path: str


def _plain_tensor_attributes(unet: torch.nn.Module) -> list[tuple[str, dict, object, torch.Tensor]]:
    """Tensors the UNet's modules keep outside their parameters and buffers: (path, container, key, tensor).

    PEFT keeps LoRA scalings this way once `enable_lora_hotswap` has made them tensors (a dict per layer).
    """
    found = []
    for name, module in unet.named_modules():
        state = vars(module)
        for attr, value in list(state.items()):
            if attr in _MODULE_TABLES:
                continue
            container, items = (value, list(value.items())) if isinstance(value, dict) else (state, [(attr, value)])
            for key, t in items:
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                    path = (f"{name}." if name else "") + attr + ("" if container is state else f"[{key!r}]")
                    found.append((path, container, key, t))
    return found


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _written(t: torch.Tensor, version: int | None, value: torch.Tensor) -> bool:
    """Whether `t` was written since `version` and `value` were taken from it."""
    if version is not None:  # any in-place write, even one a later write undid
        return t._version != version
    # An inference tensor keeps no version counter: compare bits (NaN-safe), the best that is left.
    return t.shape != value.shape or t.dtype != value.dtype or not torch.equal(_bits(t), _bits(value))


def _processors(unet: torch.nn.Module) -> list[tuple[str, object]]:
    """Attention processors that are plain objects (diffusers' `Attention.processor`), each once.

    Processors that are modules (IP-Adapter's) sit in the module tree, where `_plain_tensor_attributes`
    sees their tensors.
    """
    found, seen = [], set()
    for name, module in unet.named_modules():
        processor = vars(module).get("processor")
        if processor is not None and hasattr(processor, "__dict__") and id(processor) not in seen:
            seen.add(id(processor))
            found.append((f"{name}.processor", processor))
    return found


def _items(value: object) -> tuple | None:
    """The identities of a container's items, which change when an item is added, removed or replaced."""
    if isinstance(value, dict):
        return tuple((k, id(v)) for k, v in value.items())
    if isinstance(value, (list, set)):
        return tuple(id(v) for v in value)
    return None


def _restore_container(value: object, saved: object) -> None:
    if isinstance(value, list):
        value[:] = saved
    else:  # a dict or a set
        value.clear()
        value.update(saved)


@contextlib.contextmanager
def changes_undone(unet: torch.nn.Module) -> Iterator[list[Change]]:
    """Yield a list that, on exit, holds what the block changed (see the module docstring), put back."""
    tensors = [(path, container, key, t, None if t.is_inference() else t._version, t.detach().clone())
               for path, container, key, t in _plain_tensor_attributes(unet)]
    processors = []
    for path, processor in _processors(unet):
        state = dict(vars(processor))
        contents = {}  # the containers it holds: their items' identities, and a copy to restore them from
        for k, v in state.items():
            items = _items(v)
            if items is not None:
                contents[k] = (items, v.copy())
        processors.append((path, processor, state, contents))
    changed: list[Change] = []
    try:
        yield changed
    finally:
        for path, container, key, t, version, value in tensors:
            if container.get(key) is not t or _written(t, version, value):
                container[key] = t
                with torch.inference_mode():  # in place on an inference tensor too; no autograd either way
                    t.copy_(value)
                changed.append(Change("tensor", path))
        for path, processor, state, contents in processors:
            now = vars(processor)
            names = sorted(k for k in state.keys() | now.keys() if now.get(k, _MISSING) is not state.get(k, _MISSING)
                           or (k in contents and _items(state[k]) != contents[k][0]))
            for name in names:
                changed.append(Change("processor", f"{path}.{name} ({type(processor).__name__})"))
                if name in contents:
                    _restore_container(state[name], contents[name][1])
            if names:
                now.clear()
                now.update(state)


def _named(changed: list[Change], kind: str) -> str | None:
    """The first path of `kind` and how many more, or None when there is none."""
    paths = [c.path for c in changed if c.kind == kind]
    if not paths:
        return None
    return paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")


def describe_changes(changed: list[Change]) -> str:
    """Why a capture that made `changed` is refused, and what to do instead."""
    parts = []
    tensors = _named(changed, "tensor")
    if tensors:
        parts.append(
            f"the call writes module state ({tensors}: a tensor attribute, neither parameter nor buffer, such "
            "as the LoRA scalings enable_lora_hotswap makes, which a LoRA scale in cross_attention_kwargs "
            "rewrites at every call); a graph would repeat the write at every step. Set the LoRA strength with "
            "set_adapters(names, weights) instead, or load adapters without hotswap"
        )
    processors = _named(changed, "processor")
    if processors:
        parts.append(
            f"the call changes the state of an attention processor ({processors}), as processors that record "
            "attention maps do (SAG's); a graph replay never runs the processor's Python, so that state would "
            "never be updated. Calls with such processors run the eager UNet"
        )
    return "; and ".join(parts)
