"""Module state the captured graphs bake in: changing it after a capture must rebuild, never replay stale graphs.

What `frdiff_compile/module_state.py` fingerprints, each through the public path users take: parameters
replaced or moved to new storage, FreeU, attention processors and their Python values, PEFT LoRA adapters,
forward hooks of accelerate, diffusers and torch, and attention processors that record state. Other modules'
values, classes and tensors: `test_module_values.py`; the globals the code reads: `test_code_reads.py`.
"""

import copy

import pytest
import torch
from conftest import make_unet, needs_unet_method, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig, UnsupportedModelError
from frdiff_compile.module_state import module_fingerprint

# One layer per block: these tests capture again and again (export is most of their time), and what they
# check (module state the capture reads) does not depend on the depth.


def test_snapshot_sees_every_module_once_including_shared_ones():
    """`module_snapshot` walks the tree its own way (not `modules()`): it must see exactly what torch sees."""
    from frdiff_compile.module_state import module_snapshot, tensor_addresses

    unet = make_unet("sd15", layers_per_block=1)
    unet.down_blocks[1].shared = unet.down_blocks[0].resnets[0]  # a module reachable twice: counted once
    fingerprint, addresses = module_snapshot(unet)
    assert sorted(fingerprint.parameters) == sorted(id(p) for p in unet.parameters())
    tensors = [*unet.parameters(), *unet.buffers()]
    assert sorted(addresses) == sorted(t.data_ptr() for t in tensors) == sorted(tensor_addresses(unet))
    assert len(fingerprint.processors) == len(unet.attn_processors)
    assert module_snapshot(unet) == (fingerprint, addresses)  # the same order at every call


def test_replaced_parameters_rebuild_and_in_place_updates_are_read_live():
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 6)  # noqa: E731
    reference = lambda: sample(optimized_fn(frdiff_compile.optimize(unet), cond), scheduler("sd15"), 6)  # noqa: E731
    run()
    conv = unet.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        conv.weight.mul_(1.5)  # in place (a plain LoRA fuse): same storage, the graphs read it
    assert torch.equal(run(), reference()) and fr.stats.captures == 1
    # New storage behind the same Parameter (a "safe" fuse): the graphs read each Parameter at every call,
    # so they are kept (CUDA graphs, which bake addresses, are captured again: test_cuda_runtime.py).
    conv.weight.data = conv.weight.data * 0.5
    assert torch.equal(run(), reference()) and fr.stats.captures == 1 and fr.stats.relinks == 1
    conv.weight = torch.nn.Parameter(conv.weight.detach() + 0.01)  # a new Parameter (adapters loaded)
    assert torch.equal(run(), reference()) and fr.stats.captures == 2


