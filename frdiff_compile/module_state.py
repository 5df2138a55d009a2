"""What the captured graphs bake in from a UNet beyond its tensor values (and from the process's numerics
flags), as one comparable fingerprint.

`FRDiffUNet` takes `module_snapshot(unet)` (the fingerprint, and the tensors' addresses) at every
generation's start and never serves a step from graphs built under another fingerprint, so no output
comes from module state that has since changed (a first step replayed while the snapshot is read is
dropped if it differs: `FRDiffUNet._first_step_ahead`). Replaced parameters drop every graph pair; a change
of the other settings (`Fingerprint.settings`) switches to the pairs built under the new ones, keeping the
old for a switch back.
Where the tensors live is tracked apart from it (`tensor_placement`): parameters that only moved to new
storage of the same dtype, device and layout keep the graphs (see `placement.GraphPlacement`). A
tensor subclass that keeps its data in inner tensors (torchao's quantized weights) is tracked by theirs.

Invariants:
- Host metadata only: identities and plain Python values (and, for `tensor_placement`, storage addresses
  and layouts); no device tensor's value is read (only CPU scalars'), so taking either never syncs a device.
- Anything held by reference is either kept alive by the fingerprint itself (processor objects) or by the
  graphs (parameters), so an id can never be reused by a new object while it is compared against.
- What it covers (the values are read by `module_values.py`):
    - The identity of every parameter: a replaced Parameter (adapters loaded, load_state_dict(assign=True))
      would leave the graphs reading the old one, which they hold (so its id stays taken). A swapped
      `.data` (a "safe" LoRA fuse, `.to()`) keeps the identity: the graphs read the Parameter's current
      tensor at every call, and only its address is baked into CUDA graphs (`tensor_placement`).
    - The attention processor objects themselves (held here, so a new one can never reuse an old one's
      id) and the plain Python values and tensors they keep: `set_attn_processor`, attention slicing and
      IP-Adapter swap them, `set_ip_adapter_scale` changes their `scale`, a custom processor gets new mask
      tensors, and capture traced through the old ones.
    - Tensors kept outside parameters and buffers (by a processor or a module), which the export lifted as
      constants the graphs hold: by identity, as the graphs read them live, and a one-element CPU tensor by
      value too. The graphs hold them, so their ids stay taken.
    - Every module's plain values (numbers, strings and flags, tuples of them, and functions), which its
      forward reads as Python values when it is traced: `padding_mode = "circular"` set on the convolutions
      (seamless tiling), their `dilation` and `padding` (ScaleCrafter re-dilates them), an Attention
      module's `rescale_output_factor`, FreeU's factors on the up blocks (`enable_freeu` / `disable_freeu`),
      the training flags, a chunked feed-forward's `_chunk_size`.
    - Every diffusers module's config (`config_state`): the UNet's forward reads `self.config.X` as Python
      values (`center_input_sample`), which `register_to_config` or an attribute set on the config changes.
    - Every module's class: patches that swap it (tomesd's token merging sets `module.__class__`) change
      what the module computes with no parameter, processor or hook changed. And the classes' code: the
      functions, properties and class methods each class of a module or processor defines (or inherits,
      up to but not including `torch.nn.Module`), so that a patched class (`BasicTransformerBlock.forward
      = ...`, `Conv2d._conv_forward = ...`) counts as a change too.
    - What that code finds under the module globals it looks up (`code_reads.py`): a rebound
      `F.scaled_dot_product_attention` or diffusers function. One level deep: a function such a global
      names is tracked by identity, but the globals it reads in turn are not.
    - The process's numerics flags (`numerics.numerics_settings`: TF32 and each backend's fp32 precision,
      cuBLAS's reduced-precision and fp16-accumulation flags and preferred library, deterministic
      algorithms, cuDNN's switches, SDPA's backends), which the kernels a graph compiles or captures keep.
    - Every PEFT adapter layer's state (LoRA scales, active, disabled and merged adapters), which
      `set_adapters`, `disable_adapters`, `fuse_lora` and the like change without touching a tensor. A
      scale that is a tensor (LoRA hotswap) counts by identity, since the graphs read it live, and by
      value too where it is a CPU scalar beside device weights, which CUDA graphs bake in.
    - Forward hooks on the UNet's modules (`Fingerprint.hooks`): accelerate's (sequential CPU offload, a
      `device_map`) move weights inside the forward, diffusers' own (group offloading, layerwise casting,
      FasterCache, FirstBlockCache, ...) change what it computes from call to call, and torch's
      (`register_forward_hook` / `register_forward_pre_hook`, on a module or for all modules) read or
      replace a module's inputs and outputs: SAG's pipeline records the mid block's output size with one.
      A `forward` set on a module instance by anything else (DeepCache's helper) counts too. A captured
      graph runs none of them, so the runtime serves no call while any is attached.
"""

