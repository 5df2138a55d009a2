"""UNets whose weights are tensor subclasses, as torchao's `quantize_` leaves them (diffusers' documented
recipe for speed pairs it with torch.compile): the graphs must compute what the quantized UNet computes, and
a move of the weights must be seen although such a weight's own `data_ptr()` is 0 wherever its data lives.

The move is what `.to()` does to such a weight: `torch.utils.swap_tensors`, the same Parameter object with new
inner tensors, which it refuses while anything holds a weak reference to the weight (the fake-tensor modes of a
trace or a cold compile did: `.to()` raised). CUDA graphs bake the inner tensors' addresses, so a move that
keeps dtype, device and layout, seen only by those addresses, would replay over freed memory if unseen; here (no
GPU) the emulated CUDA graphs re-run the graph, so the tests check that the runtime saw the move
(`stats.relinks`), which is what makes it capture again on a GPU (test_cuda_pipelines.py has the device's
version).
"""

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
from conftest import make_unet, max_rel_error, needs_unet_method, unet_inputs
from frdiff_reference import EagerFRDiff
from test_runtime import optimized_fn, sample, scheduler
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.module_state import module_snapshot, tensor_addresses

STEPS = 8


def move_subclass_weights(t: torch.Tensor) -> torch.Tensor:
    """For `Module._apply`: new storage for the subclass weights only, every other tensor left in place."""
    return t.clone() if is_traceable_wrapper_subclass(t) else t


def test_a_subclass_weight_moved_in_place_changes_the_addresses():
    """Without torchao: torch's own two-tensor subclass, on one convolution."""
    from torch.testing._internal.two_tensor import TwoTensor

    unet = make_unet("sd15", layers_per_block=1)
    conv = unet.conv_in
    weight = conv.weight.detach()
    conv.weight = torch.nn.Parameter(TwoTensor(weight, weight.clone()), requires_grad=False)
    assert conv.weight.data_ptr() == 0  # why the wrapper's own address says nothing
    before, kept = tensor_addresses(unet), conv.weight
    unet._apply(move_subclass_weights)
    assert conv.weight is kept  # swapped in place, as `.to()` does
    after = tensor_addresses(unet)
    tensors = len([*unet.parameters(), *unet.buffers()])
    assert len(after) == len(before) == tensors + 1  # the subclass weight by its two inner tensors
    assert after != before
    assert module_snapshot(unet)[1] == after  # the generation-start check sees the same addresses


def _quantized_unet(config: str) -> torch.nn.Module:
    """A tiny SD 1.5-shaped UNet quantized by torchao's `quantize_` under the config class named `config`."""
    quantization = pytest.importorskip("torchao.quantization", reason="torchao (the test extra) is not installed")
    unet = make_unet("sd15", layers_per_block=1)
    quantization.quantize_(unet, getattr(quantization, config)())
    weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert is_traceable_wrapper_subclass(weight), type(weight)  # quantize_ did quantize the Linear layers
    return unet


# Weights only, and weights with the activations quantized at every call (int8 matrix products).
@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"])
def test_quantized_unet_matches_stock_and_the_eager_reference(config):
    unet = _quantized_unet(config)
    cond = unet_inputs("sd15")
    stock = sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)
    exact = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    assert torch.equal(sample(optimized_fn(exact, cond), scheduler("sd15"), STEPS), stock)
    reference = EagerFRDiff(unet, interval=2)
    try:
        expected = sample(lambda i, n, x, t: reference.step(i, n, x, t, **cond), scheduler("sd15"), STEPS)
    finally:
        reference.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))
    got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert fr.stats.reuse_calls > 0 and fr.stats.eager_calls == 0, fr.stats
    err = max_rel_error(got, expected)
    assert err < 1e-5, f"M=2 on the {config} UNet differs from the eager FRDiff reference by {err:.2e} (relative)"


def test_int8_weight_only_compiled_graphs_match_and_a_move_of_the_weights_is_seen():
    int8_unet = _quantized_unet("Int8WeightOnlyConfig")
    cond = unet_inputs("sd15")
    eager = frdiff_compile.optimize(int8_unet)
    fr = frdiff_compile.optimize(int8_unet, FRDiffConfig(compile=True))
    fr.graph_backend_override = "emulate"  # the CUDA-graph buffer discipline, on CPU
    run = lambda runtime: sample(optimized_fn(runtime, cond), scheduler("sd15"), STEPS)  # noqa: E731
    expected = run(eager)
    # Compiled cold: a hit in inductor's caches makes no fake tensors, so it would not show what a cold
    # compile leaves holding the weights (weak references, which `.to()` of a subclass weight refuses).
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = run(fr)
    err = max_rel_error(got, expected)
    assert err < 1e-4, f"compiled graphs on the int8 UNet differ from the eager graphs by {err:.2e} (relative)"
    assert fr.stats.compiles == 2 and fr.stats.relinks == 0, fr.stats
    fr._apply(move_subclass_weights)
    err = max_rel_error(run(fr), expected)
    assert fr.stats.relinks == 1 and fr.stats.compiles == 2 and fr.stats.captures == 1, fr.stats
    assert err < 1e-4, f"after the move: {err:.2e}"


def test_no_background_worker_is_started_for_quantized_weights(caplog):
    """A worker rebuilds the parameters as plain tensors from their shapes, which a subclass weight is not: it
    failed, with a warning, and the graph compiled here anyway. Now no worker starts, and the log says why."""
    unet = _quantized_unet("Int8WeightOnlyConfig")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, background_compile=True))
    with caplog.at_level("INFO", logger="frdiff_compile"):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert "tensor subclasses (Int8Tensor), which a worker cannot rebuild" in caplog.text
    assert "started ahead" not in caplog.text  # none spawned ahead of the export either
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert (fr.stats.background_compiles, fr.stats.background_failures, fr.stats.compiles) == (0, 0, 2), fr.stats
    expected = sample(optimized_fn(frdiff_compile.optimize(unet), cond), scheduler("sd15"), STEPS)
    assert max_rel_error(got, expected) < 1e-4


@needs_unet_method("load_lora_adapter", "0.32")
def test_a_lora_loaded_onto_the_quantized_unet_is_served_as_stock_serves_it():
    """PEFT wraps the quantized Linear layers (base weights int8, adapter weights plain): new graphs for the
    adapter and for its new scale, each equal to the quantized stock UNet at M=1."""
    pytest.importorskip("peft", reason="LoRA adapters need peft (the test extra)")
    from test_module_state import load_lora

    unet = _quantized_unet("Int8WeightOnlyConfig")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    stock = lambda: sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)  # noqa: E731
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)  # noqa: E731
    without = run()
    load_lora(unet, 1, 4)
    with_lora = run()
    assert torch.equal(with_lora, stock()) and max_rel_error(with_lora, without) > 1e-2
    unet.set_adapters(["a"], [0.3])
    assert torch.equal(run(), stock())
    assert fr.stats.captures == 3 and fr.stats.eager_calls == 0, fr.stats