def test_freeu_and_attention_processor_changes_rebuild():
    """Settings the capture read as Python values: changing them must rebuild, never replay stale graphs;
    changing them back serves the graphs built under them before."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet
    stock = lambda: sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), 4)  # noqa: E731
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 4)  # noqa: E731
    run()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with_freeu = stock()
    assert torch.equal(run(), with_freeu) and fr.stats.captures == 2
    unet.disable_freeu()
    without = stock()
    assert torch.equal(run(), without) and not torch.equal(without, with_freeu) and fr.stats.captures == 2
    # Only the current settings' pair holds buffers; the FreeU pair's are made again when it is used again.
    assert [entry.allocated for entry in fr.graph_entries()] == [False, True]
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert torch.equal(run(), with_freeu) and fr.stats.captures == 2, "switched back: the FreeU graphs serve"
    unet.disable_freeu()
    unet.set_attn_processor(AttnProcessor())  # the classic processor instead of SDPA: same math, new objects
    assert torch.equal(run(), stock()) and fr.stats.captures == 3
    run()
    assert fr.stats.captures == 3, "nothing changed: the graphs must be kept"

    class Scaled(AttnProcessor):  # keeps a Python value its forward reads, as IP-Adapter's `scale`
        def __init__(self):
            self.scale = [1.0]

        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) * self.scale[0]

    unet.set_attn_processor(Scaled())
    assert torch.equal(run(), stock()) and fr.stats.captures == 4
    for processor in unet.attn_processors.values():
        processor.scale[0] = 0.5  # in place: harder to see than the new list set_ip_adapter_scale assigns
    assert torch.equal(run(), stock()) and fr.stats.captures == 5


def test_lora_adapter_changes_rebuild():
    """PEFT LoRA (diffusers' add_adapter / set_adapters): scales and switches are Python state the capture read;
    a state seen before is served by the graphs built under it."""
    from peft import LoraConfig

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(lora, adapter_name="style")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet
    stock = lambda: sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), 4)  # noqa: E731
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 4)  # noqa: E731
    outputs = [run()]
    assert torch.equal(outputs[0], stock())
    changes = (lambda: unet.set_adapters(["style"], [0.3]), unet.disable_adapters, unet.enable_adapters,
               lambda: unet.set_adapters(["style"], [1.0]))
    for change in changes:
        change()
        outputs.append(run())
        assert torch.equal(outputs[-1], stock())
    # Enabled again at 0.3 is the state set_adapters made, and 1.0 the first one: no capture for either.
    assert fr.stats.captures == 3
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[3], outputs[1]) and torch.equal(outputs[4], outputs[0])


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA for the tiny UNet in PEFT's keys, as `load_lora_adapter` takes it."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = make_unet("sd15", layers_per_block=1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), "x")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return get_peft_model_state_dict(unet, adapter_name="x")


def load_lora(unet, seed: int, alpha: int, **kwargs) -> None:
    """`load_lora_adapter` of a random rank-4 LoRA as adapter "a" (kwargs: hotswap=True)."""
    unet.load_lora_adapter(_lora_state_dict(seed), prefix=None, adapter_name="a",
                           metadata={"r": 4, "lora_alpha": alpha, "target_modules": LORA_TARGETS}, **kwargs)


def lora_layers(unet) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of `unet` (those with a `scaling` dict)."""
    return [m for m in unet.modules() if isinstance(getattr(m, "scaling", None), dict)]


@needs_unet_method("enable_lora_hotswap", "0.33")
def test_lora_hotswap_keeps_the_graphs_and_a_scale_that_rewrites_scalings_is_refused():
    """diffusers' LoRA hotswap (`enable_lora_hotswap`, then `load_lora_adapter(..., hotswap=True)`): the new
    adapter's weights are copied into the old ones and its scale filled into PEFT's scaling tensors, both
    read live by the graphs. A LoRA scale in cross_attention_kwargs rewrites those tensors at every call (in
    place, then replaced by new ones), which a graph cannot repeat: those calls run the eager UNet, the export
    leaves the scalings as it found them (it had halved them for good, and the graph halved them at every
    step), and the graphs over the replaced tensors are not run again."""
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    unet.enable_lora_hotswap(target_rank=8)
    load_lora(unet, 1, 4)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet

    def run(model, kwargs=None):
        return sample(lambda i, n, x, t: model(x, t, **cond, cross_attention_kwargs=kwargs).sample,
                      scheduler("sd15"), 4)

    def scalings():
        return [m.scaling["a"] for m in lora_layers(unet)]

    first = run(fr)
    assert torch.equal(first, run(unet))
    load_lora(unet, 2, 8, hotswap=True)
    assert scalings() and all(isinstance(s, torch.Tensor) and s.item() == 2.0 for s in scalings())
    swapped = run(fr)
    assert torch.equal(swapped, run(unet)) and not torch.equal(swapped, first)
    assert fr.stats.captures == 1 and fr.stats.eager_calls == 0, fr.stats
    with pytest.warns(UserWarning, match="writes module state") as caught:
        scaled = run(fr, {"scale": 0.5})
    assert len([w for w in caught if "frdiff_compile" in str(w.message)]) == 1
    assert {s.item() for s in scalings()} == {2.0}
    assert torch.equal(scaled, run(unet, {"scale": 0.5})) and fr.stats.eager_calls == 4, fr.stats
    # PEFT's scaled calls left new scaling tensors behind (and the old ones halved): new graphs read them.
    assert torch.equal(run(fr), swapped) and fr.stats.captures == 2, fr.stats
    # Tensor scalings count by identity: an equal-valued new tensor is one the graphs do not read.
    layer = lora_layers(unet)[0]
    before = module_fingerprint(unet)
    layer.scaling["a"] = layer.scaling["a"].clone()
    assert module_fingerprint(unet) != before


@needs_unet_method("enable_lora_hotswap", "0.33")
def test_a_cpu_scaling_beside_device_weights_counts_by_value():
    """Hotswap enabled before `pipe.to("cuda")` leaves PEFT's scaling tensors on the CPU (`.to()` moves only
    parameters and buffers). CUDA kernels take a CPU scalar's value at launch, so a CUDA graph keeps the
    value it was captured with: a hotswap's `fill_` must change the fingerprint then, and only then. Weights
    on the meta device stand in for the GPU."""
    unet = make_unet("sd15", layers_per_block=1)
    unet.enable_lora_hotswap(target_rank=8)
    load_lora(unet, 1, 4)
    layer = lora_layers(unet)[0]
    before = module_fingerprint(unet)
    layer.scaling["a"].fill_(3.0)  # beside CPU weights: read live wherever the graphs run
    assert module_fingerprint(unet) == before
    unet.to("meta")
    assert layer.scaling["a"].device.type == "cpu" and layer.base_layer.weight.device.type == "meta"
    before = module_fingerprint(unet)
    layer.scaling["a"].fill_(4.0)
    assert module_fingerprint(unet) != before


@needs_unet_method("enable_lora_hotswap", "0.33")
def test_lora_hotswap_scalings_made_under_inference_mode_keep_the_graphs():
    """An adapter loaded under `torch.inference_mode()` leaves inference tensors, which keep no version
    counter: the capture's write check compares their bits instead (reading the counter raised, and every
    capture would have failed)."""
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    unet.enable_lora_hotswap(target_rank=8)
    with torch.inference_mode():
        load_lora(unet, 1, 8)
    scalings = [m.scaling["a"] for m in lora_layers(unet)]
    assert scalings and all(s.is_inference() for s in scalings)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet

    @torch.inference_mode()
    def run(model, kwargs=None):
        return sample(lambda i, n, x, t: model(x, t, **cond, cross_attention_kwargs=kwargs).sample,
                      scheduler("sd15"), 4)

    plain = run(fr)
    assert torch.equal(plain, run(unet)) and fr.stats.captures == 1 and fr.stats.eager_calls == 0, fr.stats
    with pytest.warns(UserWarning, match="writes module state"):
        scaled = run(fr, {"scale": 0.5})
    assert torch.equal(scaled, run(unet, {"scale": 0.5})) and fr.stats.eager_calls == 4, fr.stats
    current = [m.scaling["a"] for m in lora_layers(unet)]
    assert {s.item() for s in current} == {2.0}


def test_lora_scale_in_cross_attention_kwargs_is_served_by_the_graphs():
    """pipe(..., cross_attention_kwargs={"scale": s}): diffusers scales the LoRA layers by a Python float for
    the call, so each scale is captured as a graph pair of its own; a scale of 1 is diffusers' no-op.

    alpha/r = 1.7 and scale 0.3: PEFT scales and unscales by multiplying and dividing, 1.7 * 0.3 / 0.3 is
    1.7000000000000002, and an eager call leaves that drift in the layer. Were the capture to leave it, the
    fingerprint would differ at the next generation and the graphs would rebuild every time (the last 0.3
    generation checks they do not)."""
    from peft import LoraConfig

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    lora = LoraConfig(r=10, lora_alpha=17, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(lora, adapter_name="style")
    twin = copy.deepcopy(unet)  # the eager reference: its own calls leave the drift in its own layers
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet

    def stock(kwargs):
        return sample(lambda i, n, x, t: twin(x, t, **cond, cross_attention_kwargs=kwargs).sample,
                      scheduler("sd15"), 4)

    outputs = {}
    for scale, captures in ((0.3, 1), (None, 2), (1.0, 2), (1, 2), (0.3, 2)):
        kwargs = None if scale is None else {"scale": scale}
        got = sample(lambda i, n, x, t: fr(x, t, **cond, cross_attention_kwargs=kwargs).sample, scheduler("sd15"), 4)
        assert torch.equal(got, stock(kwargs)), scale
        assert fr.stats.captures == captures and fr.stats.eager_calls == 0, (scale, fr.stats)
        outputs[scale] = got
    assert not torch.equal(outputs[0.3], outputs[None])


@needs_unet_method("enable_layerwise_casting", "0.33")
def test_forward_hooks_of_other_libraries_are_refused_at_optimize_and_run_eagerly_later():
    """Hooks that move or recast weights inside the forward (offload, layerwise casting) or change what it
    computes per call (diffusers' caches) are Python a captured graph never runs: no call may use graphs."""
    from accelerate import cpu_offload_with_hook

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 4)  # noqa: E731
    stock = lambda: sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), 4)  # noqa: E731
    run()
    unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"forward hooks are attached .*layerwise_casting"):
        got = run()
    assert torch.equal(got, stock()) and fr.stats.eager_calls == 4 and fr.stats.captures == 1, fr.stats
    with pytest.raises(UnsupportedModelError, match=r"layerwise_casting and \d+ more.*optimize first"):
        frdiff_compile.optimize(unet)
    # Model CPU offload enabled before optimize: the hook sits on the UNet the graphs would bypass.
    other = make_unet("sd15", layers_per_block=1)
    cpu_offload_with_hook(other, "cpu")
    with pytest.raises(UnsupportedModelError, match=r"UNet2DConditionModel: CpuOffload\).*enable_model_cpu_offload"):
        frdiff_compile.optimize(other)


