"""Module paths and state-dict keys of `FRDiffUNet` spelled as the stock UNet's: the wrapper adds no level.

`FRDiffUNet` holds the UNet as its submodule `unet`, so torch would name every entry "unet.conv_in.weight"
where the stock UNet says "conv_in.weight". Code that moves weights by name (checkpoints, `load_state_dict`
of fine-tuned weights, PEFT's `get_peft_model_state_dict(pipe.unet)` before `save_lora_weights`, which
matches module paths against state-dict keys) would then write files a stock pipeline cannot load, fail to
load its own files, or find nothing.

Invariants:
- `named_modules()` (so `named_parameters()`, `named_buffers()`, `modules()`) yields the wrapper and then
  the UNet's modules under the wrapper's own prefix, the UNet itself included, sharing that name.
- `state_dict()` of the wrapper, at any nesting depth, holds exactly the UNet's entries under the wrapper's
  prefix, in the UNet's order, with the UNet's version metadata.
- `load_state_dict()` takes the stock spelling, and the "unet." spelling of earlier releases too (the UNet
  has no submodule named `unet`, so the two never collide); missing and unexpected keys are reported in
  the stock spelling. Loading copies into the UNet's parameters in place, so the graphs (which read them
  where they live) are kept; `assign=True` replaces them, which the runtime's module fingerprint sees.
- Only hooks on the wrapper and its own `named_modules`: the UNet and diffusers' classes are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

INNER = "unet"  # the attribute FRDiffUNet keeps the wrapped UNet under


def _rename(mapping: dict, old: str, new: str, keep: str | None = None) -> None:
    """Move every key starting with `old` to start with `new` instead, in order; skip keys starting with
    `keep` (already spelled the target way)."""
    for key in [k for k in mapping if k.startswith(old) and not (keep and k.startswith(keep))]:
        mapping[new + key[len(old):]] = mapping.pop(key)


def _drop_inner_level(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # Post-hook: the wrapper's entries were all added during this call, so they sit at the end of
    # `state_dict`; popping and re-adding them in order keeps the UNet's order.
    inner = prefix + INNER
    _rename(state_dict, inner + ".", prefix)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # torch names a module's metadata by its prefix without the dot; the UNet's version replaces the
        # wrapper's own entry, since it is the UNet's modules that loading converts.
        if inner in metadata:
            metadata[prefix[:-1]] = metadata.pop(inner)
        _rename(metadata, inner + ".", prefix)


def _add_inner_level(
    module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    inner = prefix + INNER
    _rename(state_dict, prefix, inner + ".", keep=inner + ".")
    metadata = getattr(state_dict, "_metadata", None)  # only the root call's dict carries it
    if metadata is not None:
        for name in list(metadata):
            if name == inner or name.startswith(inner + "."):
                continue  # the wrapper's own spelling
            if name == prefix[:-1]:
                metadata.setdefault(inner, metadata[name])
            elif name.startswith(prefix):
                metadata.setdefault(inner + "." + name[len(prefix):], metadata[name])
    module._state_keys_prefixes.append(prefix)  # for the post-hook, which torch does not tell the prefix


def _report_stock_keys(module: torch.nn.Module, incompatible_keys) -> None:  # noqa: ANN001 - torch's NamedTuple
    prefix = module._state_keys_prefixes.pop() if module._state_keys_prefixes else ""
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(prefix + INNER + "."):] if k.startswith(prefix + INNER + ".") else k for k in keys]


def install(module: torch.nn.Module) -> None:
    """Register the hooks on `module`, the wrapper whose submodule `INNER` is the UNet."""
    module._state_keys_prefixes = []
    module.register_state_dict_post_hook(_drop_inner_level)
    module.register_load_state_dict_pre_hook(_add_inner_level)
    module.register_load_state_dict_post_hook(_report_stock_keys)


def named_modules(
    wrapper: torch.nn.Module, memo: set | None, prefix: str, remove_duplicate: bool,
) -> Iterator[tuple[str, torch.nn.Module]]:
    """`wrapper.named_modules` with the UNet's paths: the wrapper, then the UNet's modules at the same prefix."""
    if memo is None:
        memo = set()
    if not remove_duplicate or wrapper not in memo:
        if remove_duplicate:
            memo.add(wrapper)
        yield prefix, wrapper
    yield from wrapper._modules[INNER].named_modules(memo, prefix, remove_duplicate)