from __future__ import annotations

import dataclasses
import types
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .code_reads import CodeReads, GlobalValues
from .module_values import ValueReader, adapter_state, config_state, processor_state
from .numerics import numerics_key

_CODE_TYPES = (types.FunctionType, property, classmethod, staticmethod)


def _add_code(kind: type, seen: set[type], code: list) -> None:
    """Appends the functions (and properties, class and static methods) of each class in `kind`'s MRO not
    `seen` yet, by identity: a class patched after capture keeps its identity and changes these."""
    for klass in kind.__mro__:
        if klass not in seen:
            seen.add(klass)
            code.append((klass, tuple([v for v in vars(klass).values() if isinstance(v, _CODE_TYPES)])))

class Fingerprint(NamedTuple):
    parameters: tuple
    processors: tuple
    adapters: tuple
    values: tuple  # every module's plain values, in the walk's order
    configs: tuple  # the configs of the modules that keep one (diffusers' ConfigMixin), in the walk's order
    hooks: tuple[str, ...]  # "<module class>: <hook>" for every forward hook on the UNet's modules
    classes: tuple[type, ...]  # every module's class, in the walk's order
    code: tuple  # (class, its functions) for the classes of the modules and processors, and their bases
    globals: GlobalValues  # what those functions find under the module globals they look up (code_reads.py)
    numerics: tuple  # `numerics.numerics_key()`

    @property
    def settings(self) -> tuple:
        """All but the parameters' identities: state that can change and change back (FreeU off and on,
        adapters switched, processors restored) with graphs built under each setting valid again."""
        return (self.processors, self.adapters, self.values, self.configs, self.hooks, self.classes, self.code,
                self.globals, self.numerics)


def _hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__  # a function, or a callable object


def _own_forward(module: torch.nn.Module, forward: object) -> bool:
    """Whether an instance's `forward` is its class's, bound to it: what accelerate and diffusers put back
    when they remove their hooks."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def _hooks(module: torch.nn.Module) -> list[str]:
    """The forward hooks attached to `module`: accelerate's (`_hf_hook`), diffusers' (`_diffusers_hook`),
    torch's own forward and forward-pre hooks, and any other `forward` set on the instance (DeepCache wraps
    the blocks' forwards so)."""
    state = module.__dict__
    found = []
    accelerate_hook = state.get("_hf_hook")
    if accelerate_hook is not None:
        found.append(type(accelerate_hook).__name__)
    registry = state.get("_diffusers_hook")
    found.extend(getattr(registry, "hooks", {}))  # an empty registry is what removing every hook leaves
    forward = state.get("forward")
    if forward is not None and accelerate_hook is None and registry is None and not _own_forward(module, forward):
        found.append(f"forward replaced by {_hook_name(forward)}")
    found.extend(f"forward pre-hook {_hook_name(h)}" for h in state.get("_forward_pre_hooks", {}).values())
    found.extend(f"forward hook {_hook_name(h)}" for h in state.get("_forward_hooks", {}).values())
    return [f"{type(module).__name__}: {name}" for name in found]


def _global_hooks() -> list[str]:
    """Hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook`)."""
    from torch.nn.modules import module as nn_module  # their tables have no public accessor

    found = [f"forward pre-hook {_hook_name(h)}" for h in nn_module._global_forward_pre_hooks.values()]
    found += [f"forward hook {_hook_name(h)}" for h in nn_module._global_forward_hooks.values()]
    return [f"every module: {name}" for name in found]


def describe_hooks(hooks: tuple[str, ...]) -> str:
    """`Fingerprint.hooks` for a message: the first three, and how many more."""
    return ", ".join(hooks[:3]) + (f" and {len(hooks) - 3} more" if len(hooks) > 3 else "")