def test_torch_hooks_run_the_eager_unet_while_attached():
    """A torch forward hook on a UNet module (SAG's pipeline records the mid block's output size with one),
    or a replaced forward, runs only in the eager UNet: while one is attached no call uses graphs, and one
    there at optimize is refused. Before, the graphs served such calls and the hook never ran."""
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 4)  # noqa: E731
    run()
    seen = []
    handle = unet.mid_block.attentions[0].register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    with pytest.warns(UserWarning, match=r"forward hooks .*Transformer2DModel: forward hook .*<lambda>"):
        run()
    assert len(seen) == 4 and fr.stats.eager_calls == 4, fr.stats
    handle.remove()
    run()
    assert fr.stats.eager_calls == 4 and fr.stats.full_calls == 8 and fr.stats.captures == 1, fr.stats
    # A forward set on a module instance (DeepCache's helper wraps the blocks so) is a hook too; the bound
    # original, which accelerate and diffusers set back when they remove their hooks, is not.
    original = unet.mid_block.forward
    unet.mid_block.forward = lambda *args, **kwargs: original(*args, **kwargs)
    with pytest.warns(UserWarning, match=r"UNetMidBlock2DCrossAttn: forward replaced by .*<lambda>"):
        run()
    unet.mid_block.forward = original
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    add_hook_to_module(unet.conv_in, ModelHook())
    assert module_fingerprint(unet).hooks == ("Conv2d: ModelHook",)
    remove_hook_from_module(unet.conv_in)
    assert "forward" in vars(unet.conv_in) and module_fingerprint(unet).hooks == ()
    run()
    assert fr.stats.eager_calls == 8 and fr.stats.full_calls == 12 and fr.stats.captures == 1, fr.stats
    handle = unet.conv_in.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(UnsupportedModelError, match=r"Conv2d: forward pre-hook .*<lambda>.*handle.remove"):
        frdiff_compile.optimize(unet)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)  # global
    try:
        (hook,) = module_fingerprint(unet).hooks
        assert hook.startswith("every module: forward hook ") and hook.endswith("<lambda>"), hook
    finally:
        handle.remove()


