"""Module state the captured graphs bake in: changing it after a capture must rebuild, never replay stale graphs.

What `frdiff_compile/module_state.py` fingerprints, each through the public path users take: parameters
replaced or moved to new storage, FreeU, attention processors and their Python values, PEFT LoRA adapters,
and forward hooks of accelerate and diffusers.
"""

import copy

import pytest
import torch
from conftest import make_unet, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig, UnsupportedModelError

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
    with pytest.warns(UserWarning, match=r"forward hooks of accelerate or diffusers .*layerwise_casting"):
        got = run()
    assert torch.equal(got, stock()) and fr.stats.eager_calls == 4 and fr.stats.captures == 1, fr.stats
    with pytest.raises(UnsupportedModelError, match=r"layerwise_casting and \d+ more.*optimize first"):
        frdiff_compile.optimize(unet)
    # Model CPU offload enabled before optimize: the hook sits on the UNet the graphs would bypass.
    other = make_unet("sd15", layers_per_block=1)
    cpu_offload_with_hook(other, "cpu")
    with pytest.raises(UnsupportedModelError, match=r"UNet2DConditionModel: CpuOffload\).*enable_model_cpu_offload"):
        frdiff_compile.optimize(other)


def test_graphs_of_other_settings_stay_until_evicted_then_their_settings_are_let_go():
    """The LRU keeps pairs built under earlier module settings for a switch back, and holds a settings tuple
    (and the processor objects it names) only while a pair built under it is kept."""
    import gc
    import weakref

    from frdiff_compile.graph_cache import GraphLRU

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