def hooks_reason(hooks: tuple[str, ...]) -> str:
    """Why no graph serves calls while `hooks` (`Fingerprint.hooks`) are attached, for a message."""
    return (f"forward hooks are attached to the UNet's modules ({describe_hooks(hooks)}), which its graphs cannot "
            "run (sequential or group offload, layerwise casting, caching hooks, torch's register_forward_hook)")


_PARAMETER, _TENSOR = torch.nn.Parameter, torch.Tensor


def _add_addresses(t: torch.Tensor, out: list[int]) -> None:
    """Appends the storage addresses `t`'s values live at: its own, or its inner tensors' for a tensor
    subclass that keeps its data in them (torchao's quantized weights), whose own `data_ptr()` is 0.

    `.to()` moves such a parameter by `torch.utils.swap_tensors`: the same object, new inner tensors. With
    only the wrapper's address (0 before and after), a move that keeps dtype, device and layout (new storage
    in place) would go unseen, and CUDA graphs captured over the old inner tensors would replay reading freed
    memory; a move elsewhere changes `tensor_placement`'s layout, which is seen either way.
    """
    # Exact types first: the subclass check costs more, and nearly every tensor of a UNet is one of these two.
    if type(t) is _PARAMETER or type(t) is _TENSOR or not is_traceable_wrapper_subclass(t):
        out.append(t.data_ptr())
        return
    for name in t.__tensor_flatten__()[0]:
        inner = getattr(t, name)
        if inner is not None:  # torchao leaves optional parts (a zero point) None
            _add_addresses(inner, out)


def _walk(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of `unet` once, breadth first: what `unet.modules()` yields, in another order.

    The same order at every call, which is all that comparing two fingerprints or two address tuples needs.
    `modules()` recurses through one nested generator per tree level and builds every module's name; this
    list walk takes a third of its time (SD 1.5 on one CPU core: 0.26 against 0.75-0.80 ms).
    """
    found, seen = [unet], {id(unet)}
    for module in found:  # the list grows as it is read
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def module_snapshot(unet: torch.nn.Module, reads: CodeReads | None = None) -> tuple[Fingerprint, tuple[int, ...]]:
    """`unet`'s fingerprint (compare two with `==`) and its tensors' addresses (`tensor_addresses`).

    `reads` remembers which globals each class's code looks up; a runtime keeps one for its snapshots.

    One walk of the module tree for both: every generation's start takes both, on the host's critical path
    (diffusers' DDIM step reads a device value, `prev_timestep >= 0`, so the GPU has nothing queued while
    the host works). On one CPU core, three runs: SD 1.5 1.0-1.1 ms and SDXL 2.9-4.5 ms, against 2.8-5.5
    and 10.7-12.7 ms for the two walks this replaced. Reading the Attention modules' values and every
    module's class too took it from 0.56 to 0.74 ms (SD 1.5) and from 1.5 to 2.5 ms (SDXL; medians of
    9 x 10 calls on a meta-device UNet, 2026-11-27). Every module's values and the classes' code then took
    it from 0.74-0.84 to 1.35-1.75 ms (SD 1.5) and from 2.6-4.5 to 3.3-5.2 ms (SDXL; three runs each, the
    same way), once per generation, for seamless tiling and patched classes. Reading the globals the code
    looks up adds 0.07 ms to either; checking the modules' tuples (146 of SD 1.5's 709 modules keep some)
    took the median of five runs from 1.47 to 1.81 ms (SD 1.5) and from 4.3 to 5.0 ms (SDXL), 2026-11-27.
    Checking the types of the attributes a class's first module leaves untracked (so that its None cannot
    hide another module's value) took it from 1.84 to 1.95 ms (SD 1.5) and 3.9 to 4.0 ms (SDXL; three runs
    each, alternated). Reading the configs of the UNet and its Transformer2DModels (17 in SD 1.5, 465
    values) took it from 1.92-1.93 to 2.07-2.15 ms (SD 1.5; medians of five runs, two runs alternated), and
    the numerics flags add 0.03 ms.
    """
    params, processors, adapters, values, configs, hooks, addresses, classes = [], [], [], [], [], [], [], []
    code: list = []
    # What each module is, asked of its class (hasattr on an instance falls into nn.Module.__getattr__,
    # slow when it misses) and once per class: a missing class attribute still costs a walk of the MRO and
    # a caught AttributeError, which ~700 modules would pay again at every generation.
    kinds: dict[type, tuple[bool, bool, ValueReader]] = {}
    seen: set[type] = {object, torch.nn.Module}  # code read; never these two: patching them is global
    for module in _walk(unet):
        for parameter in module._parameters.values():
            if parameter is not None:
                params.append(id(parameter))
                _add_addresses(parameter, addresses)
        for buffer in module._buffers.values():  # loops, not generators: one generator per module costs more
            if buffer is not None:
                _add_addresses(buffer, addresses)
        kind = type(module)
        classes.append(kind)
        state = module.__dict__
        known = kinds.get(kind)
        if known is None:
            _add_code(kind, seen, code)
            known = kinds[kind] = (
                getattr(kind, "set_processor", None) is not None,
                getattr(kind, "adapter_layer_names", None) is not None,  # peft's BaseTunerLayer, duck-typed
                ValueReader.of(state),
            )
        has_processor, is_adapter, reader = known
        values.append(reader.read(module))
        config = state.get("_internal_dict")
        if config is not None:
            configs.append(config_state(config))
        if has_processor:  # the processor object, and the values it keeps (an IP-Adapter's `scale`)
            processor = module.processor
            processors.append((processor, processor_state(processor)))
            if type(processor) not in seen:
                _add_code(type(processor), seen, code)
        if is_adapter:
            adapters.append(adapter_state(module))
        if state["_forward_hooks"] or state["_forward_pre_hooks"] or "forward" in state or "_hf_hook" in state \
                or "_diffusers_hook" in state:
            hooks.extend(_hooks(module))
    hooks += _global_hooks()
    fingerprint = Fingerprint(tuple(params), tuple(processors), tuple(adapters), tuple(values), tuple(configs),
                              tuple(hooks), tuple(classes), tuple(code),
                              (reads if reads is not None else CodeReads()).read(code),
                              numerics_key())
    return fingerprint, tuple(addresses)


def module_fingerprint(unet: torch.nn.Module, reads: CodeReads | None = None) -> Fingerprint:
    """The fingerprint of `unet`'s graph-relevant state; compare two with `==`."""
    return module_snapshot(unet, reads)[0]