def test_a_processor_that_records_attention_maps_is_refused_and_left_as_it_was():
    """SAG's store processor sets `attention_probs` at every call for its pipeline to read. A capture ran it
    once, with fake tensors, and the graphs never again: the capture is refused, and what it set put back."""
    from diffusers.models.attention_processor import AttnProcessor

    class Recording(AttnProcessor):
        def __init__(self):
            self.attention_probs, self.maps = None, []

        def __call__(self, attn, hidden_states, *args, **kwargs):
            self.attention_probs = hidden_states.mean()
            self.maps.append(self.attention_probs)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    recording = Recording()
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor = recording
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    with pytest.warns(UserWarning, match=r"attn1.processor.attention_probs \(Recording\) and 1 more.*SAG"):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), 4)
    assert fr.stats.capture_failures == 1 and fr.stats.eager_calls == 4, fr.stats
    # The eager calls recorded real tensors, and nothing of the export's was left behind.
    assert len(recording.maps) == 4 and all(type(t) is torch.Tensor for t in recording.maps)
    assert recording.attention_probs is recording.maps[-1]
    recording.maps.clear()
    assert torch.equal(got, sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), 4))


def test_graphs_of_other_settings_stay_until_evicted_then_their_settings_are_let_go():
    """The LRU keeps pairs built under earlier module settings for a switch back, and holds a settings tuple
    (and the processor objects it names) only while a pair built under it is kept."""
    import gc
    import weakref

    from frdiff_compile.graph_lru import GraphLRU

    class Processor:
        pass

    lru = GraphLRU(2)
    first, second = Processor(), Processor()
    first_alive = weakref.ref(first)
    lru.use_settings((first,))
    lru.put("shape", "built under first")
    lru.use_settings((second,))
    assert lru.get("shape") is None
    lru.put("shape", "built under second")
    lru.use_settings((first,))
    assert lru.get("shape") == "built under first"
    lru.use_settings((second,))
    assert lru.get("shape") == "built under second"
    lru.put("other shape", "built under second")  # capacity 2: evicts the pair built under `first`
    assert len(lru) == 2
    del first
    gc.collect()
    assert first_alive() is None
    lru.use_settings((Processor(),))
    assert lru.get("shape") is None
