"""`UNetWrapper`: a module that stands in for the diffusers UNet it holds, as torch.compile's wrapper does.

Invariants:
- The UNet is the submodule `unet`, so parameter names and state-dict keys carry the "unet." level (as
  torch.compile's carry "_orig_mod."); `load_state_dict` also takes a stock UNet's keys, in place.
- Attribute reads the wrapper does not answer itself (`config`, `dtype`, `device`, `add_embedding`, ...) go
  to the UNet, and so do assignments and deletions of the UNet's public attributes (`encoder_hid_proj`).
  Private names (accelerate's `_hf_hook` on the module it wraps) and names new to both stay on the wrapper.
"""

from __future__ import annotations

from typing import Any

import torch


def _accept_stock_keys(module: torch.nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a stock UNet checkpoint ("conv_in.weight") loads as "unet.conv_in.weight".

    Only loading is lenient. Names stay the wrapper's everywhere else (`state_dict`, `named_parameters`),
    since tools pair the two: accelerate's offload hooks look up `state_dict()` entries by `named_children`
    paths. The UNet has no submodule named `unet`, so the two spellings never collide.
    """
    inner = prefix + "unet."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)  # in order: popped and re-added in turn
    metadata = getattr(state_dict, "_metadata", None)  # module versions; only the root call's dict has it
    if metadata is not None:
        for name in list(metadata):  # named by module prefix without the dot: the UNet itself is "unet"
            if name == inner[:-1] or name.startswith(inner):
                continue  # already the wrapper's spelling
            if name == prefix[:-1]:
                metadata.setdefault(inner[:-1], metadata[name])
            elif name.startswith(prefix):
                metadata.setdefault(inner + name[len(prefix):], metadata[name])


class UNetWrapper(torch.nn.Module):
    """Holds `unet` and passes attribute reads, and assignments to the UNet's public attributes, to it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.register_load_state_dict_pre_hook(_accept_stock_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def _forwarded(self, name: str) -> bool:
        """Whether an assignment to `name` belongs to the wrapped UNet, as torch.compile's wrapper decides.

        diffusers' pipelines assign to `pipe.unet.<attr>` (`unload_ip_adapter` sets `encoder_hid_proj`, Kolors
        `text_encoder_hid_proj`): kept on the wrapper, the value would shadow the UNet's own, which the UNet
        goes on using (the unloaded projection stayed loaded, and a reloaded one read as None). So a public
        name the UNet has and the wrapper does not is the UNet's; private names (accelerate's `_hf_hook` and
        `_old_forward` on the module it wraps) and new names stay here.
        """
        modules = self.__dict__.get("_modules")
        if name.startswith("_") or modules is None or "unet" not in modules or name in self.__dict__:
            return False
        if name in modules or name in self._parameters or name in self._buffers or hasattr(type(self), name):
            return False
        unet = modules["unet"]  # its own tables, not hasattr: ModelMixin's __getattr__ warns on config keys
        return (name in vars(unet) or name in unet._modules or name in unet._parameters or name in unet._buffers
                or hasattr(type(unet), name))

    def __setattr__(self, name: str, value: Any) -> None:
        if self._forwarded(name):
            setattr(self._modules["unet"], name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self._forwarded(name):
            delattr(self._modules["unet"], name)
        else:
            super().__delattr__(name)