@dataclasses.dataclass(frozen=True)
class TensorPlacement:
    """Where a UNet's parameters and buffers live, module by module (shared tensors once per module).

    `layout` is what compiled graphs specialize on (dtype, device, shape, stride); `addresses` is what only
    CUDA graphs bake in.
    """

    addresses: tuple[int, ...]
    layout: tuple[tuple, ...]


def unet_tensors(unet: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `unet`, module by module (shared tensors once per module)."""
    # One walk of the module tree through each module's own tables: `parameters()` then `buffers()` walk it
    # twice, and this runs at every `.to()`, which accelerate's offload hook calls before every forward.
    # The order is `module_snapshot`'s, whose addresses are compared with these.
    tensors: list[torch.Tensor] = []
    for module in _walk(unet):
        tensors += module._parameters.values()
        tensors += module._buffers.values()
    return [t for t in tensors if t is not None]  # one filter, not two generators per module


def addresses_of(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """Where `tensors`' values live now (see `_add_addresses`): no module walk, for a list kept from one."""
    found: list[int] = []
    for t in tensors:
        _add_addresses(t, found)
    return tuple(found)


def tensor_addresses(unet: torch.nn.Module) -> tuple[int, ...]:
    """The cheap half of `tensor_placement`: enough to tell whether anything moved."""
    return addresses_of(unet_tensors(unet))


def tensor_placement(unet: torch.nn.Module, tensors: list[torch.Tensor] | None = None) -> TensorPlacement:
    """`unet`'s placement; `tensors`: `unet_tensors(unet)` when the caller took them already."""
    tensors = unet_tensors(unet) if tensors is None else tensors
    return TensorPlacement(
        addresses=addresses_of(tensors),
        layout=tuple((t.dtype, t.device, tuple(t.shape), t.stride()) for t in tensors),
    )
